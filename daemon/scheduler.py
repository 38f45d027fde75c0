"""OutputScheduler: sends MIDI messages at absolute times, on a thread of its own.

Times are seconds in the `time.perf_counter()` domain, the domain of the clocks and of the
arrival stamps of incoming events. The thread sleeps on a condition variable until `spin_s`
(1 ms) before the earliest due message, then spins on the clock for the rest: a timed sleep
wakes up a little late (median hand-over 0.13-0.17 ms after the due time without the spin,
0.02-0.04 ms with it, measured here), and a 1 ms spin per message costs little CPU.

Protection from the model: the interpreter lock (GIL) is shared with every other Python
thread of the process. A thread that wants it back waits up to `sys.getswitchinterval()`
(5 ms by default) while another thread runs Python code. Measured through JACK on a 2-core
machine, the p99 error of a 1/8-beat grid at 120 BPM went from 1.9 ms idle to 10.7 ms while
another thread ran model steps, and back to 0.5 ms with `sys.setswitchinterval(0.0005)`.
The scheduler does not change interpreter-wide settings itself: whoever owns the process (the
daemon) calls `short_switch_interval()` for as long as the scheduler runs next to the model, or
runs the model in a process of its own. See docs/timing.md.

Stopping: `stop_all()` cancels every pending message and sends, in this order, a Note Off for
every sounding note, a sustain-pedal release on every channel whose pedal is down, and All
Notes Off (CC 123) on every channel used, explicitly. `close()` (and leaving the `with` block)
refuses new messages, ends the thread and then calls it, so the output is silent afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import itertools
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from daemon.errors import SchedulerStoppedError
from daemon.jack_watch import JackServerWatch
from daemon.midi_events import (
    CONTROL_CHANGE,
    NOTE_OFF,
    NOTE_ON,
    SUSTAIN_PEDAL,
    MidiBytes,
    all_notes_off,
    channel_of,
    control_change,
    note_off,
    note_on,
    validate,
)
from daemon.realtime import make_current_thread_realtime

log = logging.getLogger(__name__)

# Interpreter switch interval that keeps a sending thread within ~0.5 ms of its schedule while
# another thread of the process runs the model (measured, see docs/timing.md).
SWITCH_INTERVAL_S = 0.0005
RECENT_LATENESS = 4096
# Messages sent later than this after their time are counted as late in the stats.
LATE_THRESHOLD_S = 0.005

Sender = Callable[[MidiBytes], None]


@contextlib.contextmanager
def short_switch_interval(seconds: float = SWITCH_INTERVAL_S) -> Iterator[float]:
    """Set `sys.setswitchinterval(seconds)` for the block and restore the previous value.

    Yields the previous interval. The setting is process-wide: the daemon wraps the whole time
    the scheduler and the model run side by side in it.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield previous
    finally:
        sys.setswitchinterval(previous)


@dataclass
class SchedulerStats:
    """Counters of the output side; lateness is send time minus due time, in seconds."""

    scheduled: int = 0
    sent: int = 0
    cancelled: int = 0
    send_errors: int = 0
    late: int = 0  # sent more than LATE_THRESHOLD_S after the due time
    max_lateness_s: float = 0.0


@dataclass(order=True)
class _Pending:
    due: float
    priority: int  # at equal times Note Offs go first, so a repeated note is not cut short
    seq: int
    message: MidiBytes = dataclasses.field(compare=False)


def _is_note_off(msg: MidiBytes) -> bool:
    kind = msg[0] & 0xF0
    return kind == NOTE_OFF or (kind == NOTE_ON and msg[2] == 0)


