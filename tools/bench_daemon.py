"""`rwkv-music bench daemon`: the daemon's timing through real JACK ports.

The daemon runs in autopilot (it answers bar after bar on its own, feeding what it plays back
into its state), or with --phrase in call-and-response: a player in another process plays the
first bars of a MIDI file into its input again and again, and the daemon answers each one at
the next bar line. Its output port is wired to a recording JACK client in another process, so
the recorder's own interpreter lock waits do not count. Reported:

- the timing error of every output message the daemon scheduled (note-ons, note-offs, pedal)
  against the time it was scheduled for (its grid time): p50, p99, max;
- per answer, how long before its bar line the first note was ready (scheduled), and the
  whole generation time; notes dropped as too late;
- the time to feed one bar of tokens to the engine (its model step per token, the state kept).

With --watcher on, `rwkv-music watch` runs beside it (another process, drawing every frame as
for a terminal, into /dev/null) subscribed to the daemon's note and status events; --watcher
both measures without and then with it, one run after the other; --watcher interleaved runs
once and takes the watcher away and back every INTERLEAVE_BARS bars (paused with SIGSTOP and
unsubscribed, then subscribed and resumed), so that both figures come from the same minutes of a
shared machine's load: the output timing is split by the time each message was due.

It needs JACK: it uses the server JACK_DEFAULT_SERVER names when one runs, else starts a
private dummy server (-r 48000 -p 32, a 0.67 ms period). The figures include JACK's delivery
(up to one period). Compare figures taken on the same machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

EPILOG = """examples:
  rwkv-music bench daemon                           # checkpoints/default.safetensors, 8 bars
  rwkv-music bench daemon --random L6-D256 --bars 16   # a random model of the default's size
  rwkv-music bench daemon --checkpoint runs/mine/latest.safetensors --json
  rwkv-music bench daemon --phrase examples/satie-gymnopedie-1.mid --bars 64   # answers to a piano phrase
  rwkv-music bench daemon --bars 32 --watcher interleaved  # does a subscribed `rwkv-music watch` slow the output?
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "daemon",
        help="output timing, answer readiness and feed time of the running daemon (JACK)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, help="model to play (default: checkpoints/default.safetensors)")
    p.add_argument("--random", metavar="LAYERS-DIM", help="a random model of this size instead, e.g. L6-D256")
    p.add_argument("--bars", type=int, default=8, help="bars to measure (default 8)")
    p.add_argument("--tempo", type=float, default=120.0, help="BPM (default 120)")
    p.add_argument("--length", type=int, default=2, help="bars per answer (default 2)")
    p.add_argument("--phrase", type=Path, metavar="MIDI",
                   help="call-and-response: play this file's first --phrase-bars bars, answer, repeat")
    p.add_argument("--phrase-bars", type=int, default=2, help="bars of the phrase to play (default 2)")
    p.add_argument("--watcher", choices=("off", "on", "both", "interleaved"), default="off",
                   help="run `rwkv-music watch` subscribed to the daemon: off (default), on, both (a run "
                   "without, then one with) or interleaved (one run, the watcher away every other "
                   f"{INTERLEAVE_BARS} bars); both and interleaved print the difference")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=run)


FIRST_NOTE_LATE_MS = 5.0
INTERLEAVE_BARS = 2
GENERATION_WAIT_S = 30.0  # how long the last answers may still generate after the timed bars


@dataclass
class DaemonBenchResult:
    machine: str
    model: str
    tempo: float
    bars: int
    mode: str  # "autopilot", or the phrase answered
    watcher: bool  # a `rwkv-music watch` was subscribed
    messages: int  # output messages measured
    error_p50_ms: float
    error_p99_ms: float
    error_max_ms: float
    handover_p50_ms: float  # due time to rtmidi having the message: what the scheduler controls
    handover_p99_ms: float
    handover_max_ms: float
    answers: int
    first_notes_late: int  # answers whose first note arrived more than FIRST_NOTE_LATE_MS late
    ready_before_bar_min_ms: float | None  # the tightest answer: bar line minus first note ready
    ready_before_bar_p50_ms: float | None
    generation_p50_ms: float | None  # one whole answer
    late_dropped: int
    feed_bar_p50_ms: float  # feeding one bar of tokens to the engine
    feed_bar_max_ms: float
    tokens_per_bar: float


