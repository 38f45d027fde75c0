"""`rwkv-music osc ADDRESS [ARGS...]`: send one OSC message to a running daemon, print the reply."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("config.toml")

EPILOG = """examples:
  rwkv-music osc /rwkv/status                 # every value, one per line
  rwkv-music osc temperature 0.8              # the prefix is added to a bare name
  rwkv-music osc mode s:autopilot             # s: i: f: force an argument's OSC type
  rwkv-music osc length 4
  rwkv-music osc trigger
  rwkv-music osc reload runs/mine/step-0001200.safetensors
  rwkv-music osc --port 9001 status --json
  rwkv-music osc learn temperature            # then move a knob: it steers the temperature from now on
  rwkv-music osc unlearn temperature

Arguments are sent as OSC int when they parse as an integer, float when they parse as a
number, else as a string; prefix one with i:, f: or s: to choose. Exit status: 0 for an ack
or a status reply, 1 when the daemon answers with an error, 2 when nothing answers. `learn`
waits (up to --learn-wait seconds) for the control to be moved and prints the binding.
Host, port and prefix default to config.toml's [osc] section when that file exists.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "osc",
        help="send one OSC control message to a running daemon and print its reply",
        description="Send one OSC message (UDP) to a running `rwkv-music daemon` and print the reply.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("address", help="OSC address (/rwkv/temperature) or a bare name (temperature)")
    p.add_argument("args", nargs="*", help="arguments; i:/f:/s: force a type")
    p.add_argument("--host", help="daemon host (default: [osc] host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="daemon UDP port (default: [osc] port, else 9000)")
    p.add_argument("--prefix", help="prefix added to a bare name (default: [osc] prefix, else /rwkv)")
    p.add_argument("--config", type=Path, help=f"config.toml for the defaults (default: {DEFAULT_CONFIG} if present)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the reply (default 2)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.add_argument("--learn-wait", type=float, default=30.0,
                   help="seconds `learn` waits for a control to be moved (default 30; 0 = do not wait)")
    p.set_defaults(run=run_osc)


def parse_argument(text: str) -> Any:
    """One command-line argument -> an OSC value: i:/f:/s: prefixes, else int, float, string."""
    from tools.cli import UserError

    kind, sep, rest = text.partition(":")
    if sep and kind in ("i", "f", "s"):
        try:
            return int(rest) if kind == "i" else float(rest) if kind == "f" else rest
        except ValueError as err:
            raise UserError(f"argument {text!r}: not a valid {'integer' if kind == 'i' else 'number'}") from err
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:  # not this kind of number: try the next, then keep the text
            pass
    return text


def daemon_osc_target(config: Path | None, host: str | None, port: int | None) -> tuple[str, int, str]:
    """(host, port, prefix) of a running daemon's OSC server: the arguments where given, else
    config.toml's [osc] (`config`, or ./config.toml when present), else the defaults. A server
    bound to every interface (0.0.0.0, ::) is reached on 127.0.0.1."""
    from daemon.osc_server import OscConfig
    from model.settings import load_section, read_config

    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    osc = load_section(OscConfig, read_config(config), "osc") if config else OscConfig()
    host = host or ("127.0.0.1" if osc.host in ("0.0.0.0", "::") else osc.host)
    return host, port if port is not None else osc.port, osc.prefix


def run_osc(args: argparse.Namespace) -> int:
    from daemon.osc_server import send_and_wait, status_values

    host, port, config_prefix = daemon_osc_target(args.config, args.host, args.port)
    prefix = args.prefix or config_prefix
    address = args.address if args.address.startswith("/") else f"{prefix}/{args.address}"
    values = [parse_argument(a) for a in args.args]

    reply, reply_args = send_and_wait(host, port, address, values, timeout=args.timeout)
    if reply.endswith("/status"):
        status = status_values(reply_args)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            width = max((len(k) for k in status), default=0)
            for key, value in status.items():
                print(f"{key:<{width}}  {value}")
        return 0
    if args.json:
        print(json.dumps({"reply": reply, "args": list(reply_args)}))
    else:
        print(" ".join([reply, *map(str, reply_args)]))
    if reply.endswith("/error"):
        reason = reply_args[1] if len(reply_args) > 1 else "refused"
        print(f"rwkv-music: the daemon refused {address}: {reason}", file=sys.stderr)
        return 1
    if address == f"{prefix}/learn" and args.learn_wait > 0:
        return _wait_for_learn(host, port, prefix, str(values[0]), args)
    return 0


def _wait_for_learn(host: str, port: int, prefix: str, target: str, args: argparse.Namespace) -> int:
    """After `/learn`: poll the status until the daemon bound a control change to `target`."""
    import time

    from daemon.osc_server import send_and_wait, status_values
    from tools.cli import UserError

    print(f"move the control that should steer {target} ...", file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.learn_wait
    while time.monotonic() < deadline:
        _, reply_args = send_and_wait(host, port, f"{prefix}/status", [], timeout=args.timeout)
        status = status_values(reply_args)
        if status.get("cc_learning") != target:
            binding = json.loads(status.get("cc") or "{}").get(target)
            if binding is None:
                raise UserError(f"learning {target} was cancelled")
            print(f"{target} <- {binding}")
            return 0
        time.sleep(0.1)
    raise UserError(f"no control change arrived within {args.learn_wait:g} s; {target} is still waiting for one")