class OutputScheduler:
    """Sends MIDI messages at absolute `time.perf_counter()` times through an injected sender.

    Use::

        with OutputScheduler(ports.send) as scheduler:
            scheduler.schedule(clock.time_at(beat), note_on(0, 60, 90))
            ...
            scheduler.stop_all()          # takeover / panic: silence now

    `send(message)` is called on the scheduler thread (and on the thread calling `stop_all`),
    never concurrently from this scheduler; it must be thread-safe if other code shares it.
    Messages whose time has passed are sent at once; equal times keep their scheduling order,
    Note Offs first.
    """

    def __init__(
        self,
        send: Sender,
        *,
        spin_s: float = 0.001,
        clock: Callable[[], float] = time.perf_counter,
        name: str = "midi-output",
        realtime_priority: int = 0,
    ):
        if not 0.0 <= spin_s <= 0.05:
            raise ValueError(f"spin_s = {spin_s}: must be between 0 and 0.05 seconds")
        if not 0 <= realtime_priority <= 99:
            raise ValueError(f"realtime_priority = {realtime_priority}: must be between 0 (off) and 99")
        self._send = send
        self._spin_s = spin_s
        self._realtime_priority = realtime_priority
        self.realtime = False  # whether the thread got SCHED_FIFO (see daemon.realtime)
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[_Pending] = []
        self._seq = itertools.count()
        self._sounding: set[tuple[int, int]] = set()
        self._pedal_down: set[int] = set()
        self._channels_used: set[int] = set()
        self._stats = SchedulerStats()
        # Lateness (seconds) of the last messages sent at a due time, for benchmarks.
        self._recent_lateness: collections.deque[float] = collections.deque(maxlen=RECENT_LATENESS)
        self._thread: threading.Thread | None = None
        self._running = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> OutputScheduler:
        """Start the sending thread (once)."""
        with self._cond:
            if self._thread is not None:
                raise SchedulerStoppedError(f"scheduler {self._name!r} was already started")
            self._running = True
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Refuse new messages, end the thread, then silence the output (`stop_all`); idempotent."""
        with self._cond:
            if not self._running:
                return
            self._running = False
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.stop_all()

    def __enter__(self) -> OutputScheduler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._running

    # -- scheduling --------------------------------------------------------------------------

    def schedule(self, at: float, message: Sequence[int]) -> None:
        """Send `message` (one complete MIDI message) at perf_counter time `at`; thread-safe.

        Raises InvalidMidiMessage for malformed bytes, SchedulerStoppedError when not running.
        """
        self.schedule_many([(at, message)])

    def schedule_many(self, items: Iterable[tuple[float, Sequence[int]]]) -> None:
        """Schedule several (time, message) pairs under one lock; all or none are accepted."""
        pending = []
        for at, message in items:
            msg = validate(message)
            pending.append((float(at), 0 if _is_note_off(msg) else 1, msg))
        with self._cond:
            if not self._running:
                raise SchedulerStoppedError(f"scheduler {self._name!r} is not running")
            earliest = self._heap[0].due if self._heap else float("inf")
            for at, priority, msg in pending:
                heapq.heappush(self._heap, _Pending(at, priority, next(self._seq), msg))
            self._stats.scheduled += len(pending)
            if self._heap and self._heap[0].due < earliest:
                self._cond.notify()

    def cancel_after(self, at: float) -> int:
        """Drop pending messages due at or after `at` (keeps Note Offs of notes that are sounding
        or will be started before `at`, so nothing hangs); returns how many were dropped."""
        with self._cond:
            starting_before = {
                (p.message[0] & 0x0F, p.message[1])
                for p in self._heap
                if p.due < at and p.message[0] & 0xF0 == NOTE_ON and not _is_note_off(p.message)
            }
            needed = self._sounding | starting_before
            keep, dropped = [], 0
            for p in self._heap:
                is_needed_off = _is_note_off(p.message) and (p.message[0] & 0x0F, p.message[1]) in needed
                if p.due < at or is_needed_off:
                    keep.append(p)
                else:
                    dropped += 1
            heapq.heapify(keep)
            self._heap = keep
            self._stats.cancelled += dropped
            return dropped

    def stop_all(self, extra_channels: Iterable[int] = ()) -> int:
        """Cancel everything pending and silence the output now; returns the number cancelled.

        Sends Note Off for every sounding note, releases the sustain pedal where it is down, then
        All Notes Off on every channel used so far plus `extra_channels` (0-15; a panic passes
        range(16)). Runs on the calling thread; when it returns, the messages have been handed
        to the sender.
        """
        with self._cond:
            cancelled = len(self._heap)
            self._heap.clear()
            self._stats.cancelled += cancelled
            offs = [note_off(ch, note) for ch, note in sorted(self._sounding)]
            pedals = [control_change(ch, SUSTAIN_PEDAL, 0) for ch in sorted(self._pedal_down)]
            channels = sorted(self._channels_used | set(extra_channels))
            for msg in [*offs, *pedals, *(all_notes_off(ch) for ch in channels)]:
                self._send_now(msg)
            self._sounding.clear()
            self._pedal_down.clear()
            self._cond.notify()
        if offs or cancelled:
            log.info("stopped: %d pending cancelled, %d notes released", cancelled, len(offs))
        return cancelled

    # -- state -------------------------------------------------------------------------------

    @property
    def sounding_notes(self) -> frozenset[tuple[int, int]]:
        """(channel, note) pairs whose Note On was sent and whose Note Off was not."""
        with self._cond:
            return frozenset(self._sounding)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    @property
    def stats(self) -> SchedulerStats:
        with self._cond:
            return dataclasses.replace(self._stats)

    def recent_lateness(self) -> list[float]:
        """Send time minus due time (seconds) of the last RECENT_LATENESS timed messages: what
        the scheduler controls, before the MIDI driver delivers them."""
        with self._cond:
            return list(self._recent_lateness)

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        if self._realtime_priority:
            self.realtime = make_current_thread_realtime(self._realtime_priority)
            if self.realtime:
                log.info("output thread at real-time priority %d", self._realtime_priority)
            else:
                log.info("output thread at normal priority: this system does not allow real-time "
                         "scheduling here (docs/timing.md)")
        clock = self._clock
        while True:
            with self._cond:
                while self._running and not self._heap:
                    self._cond.wait()
                if not self._running:
                    return
                due = self._heap[0].due
                remaining = due - clock()
                if remaining > self._spin_s:
                    # Woken early by a new earlier message, or on time: either way look again.
                    self._cond.wait(timeout=remaining - self._spin_s)
                    continue
            while clock() < due:
                pass  # spin the last stretch without the lock
            with self._cond:
                now = clock()
                while self._heap and self._heap[0].due <= now:
                    item = heapq.heappop(self._heap)
                    self._send_now(item.message, item.due)

    def _send_now(self, msg: MidiBytes, due: float | None = None) -> None:
        """Send and track note state; caller holds the lock. A failed send is logged and counted."""
        # The time the send starts: what the scheduler controls (the sender may then wait for the
        # interpreter lock on its way out of the driver call, after the message has left).
        sent_at = self._clock()
        try:
            self._send(msg)
        except Exception:
            self._stats.send_errors += 1
            log.exception("MIDI send failed for %s", msg)
            return
        stats = self._stats
        stats.sent += 1
        if due is not None:
            lateness = sent_at - due
            self._recent_lateness.append(lateness)
            stats.max_lateness_s = max(stats.max_lateness_s, lateness)
            if lateness > LATE_THRESHOLD_S:
                stats.late += 1
        channel = channel_of(msg)
        if channel is None:
            return
        self._channels_used.add(channel)
        kind = msg[0] & 0xF0
        if _is_note_off(msg):
            self._sounding.discard((channel, msg[1]))
        elif kind == NOTE_ON:
            self._sounding.add((channel, msg[1]))
        elif kind == CONTROL_CHANGE and msg[1] == SUSTAIN_PEDAL:
            if msg[2] >= 64:
                self._pedal_down.add(channel)
            else:
                self._pedal_down.discard(channel)


# -- measurement ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingReport:
    """Errors of received times against scheduled times, in milliseconds (absolute values)."""

    count: int
    missing: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    def __str__(self) -> str:
        return (
            f"n={self.count} missing={self.missing} p50={self.p50_ms:.2f} ms "
            f"p99={self.p99_ms:.2f} ms max={self.max_ms:.2f} ms"
        )


@dataclass(frozen=True)
class GridTiming:
    """`measure_grid_timing`'s result: errors at the receiving JACK port and at hand-over."""

    received: TimingReport
    sent: TimingReport

    def __str__(self) -> str:
        return f"received: {self.received}; sent: {self.sent}"


