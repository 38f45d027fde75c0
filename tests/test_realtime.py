"""Real-time priority for the output thread: granted where the system allows it, harmless where not."""

import os
import threading

import pytest

from daemon.realtime import make_current_thread_realtime, realtime_allowed
from daemon.scheduler import OutputScheduler


def policy_in_thread(priority: int) -> tuple[bool, int]:
    """Ask for SCHED_FIFO on a fresh thread; return the answer and the policy it then had."""
    out: list[tuple[bool, int]] = []

    def body() -> None:
        granted = make_current_thread_realtime(priority)
        out.append((granted, os.sched_getscheduler(threading.get_native_id())))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return out[0]


@pytest.mark.skipif(not hasattr(os, "SCHED_FIFO"), reason="no POSIX real-time scheduling on this platform")
def test_the_thread_gets_sched_fifo_exactly_when_the_system_allows_it():
    granted, policy = policy_in_thread(10)
    assert granted == realtime_allowed()
    assert policy == (os.SCHED_FIFO if granted else os.SCHED_OTHER)
    # Only that thread changed: this one keeps its normal policy.
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER


def test_bad_priorities_are_refused():
    with pytest.raises(ValueError, match="between 1 and 99"):
        make_current_thread_realtime(0)
    with pytest.raises(ValueError, match="realtime_priority"):
        OutputScheduler(lambda msg: None, realtime_priority=100)


def test_the_scheduler_reports_what_it_got_and_still_sends():
    sent: list[tuple[int, ...]] = []
    with OutputScheduler(sent.append, realtime_priority=60) as scheduler:
        import time

        scheduler.schedule(time.perf_counter() + 0.01, (0x90, 60, 100))
        deadline = time.monotonic() + 5
        while not sent and time.monotonic() < deadline:
            time.sleep(0.005)
        assert scheduler.realtime == realtime_allowed()
    assert sent[0] == (0x90, 60, 100)
