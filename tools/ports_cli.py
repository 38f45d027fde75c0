"""`rwkv-music ports`: the MIDI APIs python-rtmidi was built with and the ports each one offers."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

EPILOG = """examples:
  rwkv-music ports
  rwkv-music ports --json

Use a listed name in config.toml's [midi] connect_in / connect_out to attach to an existing
port (Windows with loopMIDI), or route your DAW to the daemon's virtual ports.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ports", help="list MIDI APIs and ports", description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_ports)


def run_ports(args: argparse.Namespace) -> int:
    from daemon.midi_ports import list_ports

    apis = list_ports()
    if args.json:
        print(json.dumps([asdict(a) for a in apis], indent=1))
        return 0
    for api in apis:
        state = "" if api.error is None else f"  (unavailable: {api.error})"
        print(f"{api.display_name} [{api.api}]{state}")
        if api.error is None:
            for kind, names in (("in ", api.inputs), ("out", api.outputs)):
                for name in names:
                    print(f"  {kind}  {name}")
            if not api.inputs and not api.outputs:
                print("  no ports")
    return 0