def run(args: argparse.Namespace) -> int:
    from daemon.jack_server import ensure_jack_server
    from tools.cli import UserError

    if args.bars < 2 or not 20.0 <= args.tempo <= 300.0 or not 1 <= args.length <= 16:
        raise UserError("--bars must be >= 2, --tempo 20..300, --length 1..16")
    phrase = None
    if args.phrase is not None:
        from tools.demo import read_phrase

        if not 1 <= args.phrase_bars <= 16:
            raise UserError("--phrase-bars must be 1..16")
        phrase = read_phrase(args.phrase, args.phrase_bars)
        if args.bars < phrase.bars + args.length + 2:
            raise UserError(f"--bars must hold at least one phrase and its answer ({phrase.bars + args.length + 2})")
    runs = {"off": ["off"], "on": ["on"], "both": ["off", "on"], "interleaved": ["interleaved"]}[args.watcher]
    results = []
    with tempfile.TemporaryDirectory(prefix="rwkv-bench-daemon-") as tmp:
        checkpoint = _checkpoint(args, Path(tmp))
        with ensure_jack_server(log_path=Path(tmp) / "jackd.log"):
            for watcher in runs:
                results += measure(checkpoint, bars=args.bars, tempo=args.tempo, length=args.length,
                                   phrase=phrase, watcher=watcher)
    if args.json:
        print(json.dumps([asdict(r) for r in results] if len(results) > 1 else asdict(results[0]), indent=2))
        return 0
    for result in results:
        _print(result)
    if len(results) == 2:
        without, with_ = results
        if args.watcher == "interleaved":  # one run: the hand-over figures are the whole run's
            print(f"watcher's cost (interleaved every {INTERLEAVE_BARS} bars): output p99 "
                  f"{with_.error_p99_ms - without.error_p99_ms:+.2f} ms, "
                  f"p50 {with_.error_p50_ms - without.error_p50_ms:+.2f} ms")
        else:
            print(f"watcher's cost: output p99 {with_.error_p99_ms - without.error_p99_ms:+.2f} ms, "
                  f"scheduler hand-over p99 {with_.handover_p99_ms - without.handover_p99_ms:+.2f} ms")
    return 0


def _checkpoint(args: argparse.Namespace, tmp: Path) -> Path:
    from tools.cli import UserError

    if args.random:
        return random_checkpoint(args.random, tmp / "random.safetensors")
    path = args.checkpoint or Path("checkpoints/default.safetensors")
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found (or use --random L6-D256)")
    return path