def timing_report(scheduled: Sequence[float], received: Sequence[float]) -> TimingReport:
    """Compare matched lists of scheduled and received times (seconds, same order).

    Missing receptions (received shorter than scheduled) are counted, not measured.
    """
    n = min(len(scheduled), len(received))
    if n == 0:
        return TimingReport(0, len(scheduled), float("nan"), float("nan"), float("nan"), float("nan"))
    errors = sorted(abs(r - s) * 1000.0 for s, r in zip(scheduled, received, strict=False))
    p99_index = min(n - 1, int(round(0.99 * (n - 1))))
    return TimingReport(
        count=n,
        missing=len(scheduled) - n,
        p50_ms=statistics.median(errors),
        p99_ms=errors[p99_index],
        max_ms=errors[-1],
        mean_ms=statistics.fmean(errors),
    )


def record_arrivals_main() -> None:
    """Receiver process for `measure_grid_timing` (argv: source port, client name).

    Prints "ready" once connected to the JACK port, records every message with its arrival
    time until a line arrives on stdin, then prints [[time, [bytes...]], ...] as JSON. A process
    of its own, so the lock waits of the measured process do not count; it imports only rtmidi,
    daemon.midi_events and daemon.jack_watch. It polls rtmidi's queue rather than taking a
    Python callback, so it can close its client at once even while the sender keeps sending
    (see daemon.midi_ports); the times come from rtmidi's delta times (ArrivalStamper), not
    from when a poll saw them.
    """
    import json
    import select

    import rtmidi

    from daemon.midi_events import ArrivalStamper

    source, client = sys.argv[1], sys.argv[2]
    stamper = ArrivalStamper()
    arrivals: list[tuple[float, list[int]]] = []
    with JackServerWatch(f"{client} watch") as watch:  # each change settles (daemon.jack_watch)
        with watch.change():
            midi_in = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=client, queue_size_limit=65536)
        midi_in.ignore_types(sysex=False, timing=False, active_sense=False)
        with watch.change():
            midi_in.open_port(midi_in.get_ports().index(source))
        print("ready", flush=True)
        while True:
            message = midi_in.get_message()
            if message is not None:
                arrivals.append((stamper.stamp(message[1], time.perf_counter()), message[0]))
                continue
            if select.select([sys.stdin], [], [], 0.001)[0]:  # "stop", or the parent went away
                break
        with watch.change():
            midi_in.close_port()
        midi_in.delete()
    print(json.dumps(arrivals), flush=True)


