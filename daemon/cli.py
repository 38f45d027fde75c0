"""`rwkv-music daemon`: run the real-time co-performer until Ctrl-C (or SIGTERM)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("config.toml")

EPILOG = """examples:
  rwkv-music daemon                                   # config.toml if present, checkpoints/default.safetensors
  rwkv-music daemon --checkpoint runs/mine/latest.safetensors   # and reload it whenever training saves
  rwkv-music daemon --set midi.api=jack --set clock.tempo=96 --set daemon.mode=autopilot
  rwkv-music daemon --config stage.toml --set daemon.length_bars=4

Route a DAW track to the input port ("RWKV-Music in"), record or monitor the output port
("RWKV-Music out"), play a phrase and stop: the answer comes at the next bar line. Live
controls over OSC (UDP 127.0.0.1:9000), e.g. `rwkv-music osc /rwkv/temperature 0.8`;
see docs/daemon.md and docs/control.md. Ctrl-C releases every note, then closes the ports.
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


def run_daemon(args: argparse.Namespace) -> int:
    import asyncio

    from daemon.app import serve
    from daemon.config import load_daemon_settings

    config = args.config
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    settings = load_daemon_settings(config, args.set, checkpoint=args.checkpoint)
    asyncio.run(serve(settings))
    return 0
