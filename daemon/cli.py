"""`rwkv-music daemon`: run the real-time co-performer until Ctrl-C (or SIGTERM)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.midi_ports import MidiConfig

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("config.toml")
# daemon.jack_server.PRIVATE_JACK_CHOICES, spelled out so `--help` does not import rtmidi.
PRIVATE_JACK_CHOICES = ("auto", "always", "never")

EPILOG = """examples:
  rwkv-music daemon                                   # config.toml if present, checkpoints/default.safetensors
  rwkv-music daemon --checkpoint runs/mine/latest.safetensors   # and reload it whenever training saves
  rwkv-music daemon --set midi.api=jack --set clock.tempo=96 --set daemon.mode=autopilot
  rwkv-music daemon --config stage.toml --set daemon.length_bars=4
  rwkv-music daemon --private-jack auto               # no ALSA, no JACK running: start a private JACK server

Route a DAW track to the input port ("RWKV-Music in"), record or monitor the output port
("RWKV-Music out"), play a phrase and stop: the answer comes at the next bar line. Live
controls over OSC (UDP 127.0.0.1:9000), e.g. `rwkv-music osc /rwkv/temperature 0.8`;
see docs/daemon.md and docs/control.md. Ctrl-C releases every note, then closes the ports.

A machine without ALSA's sequencer (/dev/snd/seq) and without a running JACK server has no MIDI
backend: --private-jack auto then starts a JACK server with the dummy driver for the daemon
(no sound hardware needed), prints its name and how to connect to it, and stops it on exit.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "daemon",
        help="play along in real time: MIDI in, answers out, OSC/MQTT control",
        description="The real-time MIDI co-performer: listens on a virtual MIDI input, answers on a "
        "virtual MIDI output at bar lines, in tempo, and hot-reloads its checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(run=run_daemon)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, help=f"config.toml to read (default: {DEFAULT_CONFIG} when it exists)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. daemon.temperature=0.9 (repeatable)",
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint to play (overrides daemon.checkpoint)")
    p.add_argument(
        "--private-jack", choices=PRIVATE_JACK_CHOICES, default="never",
        help="start a private JACK server (dummy driver) for the daemon: auto = only when no MIDI "
        "backend is usable (no /dev/snd/seq, no JACK server running), always, or never (default)",
    )


def run_daemon(args: argparse.Namespace) -> int:
    import asyncio

    from daemon.config import load_daemon_settings
    from daemon.jack_server import PrivateJackServer, private_jack_wanted
    from daemon.runner import serve

    config = args.config
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    settings = load_daemon_settings(config, args.set, checkpoint=args.checkpoint)
    with contextlib.ExitStack() as stack:
        if private_jack_wanted(args.private_jack, settings.midi.api):
            server = stack.enter_context(PrivateJackServer())
            settings.midi.api = "jack"
            why = "it was asked for" if args.private_jack == "always" else "no MIDI backend is usable"
            print(connection_help(server.name, settings.midi, why), flush=True)
        asyncio.run(serve(settings))
    return 0


def connection_help(server: str, midi: MidiConfig, why: str) -> str:
    """One paragraph for the user: why a private JACK server runs, its name, the daemon's JACK
    ports and jack_connect commands that wire them."""
    # rtmidi names the client of a virtual port after the port: "<port>:<port>" in JACK.
    in_port = f"{midi.in_port}:{midi.in_port}" if midi.in_port and not midi.connect_in else None
    out_port = f"{midi.out_port}:{midi.out_port}" if midi.out_port and not midi.connect_out else None
    ports = " and ".join(
        f"{what} {name!r}" for what, name in (("input", in_port), ("output", out_port)) if name
    ) or "no virtual ports"
    lines = [
        f"The daemon runs on a private JACK server named {server!r} ({why}; dummy driver, no sound "
        f"hardware needed), stopped when the daemon stops. Its ports, once it says ready: {ports}. "
        "Connect JACK programs to the server by its name, e.g. from another shell:",
        f"  export JACK_DEFAULT_SERVER={shlex.quote(server)}   # then start a JACK-aware DAW or synth here",
        f"  jack_lsp -s {shlex.quote(server)}                  # list the ports",
    ]
    if in_port:
        lines.append(f"  jack_connect -s {shlex.quote(server)} 'your-synth:midi_out' {shlex.quote(in_port)}")
    if out_port:
        lines.append(f"  jack_connect -s {shlex.quote(server)} {shlex.quote(out_port)} 'your-synth:midi_in'")
    return "\n".join(lines)