def measure_grid_timing(
    *,
    bpm: float = 120.0,
    grid_beats: float = 0.125,
    notes: int = 200,
    load: Callable[[threading.Event], None] | None = None,
    switch_interval_s: float | None = None,
    spin_s: float = 0.001,
) -> GridTiming:
    """Send notes on a grid through an OutputScheduler into a JACK port and measure, on a
    receiving JACK client in another process, how far each message lands from its time.

    Needs a running JACK server (the one JACK_DEFAULT_SERVER names, else the default).
    `notes` Note On/Off pairs are sent, a Note On on every grid step (`grid_beats` at `bpm`) and
    its Note Off half a step later; every message is measured. `load(stop_event)`, if given,
    runs on another thread of this process until the measurement ends (e.g. torch matmuls),
    and `switch_interval_s`, if given, is set for the duration.

    Returns the errors measured at the receiving port (`received`: includes JACK's own delivery
    delay, up to one period, and any stall of the JACK server) and at the moment each message
    was handed to rtmidi (`sent`: what the scheduler itself controls).
    """
    import json
    import os
    import subprocess

    import rtmidi

    if not 1 <= notes <= 6000:
        raise ValueError(f"notes = {notes}: must be between 1 and 6000")
    tag = f"{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    sender_client, receiver_client = f"timing-send-{tag}", f"timing-recv-{tag}"
    # Each change of the graph waits for the server's notifications about it: libjack crashes a
    # client that registers or unregisters a port meanwhile (daemon.jack_watch).
    watch = JackServerWatch(f"timing-watch-{tag}")
    watch.open()
    with watch.change():
        midi_out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=sender_client)
    with watch.change():
        midi_out.open_virtual_port("out")
    program = "from daemon.scheduler import record_arrivals_main; record_arrivals_main()"
    receiver = subprocess.Popen(
        [sys.executable, "-c", program, f"{sender_client}:out", receiver_client],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    stop_load = threading.Event()
    load_thread = None
    receiver_leaves = 0  # the watch's round count before the receiver is told to stop
    try:
        assert receiver.stdout is not None and receiver.stdin is not None
        if receiver.stdout.readline().strip() != "ready":
            raise RuntimeError("timing receiver failed to connect to the JACK port")
        if load is not None:
            load_thread = threading.Thread(target=load, args=(stop_load,), name="timing-load", daemon=True)
            load_thread.start()
        step = grid_beats * 60.0 / bpm
        interval = short_switch_interval(switch_interval_s) if switch_interval_s else contextlib.nullcontext()
        expected: list[tuple[float, MidiBytes]] = []
        handed_over: dict[MidiBytes, float] = {}

        def send(message: MidiBytes) -> None:
            midi_out.send_message(message)
            handed_over.setdefault(message, time.perf_counter())

        with interval, OutputScheduler(send, spin_s=spin_s) as scheduler:
            start = time.perf_counter() + 0.5
            for i in range(notes):
                # (key, velocity) differs for every note, so each arrival is matched to its send.
                at, pitch, velocity = start + i * step, 36 + i % 48, 1 + (i // 48) % 127
                expected.append((at, note_on(0, pitch, velocity)))
                expected.append((at + step / 2, note_off(0, pitch, velocity)))
            scheduler.schedule_many(expected)
            time.sleep(max(0.0, expected[-1][0] - time.perf_counter()) + 0.2)
        stop_load.set()
        receiver_leaves = watch.graph_mark()
        receiver.stdin.write("stop\n")
        receiver.stdin.flush()
        arrivals = json.loads(receiver.stdout.readline())
    finally:
        stop_load.set()
        if load_thread is not None:
            load_thread.join()
        try:
            receiver.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            receiver.kill()
            receiver.wait()
        watch.settle(receiver_leaves)  # its client has left the graph
        midi_out.delete()
        watch.close()
    due_by_message = {msg: at for at, msg in expected}
    pairs = []
    for arrived, msg in arrivals:
        due = due_by_message.pop(tuple(msg), None)  # the closing All Notes Off matches nothing
        if due is not None:
            pairs.append((due, arrived))
    received = timing_report([due for due, _ in pairs], [arrived for _, arrived in pairs])
    sent = timing_report([at for at, _ in expected], [handed_over[msg] for _, msg in expected])
    return GridTiming(received=dataclasses.replace(received, missing=len(due_by_message)), sent=sent)
