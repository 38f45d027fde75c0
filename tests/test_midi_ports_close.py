"""Closing the MIDI ports on a real JACK server: bounded in time, no crash, on a loaded machine.

The cycles run in a child process: a crash inside libjack (a segmentation fault) or a hang
then fails this test alone instead of ending the whole pytest run. A busy loop in another
process keeps one core loaded throughout, as a musician's machine or CI's would be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.jack_watch import FALLBACK_SETTLE_S, JackServerWatch
from tests.fixtures.jack import JackServer, unique_client_name

ROOT = Path(__file__).resolve().parents[1]
CYCLES = 60
# A close that waits for the JACK server on a loaded machine takes up to a second or two; a
# hang used to last until CI's own limit. Anything past this bound is a failure.
CLOSE_BOUND_S = 8.0

CYCLE_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys, time
    from daemon.midi_ports import MidiConfig, MidiPorts
    from daemon.midi_events import note_on, note_off

    async def main(prefix, cycles):
        worst = 0.0
        for i in range(cycles):
            config = MidiConfig(api="jack", in_port=f"{prefix}-{i % 3} in", out_port=f"{prefix}-{i % 3} out")
            async with MidiPorts(config) as ports:
                ports.send(note_on(0, 60, 90))
                ports.send(note_off(0, 60))
                await asyncio.sleep(0.002 * (i % 7))  # close at varied moments after opening
                started = time.perf_counter()
            worst = max(worst, time.perf_counter() - started)
        print(json.dumps({"cycles": cycles, "worst_close_s": worst}))

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


@pytest.fixture
def busy_core() -> Iterator[subprocess.Popen]:
    """Another process that keeps one core busy for the test's duration."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait()


def test_midi_ports_close_many_times_in_bounded_time_on_a_loaded_machine(jack_server: JackServer, busy_core):
    prefix = unique_client_name("close")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JACK_DEFAULT_SERVER": jack_server.name}
    started = time.monotonic()
    result = subprocess.run(
        # faulthandler: a crash prints every thread's Python stack, so a failure says where.
        [sys.executable, "-X", "faulthandler", "-c", CYCLE_SCRIPT, prefix, str(CYCLES)],
        capture_output=True, text=True, env=env, timeout=CYCLES * CLOSE_BOUND_S,
    )
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["cycles"] == CYCLES
    assert report["worst_close_s"] < CLOSE_BOUND_S, report
    assert busy_core.poll() is None  # the core stayed busy throughout
    # Nothing of ours is left on the server: no port, and (through the watch) no client.
    assert [p for p in jack_server.ports() if prefix in p] == []
    print(f"{CYCLES} cycles in {time.monotonic() - started:.1f} s, worst close {report['worst_close_s']:.3f} s")


def test_jack_watch_settles_after_a_change_of_the_graph_and_only_then(jack_server: JackServer):
    """`settle` returns once the server's notifications about a change came; with no change it
    waits its whole timeout and says so."""
    import rtmidi

    watch = JackServerWatch(unique_client_name("settle-watch"))
    assert watch.open()
    client = None
    try:
        mark = watch.graph_mark()
        client = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=unique_client_name("settle"))  # a change
        started = time.monotonic()
        assert watch.settle(mark, timeout_s=5.0)
        assert watch.graph_mark() > mark
        assert time.monotonic() - started < 5.0

        # Changes whose notifications came before the mark do not count as coming after it.
        client.delete()
        client = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=unique_client_name("settle"))
        time.sleep(0.3)
        mark = watch.graph_mark()
        started = time.monotonic()
        assert not watch.settle(mark, timeout_s=0.3)  # nothing changed since: no notification
        assert time.monotonic() - started >= 0.3
        assert watch.settle_timeouts == 1

        # A second miss in a row: as on a server that sends no such notifications, later
        # changes wait a fixed FALLBACK_SETTLE_S instead of the timeout.
        assert not watch.settle(watch.graph_mark(), timeout_s=0.3)
        started = time.monotonic()
        assert not watch.settle(watch.graph_mark(), timeout_s=5.0)
        assert FALLBACK_SETTLE_S <= time.monotonic() - started < 1.0
        assert watch.settle_timeouts == 2
    finally:
        if client is not None:
            client.delete()
        watch.close()
    assert not watch.settle(watch.graph_mark())  # a closed watch returns at once


def test_jack_watch_close_is_bounded_when_the_child_does_not_answer(jack_server: JackServer):
    """A watch child that stops responding (here: stopped by SIGSTOP) is killed, not waited for."""
    watch = JackServerWatch(unique_client_name("stuck-watch"))
    assert watch.open()
    child = watch._process
    assert child is not None and not watch.gone
    os.kill(child.pid, signal.SIGSTOP)
    started = time.monotonic()
    watch.close()
    elapsed = time.monotonic() - started
    assert child.poll() is not None, "the stopped child is still there"
    assert elapsed < 5.0, elapsed


def test_jack_watch_reports_a_server_that_goes_away(monkeypatch):
    """A server of its own, stopped under the watch: `gone` turns true, the child has exited."""
    name = f"rwkv-watch-{os.getpid()}"
    env = {**os.environ, "JACK_NO_AUDIO_RESERVATION": "1"}
    server = subprocess.Popen(["jackd", "--no-realtime", "-n", name, "-d", "dummy", "-r", "48000", "-p", "256"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    monkeypatch.setenv("JACK_DEFAULT_SERVER", name)
    try:
        watch = JackServerWatch("watch-under-test")
        deadline = time.monotonic() + 20
        while not watch.open():
            assert time.monotonic() < deadline, "the private server did not come up"
            time.sleep(0.1)
        assert not watch.gone
        server.terminate()
        server.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not watch.gone:
            assert time.monotonic() < deadline, "the watch did not notice the server going away"
            time.sleep(0.01)
        watch.close()
        assert not watch.open()  # no server: nothing to watch
    finally:
        server.kill()
        server.wait()


def test_the_only_port_besides_in_and_out_says_it_is_internal(jack_server: JackServer):
    """What a DAW lists: our input, our output, and the SysEx guard named as internal."""
    prefix = unique_client_name("lsp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JACK_DEFAULT_SERVER": jack_server.name}
    script = textwrap.dedent(f"""
        import asyncio, sys
        from daemon.midi_ports import MidiConfig, MidiPorts
        async def main():
            async with MidiPorts(MidiConfig(api="jack", in_port="{prefix} in", out_port="{prefix} out")):
                print("open", flush=True)
                sys.stdin.readline()
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        jack_server.wait_for_port(f"{prefix} out:")
        ours = sorted(p for p in jack_server.ports() if p.startswith(prefix))
        assert ours == [f"{prefix} in (internal):sysex-guard, do not connect",
                        f"{prefix} in:{prefix} in", f"{prefix} out:{prefix} out"], ours
        # The guard is wired to our input and to nothing else.
        assert jack_server.connections(ours[0]) == [f"{prefix} in:{prefix} in"]
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
