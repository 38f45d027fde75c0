"""The `rwkv-music` command line: one console script, one sub-command per module.

Each command module exposes `register(subparsers)`, which adds its parser with
`set_defaults(run=function)`. Heavy imports (torch, miditok) stay inside the run functions so
`rwkv-music --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# name -> module that registers it; the order is the order in --help.
COMMAND_MODULES = [
    "train.corpus",
    "train.prepare",
    "train.cli",
    "train.tune",
    "daemon.cli",
    "tools.osc_cli",
    "tools.watch",
    "tools.ports_cli",
    "tools.complete",
    "tools.evaluate",
    "tools.score",
    "tools.demo",
    "tools.bench",
    "tools.interop",
]

EPILOG = """examples:
  rwkv-music corpus data/midi                   # real music from music21's corpus as MIDI
  rwkv-music prepare data/midi data/prepared    # MIDI -> REMI token shards
  rwkv-music train --data data/prepared --out runs/mine
  rwkv-music complete song.mid out.mid --bars 4 --variations 4 --png out.png
  rwkv-music demo                               # the daemon answering a piano phrase, end to end
  rwkv-music watch                              # a live view of a running daemon
  rwkv-music bench step                         # our RWKV7.step against the rwkv package
  rwkv-music export checkpoints/default.safetensors out.pth
"""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad value): printed as one line, exit code 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception bases that mean "the user asked for something impossible"."""
    from model.errors import ModelError
    from model.settings import ConfigError

    types: list[type[BaseException]] = [UserError, ConfigError, ModelError, FileNotFoundError]
    for module, name in [("train.errors", "TrainError"), ("daemon.errors", "DaemonError")]:
        try:
            types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwkv-music",
        description="A real-time MIDI co-performer driven by an RWKV-7 model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in COMMAND_MODULES:
        # An optional part that is not installed (or not built yet) simply has no command.
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except user_error_types() as err:
        print(f"rwkv-music: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