def random_checkpoint(size: str, path: Path) -> Path:
    """A checkpoint of random weights of size "L<layers>-D<channels>" (timing only)."""
    import torch

    from model.checkpoint import CheckpointMeta, save
    from model.rwkv7 import RWKV7, ModelConfig
    from model.vocab import DEFAULT_TOKENIZER_PARAMS, build_tokenizer, vocab_hash
    from tools.cli import UserError

    try:
        layers, dim = (int(part[1:]) for part in size.upper().split("-"))
    except ValueError as err:
        raise UserError(f"--random {size!r}: expected LAYERS-DIM such as L6-D256") from err
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = RWKV7(ModelConfig(n_layer=layers, n_embd=dim, vocab_size=len(tokenizer)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save(model, path, CheckpointMeta(model.cfg, DEFAULT_TOKENIZER_PARAMS, vocab_hash(tokenizer)))
    return path


def measure(checkpoint: Path, *, bars: int, tempo: float, length: int, phrase=None,
            watcher: str = "off") -> list[DaemonBenchResult]:
    """Run the daemon for `bars` bars and measure (needs a running JACK server): in autopilot, or
    answering `phrase` (a tools.demo.Phrase) played again and again when one is given. `watcher`:
    "off", "on" (a `rwkv-music watch` subscribed all along): one result; "interleaved" (the
    watcher there in every other INTERLEAVE_BARS bars): the result without it, then with it."""
    from daemon.config import load_daemon_settings
    from daemon.runner import BackgroundDaemon
    from tools.soak import SoakPeer

    tag = f"{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    in_port, out_port = f"bench-in-{tag}", f"bench-out-{tag}"
    mode = ["daemon.mode=call_response", f'clock.meter="{phrase.meter}"'] if phrase else ["daemon.mode=autopilot"]
    settings = load_daemon_settings(None, [
        "midi.api=jack", f'midi.in_port="{in_port}"', f'midi.out_port="{out_port}"', "osc.port=0",
        f"clock.tempo={tempo}", *mode, f"daemon.length_bars={length}",
        "daemon.watch=false", "daemon.seed=1", 'cc.learn_file=""',
    ], checkpoint=checkpoint)
    program = "from daemon.scheduler import record_arrivals_main; record_arrivals_main()"
    with BackgroundDaemon(settings) as background:
        daemon = background.daemon
        assert daemon is not None
        receiver = subprocess.Popen(
            [sys.executable, "-c", program, f"{out_port}:{out_port}", f"bench-recv-{tag}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert receiver.stdin is not None and receiver.stdout is not None
        watch = start_watcher(background) if watcher != "off" else None
        try:
            if receiver.stdout.readline().strip() != "ready":
                raise RuntimeError("the recording client could not connect to the daemon's output")
            # The player connects before the timeline is set: on a busy machine starting its
            # process takes seconds, and a phrase due before it could play would be lost.
            player = None
            if phrase is not None:
                player = SoakPeer(f"bench-player-{tag}", f"{in_port}:{in_port}", f"{out_port}:{out_port}")
            clock = daemon.clock
            assert clock is not None
            start_bar = clock.bar_index(clock.now_beat()) + 1
            end_beat = clock.bar_start_beat(start_bar + bars)
            if player is not None:
                player.play(phrase_messages(clock, phrase, start_bar + 1, start_bar + bars, length))
            if watcher == "interleaved":
                assert watch is not None
                interleave_watcher(background, watch, clock, start_bar, bars)
            time.sleep(max(0.0, clock.time_at(end_beat) - time.perf_counter()) + 0.3)
            if player is not None:
                player.close()
            receiver.stdin.write("stop\n")
            receiver.stdin.flush()
            arrivals = json.loads(receiver.stdout.readline())
        finally:
            try:
                receiver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                receiver.kill()
            if watch is not None:
                watch.send_signal(signal.SIGCONT)
                watch.terminate()
                watch.wait(timeout=10)
        wait_for_generations(background)
        records = background.call(lambda: list(daemon.recent_answers))
        stats = background.call(lambda: daemon.stats)
        handover = sorted(abs(x) * 1000.0 for x in daemon.scheduler.recent_lateness())
        timed_errors = match_errors_at(arrivals, [item for r in records for item in r.scheduled])
        model_id = daemon.model_id
        engine_meta = daemon.engine.meta if daemon.engine is not None else None
    feed_ms, tokens_per_bar = feed_bar_times(checkpoint)
    if watcher == "interleaved":
        with_watcher = {True: [], False: []}
        for due, error in timed_errors:
            segment = (clock.bar_index(clock.beat_at(due)) - start_bar) // INTERLEAVE_BARS
            with_watcher[segment % 2 == 1].append(error)
        splits = [(False, with_watcher[False]), (True, with_watcher[True])]
    else:
        splits = [(watcher == "on", [error for _, error in timed_errors])]
    return [
        _result(records, stats, arrivals, errors, handover, model_id, engine_meta, feed_ms, tokens_per_bar,
                tempo=tempo, bars=bars, phrase=phrase, watcher=watched)
        for watched, errors in splits
    ]


def _result(records, stats, arrivals, errors, handover, model_id, engine_meta, feed_ms, tokens_per_bar, *,
            tempo: float, bars: int, phrase, watcher: bool) -> DaemonBenchResult:
    from tools.bench import machine_description

    errors.sort()
    ready = sorted(r.ready_before_bar_ms for r in records if r.ready_before_bar_ms is not None)
    generation = [r.generation_ms for r in records]
    cfg = engine_meta.model_config if engine_meta is not None else None
    model = f"{model_id} (L{cfg.n_layer}-D{cfg.n_embd})" if cfg is not None else model_id
    return DaemonBenchResult(
        machine=machine_description(),
        model=model,
        tempo=tempo,
        bars=bars,
        mode="autopilot" if phrase is None else f"answering {phrase.path.name} ({phrase.bars} bars, {phrase.meter})",
        watcher=watcher,
        messages=len(errors),
        error_p50_ms=_percentile(errors, 0.5),
        error_p99_ms=_percentile(errors, 0.99),
        error_max_ms=errors[-1] if errors else float("nan"),
        handover_p50_ms=_percentile(handover, 0.5),
        handover_p99_ms=_percentile(handover, 0.99),
        handover_max_ms=handover[-1] if handover else float("nan"),
        answers=len(records),
        first_notes_late=sum(late > FIRST_NOTE_LATE_MS for late in first_note_lateness(arrivals, records)),
        ready_before_bar_min_ms=ready[0] if ready else None,
        ready_before_bar_p50_ms=statistics.median(ready) if ready else None,
        generation_p50_ms=statistics.median(generation) if generation else None,
        late_dropped=stats.late_dropped,
        feed_bar_p50_ms=statistics.median(feed_ms),
        feed_bar_max_ms=max(feed_ms),
        tokens_per_bar=tokens_per_bar,
    )


def wait_for_generations(background, limit_s: float = GENERATION_WAIT_S) -> None:
    """Until every answer's generation has ended and been recorded (at most `limit_s`): on a
    busy machine the last answer's may still be running when its bars are over, and an answer
    is only recorded once it ends."""
    daemon = background.daemon

    def generating() -> bool:
        return any(live.future is not None and not live.future.done() for live in daemon.live_answers.values())

    deadline = time.monotonic() + limit_s
    while background.call(generating) and time.monotonic() < deadline:
        time.sleep(0.05)
    background.call(lambda: None)  # the loop has run the completion callbacks queued before


def interleave_watcher(background, watch: subprocess.Popen, clock, start_bar: int, bars: int) -> None:
    """Until the last bar: every INTERLEAVE_BARS bars, take the watcher away (unsubscribed, its
    process paused) or bring it back (subscribed, resumed); it starts away."""
    daemon = background.daemon
    address = background.call(lambda: daemon.subscribers.addresses[0])
    for index, bar in enumerate(range(start_bar, start_bar + bars, INTERLEAVE_BARS)):
        time.sleep(max(0.0, clock.time_at(clock.bar_start_beat(bar)) - time.perf_counter()))
        if index % 2 == 0:
            background.call(daemon.subscribers.unsubscribe, *address)
            watch.send_signal(signal.SIGSTOP)
        else:
            background.call(daemon.subscribers.subscribe, *address)
            watch.send_signal(signal.SIGCONT)


def start_watcher(background) -> subprocess.Popen:
    """`rwkv-music watch` on the daemon, drawing every frame as on a 120x50 terminal into
    /dev/null; returns once the daemon counts it as a subscriber."""
    daemon = background.daemon
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "120", "LINES": "50", "TERM": "xterm-256color"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tools", "watch", "--port", str(daemon.osc_address[1])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    deadline = time.monotonic() + 20.0
    while not background.call(lambda: len(daemon.subscribers or ())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("`rwkv-music watch` did not subscribe to the daemon")
        time.sleep(0.1)
    return process


def phrase_messages(clock, phrase, first_bar: int, end_bar: int, length: int) -> list[tuple[float, list[int]]]:
    """The phrase played from bar `first_bar` on, again every phrase + answer + 2 bars (room for
    the silence that starts the answer and for a bar of rest), all before `end_bar`:
    (perf_counter time, bytes) for the player."""
    cycle = phrase.bars + length + 2
    return [(due, list(message))
            for bar in range(first_bar, end_bar - cycle + 1, cycle)
            for due, message in phrase.timed_messages(clock, clock.bar_start_beat(bar))]


def first_note_lateness(arrivals: list[list], records) -> list[float]:
    """Per answer with notes: arrival minus due time (ms, signed) of its first note-on."""
    lateness = []
    for record in records:
        ons = [(due, tuple(msg)) for due, msg in record.scheduled if msg[0] & 0xF0 == 0x90 and msg[2] > 0]
        if not ons:
            continue
        due, message = min(ons)
        times = [t for t, m in arrivals if tuple(m) == message and abs(t - due) < 0.5]
        if times:
            lateness.append((min(times, key=lambda t: abs(t - due)) - due) * 1000.0)
    return lateness


def match_errors(arrivals: list[list], scheduled: list[tuple[float, tuple[int, ...]]]) -> list[float]:
    """|arrival - due| in ms of every received message matched to the message the daemon
    scheduled with the same bytes and the closest due time (within half a second)."""
    return [error for _, error in match_errors_at(arrivals, scheduled)]


def match_errors_at(arrivals: list[list], scheduled: list[tuple[float, tuple[int, ...]]]) -> list[tuple[float, float]]:
    """`match_errors` with the due time (perf_counter seconds) of each matched message."""
    by_bytes: dict[tuple[int, ...], list[float]] = {}
    for due, message in scheduled:
        by_bytes.setdefault(tuple(message), []).append(due)
    errors = []
    for t, message in arrivals:
        dues = by_bytes.get(tuple(message))
        if not dues:
            continue  # the closing note-offs and All Notes Off were never scheduled
        best = min(range(len(dues)), key=lambda i: abs(dues[i] - t))
        if abs(dues[best] - t) < 0.5:
            due = dues.pop(best)
            errors.append((due, abs(t - due) * 1000.0))
    return errors


def feed_bar_times(checkpoint: Path, bars: int = 16) -> tuple[list[float], float]:
    """Milliseconds to feed each of `bars` bars of tokens (sampled from the model itself) to a
    fresh engine, one bar at a time as the daemon's encoder would; and tokens per bar."""
    import torch

    from daemon.engine import Engine
    from model.checkpoint import load
    from model.sampling import SamplingSettings

    torch.set_num_threads(1)  # as the daemon runs it (daemon.threads = 1)
    model, meta = load(checkpoint)
    engine = Engine(model, meta)
    tokens = engine.generate(bars, SamplingSettings(temperature=1.0, top_p=0.95), seed=0).tokens[0]
    bar_ids, current = [], []
    for token in tokens:
        if token == engine.bar_id and current:
            bar_ids.append(current)
            current = []
        current.append(token)
    bar_ids.append(current)
    times = []
    for ids in bar_ids:
        t0 = time.perf_counter()
        engine.feed(ids)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times, sum(map(len, bar_ids)) / len(bar_ids)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def _print(r: DaemonBenchResult) -> None:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} ms"

    print(f"machine: {r.machine}")
    print(f"model:   {r.model}, {r.tempo:g} BPM, {r.bars} bars, {r.mode}"
          f"{', rwkv-music watch subscribed' if r.watcher else ''}")
    print(f"output timing ({r.messages} messages vs their grid times, through JACK): "
          f"p50 {r.error_p50_ms:.2f} ms, p99 {r.error_p99_ms:.2f} ms, max {r.error_max_ms:.2f} ms")
    print(f"  of which the scheduler (due time -> handed to rtmidi): p50 {r.handover_p50_ms:.2f} ms, "
          f"p99 {r.handover_p99_ms:.2f} ms, max {r.handover_max_ms:.2f} ms")
    print(f"answers: {r.answers}; first note ready before the bar line: min {ms(r.ready_before_bar_min_ms)}, "
          f"median {ms(r.ready_before_bar_p50_ms)}; generation median {ms(r.generation_p50_ms)}; "
          f"notes dropped as late: {r.late_dropped}; first notes more than {FIRST_NOTE_LATE_MS:g} ms late: "
          f"{r.first_notes_late} of {r.answers}")
    print(f"feed one bar ({r.tokens_per_bar:.0f} tokens): median {r.feed_bar_p50_ms:.1f} ms, "
          f"max {r.feed_bar_max_ms:.1f} ms")
