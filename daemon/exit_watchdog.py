"""A last resort for stop paths that can block inside a C library.

python-rtmidi keeps the interpreter lock while it closes a JACK client, and libjack can block
while closing (jack2 issues 340 and 395 report such hangs; we saw them here). Then no Python
code runs any more: no timeout, no signal handler. faulthandler's watchdog is a C thread of
its own: when the time is up it writes every thread's traceback to stderr and ends the
process, so a stop finishes in bounded time whatever the library does.
"""

from __future__ import annotations

import contextlib
import faulthandler
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def exit_watchdog(seconds: float, file=None) -> Iterator[None]:
    """End the process (exit code 1, tracebacks on `file`, default stderr) if the body takes
    longer than `seconds`. faulthandler has one such timer per process: this replaces any
    other one while it runs and cancels it at the end."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=file or sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
