"""`rwkv-music bench soak`: the daemon playing and answering for a long time at a fast tempo.

The daemon runs in autopilot (answer after answer, each fed back into its state) at an
accelerated tempo, and a peer process plays a short phrase into its input every few bars (so
it also hears, is taken over and answers the player) while recording everything the daemon
sends. Every half second a /rwkv/status request goes over real UDP and its reply time is kept.
Reported per window of `--window-minutes`:

- timing error of the daemon's output messages at the peer (arrival against the time the
  daemon scheduled them for), p50 / p99 / max;
- status reply time p50 / p99 / max; answers; notes dropped as late; resident memory;

and overall: resident memory of the daemon (this process and its engine process) after the
warm-up against the end, and whether the timing of the last window degraded against the first
(p99 more than 1.5 times that of the first window after the warm-up, plus 2 ms). `--check` makes either a failure
(exit status 1). It needs JACK: the running server, else a private dummy one.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import random
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EPILOG = """examples:
  rwkv-music bench soak                                  # 30 minutes, checkpoints/default.safetensors
  rwkv-music bench soak --minutes 5 --window-minutes 1   # a shorter run
  rwkv-music bench soak --random L6-D256 --tempo 240 --json --check
"""

# Memory may grow this much (percent) from the end of the warm-up to the end of the run.
RSS_GROWTH_LIMIT_PCT = 5.0
# The last window's p99 timing error may be this much worse than the first's before it counts
# as degraded: a factor, plus an absolute allowance for a few ms of scheduler noise.
DEGRADE_FACTOR = 1.5
DEGRADE_ALLOWANCE_MS = 2.0
STATUS_EVERY_S = 0.5
COLLECT_EVERY_S = 2.0
# Arrivals and scheduled messages older than this are forgotten (unmatched).
MATCH_HORIZON_S = 10.0
# A stop sends its note-offs and then All Notes Off within this long.
_STOP_BURST_S = 0.05
_ALL_NOTES_OFF = 123
_SUSTAIN_PEDAL = 64


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soak",
        help="long run of the daemon at a fast tempo: memory growth and timing per window (JACK)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    p.add_argument("--window-minutes", type=float, help="length of a report window (default 5, at most --minutes)")
    p.add_argument("--warmup-minutes", type=float, default=1.0,
                   help="memory is compared from the end of this (default 1)")
    p.add_argument("--tempo", type=float, default=300.0, help="BPM, 20..300 (default 300)")
    p.add_argument("--length", type=int, default=2, help="bars per answer (default 2)")
    p.add_argument("--phrase-every", type=int, default=8, metavar="BARS",
                   help="the peer plays a one-bar phrase every this many bars (default 8; 0 = never)")
    p.add_argument("--checkpoint", type=Path, help="model to play (default: checkpoints/default.safetensors)")
    p.add_argument("--random", metavar="LAYERS-DIM", help="a random model of this size instead, e.g. L6-D256")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--check", action="store_true",
                   help="exit status 1 when memory grew too much or the timing degraded")
    p.set_defaults(run=run)


@dataclass
class SoakWindow:
    index: int
    start_s: float  # seconds since the measurement began
    end_s: float
    messages: int  # output messages matched to their scheduled times
    error_p50_ms: float | None
    error_p99_ms: float | None
    error_max_ms: float | None
    status_requests: int
    status_p50_ms: float | None
    status_p99_ms: float | None
    status_max_ms: float | None
    status_unanswered: int
    answers: int
    late_dropped: int
    rss_mib: float


@dataclass
class SoakResult:
    machine: str
    model: str
    tempo: float
    minutes: float
    warmup_minutes: float
    rss_after_warmup_mib: float
    rss_end_mib: float
    rss_growth_pct: float
    memory_ok: bool
    timing_degraded: bool
    baseline_window: int  # the window the last one is compared with (the first after the warm-up)
    answers: int
    notes_played: int
    takeovers: int
    late_dropped: int
    failed: int
    phrases_played: int
    stop_messages: int  # releases sent by takeovers and stops: not scheduled, not measured
    windows: list[SoakWindow] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    from daemon.jack_server import ensure_jack_server
    from tools.bench_daemon import random_checkpoint
    from tools.cli import UserError

    if args.window_minutes is None:
        args.window_minutes = min(5.0, args.minutes)
    if not 0.2 <= args.minutes <= 24 * 60 or not 0.05 <= args.window_minutes <= args.minutes:
        raise UserError("--minutes must be 0.2..1440 and --window-minutes 0.05..--minutes")
    if not 0.0 <= args.warmup_minutes < args.minutes:
        raise UserError("--warmup-minutes must be 0 or more and less than --minutes")
    if not 20.0 <= args.tempo <= 300.0 or not 1 <= args.length <= 16 or args.phrase_every < 0:
        raise UserError("--tempo must be 20..300, --length 1..16, --phrase-every 0 or more")
    with tempfile.TemporaryDirectory(prefix="rwkv-soak-") as tmp:
        if args.random:
            checkpoint = random_checkpoint(args.random, Path(tmp) / "random.safetensors")
        else:
            checkpoint = args.checkpoint or Path("checkpoints/default.safetensors")
            if not checkpoint.is_file():
                raise UserError(f"checkpoint {checkpoint} not found (or use --random L6-D256)")
        with ensure_jack_server(log_path=Path(tmp) / "jackd.log"):
            result = soak(
                checkpoint, minutes=args.minutes, window_minutes=args.window_minutes,
                warmup_minutes=args.warmup_minutes, tempo=args.tempo, length=args.length,
                phrase_every=args.phrase_every,
            )
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        _print(result)
    if args.check and (not result.memory_ok or result.timing_degraded):
        return 1
    return 0


def soak(checkpoint: Path, *, minutes: float, window_minutes: float, warmup_minutes: float, tempo: float,
         length: int, phrase_every: int) -> SoakResult:
    """Run the daemon for `minutes` and measure (needs a running JACK server)."""
    from daemon.config import load_daemon_settings
    from daemon.osc_server import send_and_wait
    from daemon.runner import BackgroundDaemon
    from tools.bench import machine_description

    tag = f"{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    in_port, out_port = f"soak-in-{tag}", f"soak-out-{tag}"
    settings = load_daemon_settings(None, [
        "midi.api=jack", f'midi.in_port="{in_port}"', f'midi.out_port="{out_port}"', "osc.port=0",
        f"clock.tempo={tempo}", "daemon.mode=autopilot", f"daemon.length_bars={length}",
        "daemon.silence_beats=1.0", "daemon.watch=false", "daemon.seed=-1",
    ], checkpoint=checkpoint)
    with BackgroundDaemon(settings) as background:
        daemon = background.daemon
        assert daemon is not None and daemon.clock is not None
        clock = daemon.clock
        peer = SoakPeer(f"soak-peer-{tag}", f"{in_port}:{in_port}", f"{out_port}:{out_port}")
        try:
            host, port = daemon.osc_address
            matcher = TimingMatcher()
            rng = random.Random(0)
            start = time.perf_counter()
            end = start + minutes * 60.0
            warmup_end = start + warmup_minutes * 60.0
            window_s = window_minutes * 60.0
            windows: list[SoakWindow] = []
            window_start, window_index = start, 0
            status_times: list[float] = []
            unanswered = 0
            last_answer_id = 0
            rss_after_warmup: int | None = None
            stats_at_window = background.call(lambda: (daemon.stats.answers, daemon.stats.late_dropped))
            next_status = next_collect = start
            next_phrase_bar = clock.bar_index(clock.now_beat()) + 2
            phrases = 0
            while True:
                now = time.perf_counter()
                if now >= next_status:
                    next_status += STATUS_EVERY_S
                    t0 = time.perf_counter()
                    try:
                        send_and_wait(host, port, f"{settings.osc.prefix}/status", timeout=2.0)
                        status_times.append((time.perf_counter() - t0) * 1000.0)
                    except Exception:  # noqa: BLE001 - no reply: counted
                        unanswered += 1
                if phrase_every and clock.bar_index(clock.now_beat()) >= next_phrase_bar - 1:
                    peer.play(phrase(clock, next_phrase_bar, rng))
                    phrases += 1
                    next_phrase_bar += phrase_every
                if now >= next_collect or now >= end:
                    next_collect += COLLECT_EVERY_S
                    records = background.call(
                        lambda last=last_answer_id: [r for r in daemon.recent_answers if r.id > last]
                    )
                    for record in records:
                        matcher.add_scheduled(record.scheduled)
                        last_answer_id = max(last_answer_id, record.id)
                    matcher.add_arrivals(peer.dump())
                if rss_after_warmup is None and now >= warmup_end:
                    rss_after_warmup = process_tree_rss_kib(os.getpid(), exclude=peer.pid)
                if now - window_start >= window_s or now >= end:
                    answers, late = background.call(lambda: (daemon.stats.answers, daemon.stats.late_dropped))
                    windows.append(_window(
                        window_index, window_start - start, now - start, matcher.take_errors(), status_times,
                        unanswered, answers - stats_at_window[0], late - stats_at_window[1],
                        process_tree_rss_kib(os.getpid(), exclude=peer.pid),
                    ))
                    log.info("soak window %d: %s", window_index, windows[-1])
                    stats_at_window = (answers, late)
                    status_times, unanswered = [], 0
                    window_start, window_index = now, window_index + 1
                if now >= end:
                    break
                time.sleep(0.02)
            rss_end = process_tree_rss_kib(os.getpid(), exclude=peer.pid)
        finally:
            peer.close()
        stats = background.call(lambda: daemon.stats)
        model = daemon.model_id
    rss_warm = rss_after_warmup or windows[0].rss_mib * 1024
    growth = (rss_end - rss_warm) / rss_warm * 100.0
    # The baseline is the first window that starts after the warm-up: start-up (imports, first
    # answers, the peer connecting) is not what a long run should be compared with.
    baseline = next((w for w in windows if w.start_s >= warmup_minutes * 60.0 - 1e-6), windows[-1])
    first, last = baseline.error_p99_ms, windows[-1].error_p99_ms
    degraded = first is not None and last is not None and last > first * DEGRADE_FACTOR + DEGRADE_ALLOWANCE_MS
    return SoakResult(
        machine=machine_description(), model=model, tempo=tempo, minutes=minutes, warmup_minutes=warmup_minutes,
        rss_after_warmup_mib=round(rss_warm / 1024, 1), rss_end_mib=round(rss_end / 1024, 1),
        rss_growth_pct=round(growth, 2), memory_ok=growth < RSS_GROWTH_LIMIT_PCT, timing_degraded=degraded,
        baseline_window=baseline.index, answers=stats.answers, notes_played=stats.notes_played,
        takeovers=stats.takeovers, late_dropped=stats.late_dropped, failed=stats.failed, phrases_played=phrases,
        stop_messages=matcher.stop_messages, windows=windows,
    )


def phrase(clock: Any, bar: int, rng: random.Random) -> list[tuple[float, list[int]]]:
    """Four quarter notes of a C major scale in bar `bar`, as (perf_counter time, bytes)."""
    start = clock.bar_start_beat(bar)
    messages = []
    for i in range(4):
        pitch = 60 + rng.choice((0, 2, 4, 5, 7, 9, 11, 12))
        messages.append((clock.time_at(start + i), [0x90, pitch, 80]))
        messages.append((clock.time_at(start + i + 0.5), [0x80, pitch, 0]))
    return messages


class TimingMatcher:
    """Matches arrivals at the peer to the messages the daemon scheduled (same bytes, closest
    due time within half a second); keeps the errors (ms) until `take_errors`.

    A takeover (the peer's phrase over an answer) cancels what was scheduled and sends the
    sounding notes' note-offs at once, then All Notes Off: those note-offs were never scheduled
    for that moment, and matched to the cancelled ones they would count as hundreds of ms of
    error. So releases arriving just before an All Notes Off are left out, and arrivals are
    matched only once a little later traffic has been seen (a burst is never cut in two).
    """

    def __init__(self) -> None:
        self._scheduled: dict[tuple[int, ...], list[float]] = {}
        self._arrivals: list[tuple[float, tuple[int, ...]]] = []
        self._silences: list[float] = []  # arrival times of All Notes Off, the last few seconds
        self._errors: list[float] = []
        self.stop_messages = 0  # releases sent by a stop, not measured

    def add_scheduled(self, scheduled: Any) -> None:
        for due, message in scheduled:
            self._scheduled.setdefault(tuple(message), []).append(due)
        self._match()

    def add_arrivals(self, arrivals: list[tuple[float, tuple[int, ...]]]) -> None:
        for t, message in arrivals:
            if len(message) == 3 and message[0] & 0xF0 == 0xB0 and message[1] == _ALL_NOTES_OFF:
                self._silences.append(t)
        self._arrivals += arrivals
        self._match()

    def _from_a_stop(self, t: float, message: tuple[int, ...]) -> bool:
        kind = message[0] & 0xF0 if message else 0
        release = kind == 0x80 or (kind == 0x90 and message[2] == 0) or (
            kind == 0xB0 and message[1] == _SUSTAIN_PEDAL and message[2] < 64)
        return release and any(0.0 <= s - t <= _STOP_BURST_S for s in self._silences)

    def _match(self) -> None:
        now = time.perf_counter()
        horizon = now - MATCH_HORIZON_S
        settled = max((t for t, _ in self._arrivals), default=now) - _STOP_BURST_S
        waiting = []
        for t, message in self._arrivals:
            if t > settled:
                waiting.append((t, message))  # an All Notes Off may still follow
                continue
            if self._from_a_stop(t, message):
                self.stop_messages += 1
                continue
            dues = self._scheduled.get(message)
            best = min(range(len(dues)), key=lambda i: abs(dues[i] - t)) if dues else None
            if best is not None and abs(dues[best] - t) < 0.5:
                self._errors.append(abs(t - dues.pop(best)) * 1000.0)
            elif t > horizon:
                waiting.append((t, message))  # its answer's record may not be collected yet
        self._arrivals = waiting
        self._silences = [s for s in self._silences if s > horizon]
        for message, dues in list(self._scheduled.items()):
            dues[:] = [d for d in dues if d > horizon]
            if not dues:
                del self._scheduled[message]

    def take_errors(self) -> list[float]:
        errors, self._errors = self._errors, []
        return errors


def _percentiles(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return round(statistics.median(ordered), 3), round(p99, 3), round(ordered[-1], 3)


def _window(index: int, start_s: float, end_s: float, errors: list[float], status_ms: list[float],
            unanswered: int, answers: int, late: int, rss_kib: int) -> SoakWindow:
    e50, e99, emax = _percentiles(errors)
    s50, s99, smax = _percentiles(status_ms)
    return SoakWindow(index, round(start_s, 1), round(end_s, 1), len(errors), e50, e99, emax, len(status_ms),
                      s50, s99, smax, unanswered, answers, late, round(rss_kib / 1024, 1))


def process_tree_rss_kib(pid: int, exclude: int | None = None) -> int:
    """Resident memory (KiB) of process `pid` and its descendants, without the subtree of
    `exclude` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        if current == exclude:
            continue
        todo += children.get(current, [])
        try:
            with open(f"/proc/{current}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total


class SoakPeer:
    """The player and recorder: `soak_peer_main` in a process of its own, driven over stdin."""

    def __init__(self, client: str, daemon_input: str, daemon_output: str):
        program = "from tools.soak import soak_peer_main; soak_peer_main()"
        self._process = subprocess.Popen(
            [sys.executable, "-c", program, client, daemon_input, daemon_output],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"the soak peer could not connect to the daemon's ports ({line!r})")

    @property
    def pid(self) -> int:
        return self._process.pid

    def _command(self, text: str) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(text + "\n")
        self._process.stdin.flush()

    def play(self, messages: list[tuple[float, list[int]]]) -> None:
        self._command("play " + json.dumps(messages))

    def dump(self) -> list[tuple[float, tuple[int, ...]]]:
        """Messages received from the daemon since the last dump: (arrival time, bytes)."""
        assert self._process.stdout is not None
        self._command("dump")
        return [(t, tuple(m)) for t, m in json.loads(self._process.stdout.readline())]

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._command("stop")
                self._process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()


def soak_peer_main() -> None:
    """The peer process (argv: client name, daemon input port, daemon output port): plays what
    "play <json>" lines schedule, records what the daemon sends, answers "dump" with a JSON
    line of arrivals, ends on "stop" or when stdin closes. Imports rtmidi, daemon.midi_events
    and daemon.jack_watch only, and polls rtmidi's queue (no Python callback on JACK's thread)."""
    import rtmidi

    from daemon.jack_watch import JackServerWatch
    from daemon.midi_events import ArrivalStamper

    client, daemon_input, daemon_output = sys.argv[1:4]
    # Each change of the graph settles before the next, at the end too (daemon.jack_watch:
    # libjack crashes a client that registers or unregisters a port while it handles a
    # notification).
    with JackServerWatch(f"{client} watch") as watch:
        with watch.change():
            midi_in = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name=client, queue_size_limit=65536)
        midi_in.ignore_types(sysex=False, timing=False, active_sense=False)
        with watch.change():
            midi_in.open_port(midi_in.get_ports().index(daemon_output), "in")
        with watch.change():
            midi_out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=client)
        with watch.change():
            midi_out.open_port(midi_out.get_ports().index(daemon_input), "out")
        print("ready", flush=True)
        stamper = ArrivalStamper()
        arrivals: list[tuple[float, list[int]]] = []
        pending: list[tuple[float, int, list[int]]] = []
        order = 0
        running = True
        while running:
            while (message := midi_in.get_message()) is not None:
                arrivals.append((stamper.stamp(message[1], time.perf_counter()), message[0]))
            now = time.perf_counter()
            while pending and pending[0][0] <= now:
                midi_out.send_message(heapq.heappop(pending)[2])
            wait = 0.001 if not pending else max(0.0, min(0.001, pending[0][0] - now))
            if not select.select([sys.stdin], [], [], wait)[0]:
                continue
            line = sys.stdin.readline()
            if not line or line.strip() == "stop":
                running = False
            elif line.startswith("play "):
                for due, data in json.loads(line[5:]):
                    heapq.heappush(pending, (due, order, data))
                    order += 1
            elif line.strip() == "dump":
                print(json.dumps(arrivals), flush=True)
                arrivals = []
        for port in (midi_in, midi_out):
            with watch.change():
                port.close_port()
            with watch.change():
                port.delete()


