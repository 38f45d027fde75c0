"""Real-time (SCHED_FIFO) priority for the threads that keep time, where the system allows it.

A thread at normal priority that wakes up for a note waits behind whatever else is runnable on
its core; on a 2-core machine with the model computing that is often a millisecond or more. A
SCHED_FIFO thread runs as soon as it is runnable. That is what JACK does for its own threads
(`jackd -R`, the default on desktops), and what the output scheduler asks for here.

Linux only (macOS and Windows have other mechanisms; the call reports False there). It needs
root, CAP_SYS_NICE, or an `rtprio` limit (`ulimit -r`, e.g. from the `audio` group's
/etc/security/limits.d entry that JACK packages install). Without it the thread keeps its
normal priority and the daemon still works, with a wider timing tail (docs/timing.md).

The time-keeping threads sleep almost all the time and spin at most a millisecond before a
message, so they cannot monopolise a core.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

# Below JACK's own real-time threads (jackd -P defaults to 10 on some systems, 70 on others;
# clients run a few steps below the server): the audio engine stays first.
DEFAULT_PRIORITY = 60


def make_current_thread_realtime(priority: int) -> bool:
    """Give the calling thread SCHED_FIFO at `priority` (1..99). True on success; False where
    the platform or the permissions do not allow it (nothing changes then)."""
    if not 1 <= priority <= 99:
        raise ValueError(f"real-time priority {priority}: must be between 1 and 99")
    if not hasattr(os, "sched_setscheduler") or not hasattr(os, "SCHED_FIFO"):
        return False
    try:
        # On Linux a thread id addresses that thread alone; 0 would be the calling thread too,
        # but the native id keeps the intent readable.
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_FIFO, os.sched_param(priority))
    except OSError as err:
        log.debug("no real-time priority for thread %s: %s", threading.current_thread().name, err)
        return False
    return True


def realtime_allowed() -> bool:
    """Whether this process may use SCHED_FIFO (probed on a short-lived thread)."""
    result: list[bool] = []
    probe = threading.Thread(target=lambda: result.append(make_current_thread_realtime(1)), name="rt-probe")
    probe.start()
    probe.join()
    return bool(result and result[0])
