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
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exit_watchdog(seconds: float, file=None) -> Iterator[None]:
    """End the process (exit code 1, tracebacks on `file`, default stderr) if the body takes
    longer than `seconds`. faulthandler has one such timer per process: this replaces any
    other one while it runs and cancels it at the end.

    faulthandler writes to a file descriptor. When `sys.stderr` has none (a daemon embedded
    where stderr is captured: pytest's capsys, a notebook) the process's original stderr is
    used, and when there is no descriptor at all the body runs without the watchdog: the
    safety net must never keep a stop from running (it did: the ports stayed open and the
    daemon's clients lived on in the embedding process)."""
    output = _with_descriptor(file or sys.stderr) or _with_descriptor(sys.__stderr__)
    if output is None:
        log.warning("no stderr with a file descriptor: stopping without the exit watchdog")
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=True, file=output)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _with_descriptor(file):
    """`file` when it has a usable file descriptor, else None."""
    try:
        file.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None
    return file