def _print(r: SoakResult) -> None:
    def ms(value: float | None) -> str:
        return "   n/a" if value is None else f"{value:6.2f}"

    print(f"machine: {r.machine}")
    print(f"model:   {r.model}, {r.tempo:g} BPM, {r.minutes:g} min, warm-up {r.warmup_minutes:g} min")
    print("window  minutes      msgs  err p50   p99    max  | status p50   p99    max  lost | answers late  RSS MiB")
    for w in r.windows:
        print(f"{w.index:6d}  {w.start_s / 60:5.1f}-{w.end_s / 60:5.1f} {w.messages:6d} {ms(w.error_p50_ms)} "
              f"{ms(w.error_p99_ms)} {ms(w.error_max_ms)} | {ms(w.status_p50_ms)} {ms(w.status_p99_ms)} "
              f"{ms(w.status_max_ms)} {w.status_unanswered:4d} | {w.answers:7d} {w.late_dropped:4d} {w.rss_mib:8.1f}")
    print(f"memory: {r.rss_after_warmup_mib:.1f} MiB after the warm-up, {r.rss_end_mib:.1f} MiB at the end "
          f"({r.rss_growth_pct:+.2f}%, limit {RSS_GROWTH_LIMIT_PCT:g}%): {'ok' if r.memory_ok else 'TOO MUCH'}")
    print(f"timing: {'DEGRADED' if r.timing_degraded else 'not degraded'} "
          f"(p99 of the last window against window {r.baseline_window}, the first after the warm-up)")
    print(f"totals: {r.answers} answers, {r.notes_played} notes played, {r.takeovers} takeovers, "
          f"{r.phrases_played} phrases from the peer, {r.late_dropped} notes dropped late, {r.failed} failed; "
          f"{r.stop_messages} releases sent by stops (not measured)")
