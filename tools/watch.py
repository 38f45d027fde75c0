"""`rwkv-music watch`: a live terminal view of a running daemon.

It subscribes over OSC (`/rwkv/subscribe i:<its port>`, renewed every RENEW_S, so the daemon
forgets it soon after it stops; `/rwkv/unsubscribe` on exit) and draws, several times a second
with rich: tempo, bar and beat, clock, mode, temperature / top-p / length, the model, counters,
the CC map, and a piano roll of the last bars that scrolls to the left, the player's notes and
the daemon's answers drawn with different characters (and colours), bar lines between the bars.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.osc_cli import DEFAULT_CONFIG

RENEW_S = 2.0  # well inside the daemon's lease (daemon.subscribers.LEASE_S)
COLUMNS_PER_BEAT = 4
MAX_ROWS = 36  # piano roll rows at most (fewer on a smaller terminal)
PLAYER, ANSWER, BOTH = "█", "▒", "▓"
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

EPILOG = f"""examples:
  rwkv-music watch                        # the daemon of config.toml's [osc] (127.0.0.1:9000)
  rwkv-music watch --port 9001 --bars 8   # another daemon, a longer piano roll
  rwkv-music watch --host 192.168.1.20    # a daemon on another computer ([osc] host = "0.0.0.0" there)

Piano roll: {PLAYER} the player, {ANSWER} the daemon's answer, {BOTH} both on one key, | a bar line;
time runs to the left, the right edge is now. Ctrl-C ends it.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watch",
        help="a live terminal view of a running daemon: settings, counters and a piano roll",
        description="Subscribe to a running `rwkv-music daemon` over OSC and show what it hears and plays.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", help="daemon host (default: [osc] host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="daemon UDP port (default: [osc] port, else 9000)")
    p.add_argument("--config", type=Path, help=f"config.toml for the defaults (default: {DEFAULT_CONFIG} if present)")
    p.add_argument("--bars", type=int, default=4, help="bars in the piano roll, 1..16 (default 4)")
    p.add_argument("--fps", type=float, default=5.0, help="redraws per second, 1..30 (default 5)")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default 0: until Ctrl-C)")
    p.set_defaults(run=run_watch)


def note_name(pitch: int) -> str:
    return f"{NOTE_NAMES[pitch % 12]}{pitch // 12 - 1}"


@dataclass
class _Note:
    who: str
    pitch: int
    start: float  # clock beats
    end: float | None = None  # None: still sounding


@dataclass
class WatchState:
    """What the view knows: the last status, the notes of the last bars, when it last heard."""

    status: dict[str, Any] = field(default_factory=dict)
    status_at: float = 0.0  # monotonic time the status arrived
    notes: list[_Note] = field(default_factory=list)
    recent: dict[str, collections.deque[str]] = field(
        default_factory=lambda: {"player": collections.deque(maxlen=12), "answer": collections.deque(maxlen=12)}
    )
    error: str | None = None
    subscribed: bool = False

    def on_message(self, address: str, args: tuple[Any, ...], now: float) -> None:
        from daemon.osc_server import status_values

        if address.endswith("/status"):
            self.status = status_values(args)
            self.status_at = now
        elif address.endswith("/notes"):
            for i in range(0, len(args) - 3, 4):
                self._note(str(args[i]), int(args[i + 1]), int(args[i + 2]), float(args[i + 3]))
        elif address.endswith("/ack"):
            self.subscribed = True
            self.error = None
        elif address.endswith("/error"):
            self.error = str(args[1]) if len(args) > 1 else "refused"

    def _note(self, who: str, pitch: int, velocity: int, beat: float) -> None:
        if velocity > 0:
            self.notes.append(_Note(who, pitch, beat))
            self.recent.setdefault(who, collections.deque(maxlen=12)).append(note_name(pitch))
            return
        for note in reversed(self.notes):
            if note.who == who and note.pitch == pitch and note.end is None:
                note.end = beat
                return

    def beat_now(self, now: float) -> float | None:
        """The daemon's beat now, extrapolated from the last status at its tempo."""
        if "beat" not in self.status:
            return None
        if not self.status.get("clock_running", True):
            return float(self.status["beat"])
        return float(self.status["beat"]) + (now - self.status_at) * float(self.status.get("tempo", 120.0)) / 60.0

    def forget_before(self, beat: float) -> None:
        self.notes = [n for n in self.notes if n.end is None or n.end >= beat]


def beats_per_bar(meter: str) -> float:
    try:
        numerator, denominator = (int(part) for part in meter.split("/"))
        return numerator * 4.0 / denominator
    except (ValueError, AttributeError):
        return 4.0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return "-" if value is None else str(value)


def render(state: WatchState, now: float, bars: int, target: str, height: int = 50) -> Any:
    """The whole view as a rich renderable."""
    from rich.console import Group
    from rich.text import Text

    s = state.status
    head = _Header()
    if not s:
        waiting = state.error or f"waiting for the daemon at {target}"
        return Group(Text(f"rwkv-music watch: {waiting}", style="yellow"))
    beat = state.beat_now(now) or 0.0
    per_bar = beats_per_bar(str(s.get("meter", "4/4")))
    bar_number = int(beat // per_bar)
    running = "running" if s.get("clock_running") else "stopped"
    head.add_row("tempo", f"{_fmt(s.get('tempo'))} BPM  {s.get('meter', '')}  clock {s.get('clock', '')} ({running})")
    head.add_row("position", f"bar {bar_number + 1}  beat {beat - bar_number * per_bar + 1:.1f}")
    head.add_row("mode", str(s.get("mode", "")))
    head.add_row("sampling", f"temperature {_fmt(s.get('temperature'))}  top_p {_fmt(s.get('top_p'))}  "
                             f"length {_fmt(s.get('length'))} bars  silence {_fmt(s.get('silence_beats'))} beats")
    head.add_row("model", f"{s.get('model_id', '')} (step {_fmt(s.get('model_step'))}, {s.get('device', '')})")
    head.add_row("counters", f"answers {_fmt(s.get('answers'))}  late {_fmt(s.get('late_dropped'))}  "
                             f"takeovers {_fmt(s.get('takeovers'))}  reloads {_fmt(s.get('reloads'))}  "
                             f"notes in {_fmt(s.get('input_notes'))} out {_fmt(s.get('notes_played'))}")
    cc = s.get("cc")
    learning = s.get("cc_learning")
    cc_text = _cc_text(cc) + (f"  (learning {learning}: move a control)" if learning else "")
    head.add_row("CC", cc_text)
    head.add_row("player", " ".join(state.recent.get("player", ())))
    head.add_row("answer", " ".join(state.recent.get("answer", ())))
    if state.error:
        head.add_row("error", Text(state.error, style="red"))
    roll_rows = max(4, min(MAX_ROWS, height - head.rows - 3))
    return Group(head.text, Text(""), piano_roll(state.notes, beat, bars, per_bar, roll_rows))


class _Header:
    """Label/value lines (a plain Text: a rich Table costs several times more to draw per frame)."""

    WIDTH = 10

    def __init__(self) -> None:
        from rich.text import Text

        self.text = Text(no_wrap=True, overflow="ellipsis")
        self.rows = 0

    def add_row(self, label: str, value: Any) -> None:
        if self.rows:
            self.text.append("\n")
        self.text.append(f"{label:<{self.WIDTH}}", style="bold")
        self.text.append(value)
        self.rows += 1


def _cc_text(cc: Any) -> str:
    import json

    if isinstance(cc, str):
        try:
            cc = json.loads(cc)
        except ValueError:
            return cc
    if not cc:
        return "nothing mapped"
    return "  ".join(f"{target} {binding}" for target, binding in cc.items())


def piano_roll(notes: list[_Note], now_beat: float, bars: int, per_bar: float, max_rows: int = MAX_ROWS) -> Any:
    """The last `bars` bars up to `now_beat`: one row per pitch (high at the top; when the notes
    span more than `max_rows` keys, only the keys that sound), one column per 1/COLUMNS_PER_BEAT
    beat, the right edge now."""
    from rich.text import Text

    columns = int(round(bars * per_bar * COLUMNS_PER_BEAT))
    left = now_beat - columns / COLUMNS_PER_BEAT
    visible = [n for n in notes if (n.end is None or n.end > left) and n.start <= now_beat]
    pitches = sorted({n.pitch for n in visible})
    if not pitches:
        rows = list(range(71, 59, -1))[:max_rows]
    elif pitches[-1] - pitches[0] < max_rows:
        rows = list(range(pitches[-1], pitches[0] - 1, -1))  # every key of the range
    else:
        rows = pitches[::-1][:max_rows]  # too wide for the screen: only the keys that sound
    cells: dict[tuple[int, int], str] = {}
    shown = set(rows)
    for note in visible:
        if note.pitch not in shown:
            continue
        end = now_beat if note.end is None else note.end
        first = max(0, int((note.start - left) * COLUMNS_PER_BEAT))
        last = min(columns - 1, int((end - left) * COLUMNS_PER_BEAT - 1e-9))
        for column in range(first, max(first, last) + 1):
            key = (note.pitch, column)
            cells[key] = BOTH if cells.get(key) not in (None, note.who) else note.who
    bar_columns = set()
    for column in range(columns):
        beat = left + column / COLUMNS_PER_BEAT
        if int(beat // per_bar) != int((beat - 1.0 / COLUMNS_PER_BEAT) // per_bar):
            bar_columns.add(column)
    text = Text(no_wrap=True, overflow="crop")  # no wrapping to compute: the cheapest to draw
    styles = {"player": ("cyan", PLAYER), "answer": ("magenta", ANSWER), BOTH: ("bold white", BOTH)}
    for pitch in rows:
        text.append(f"{note_name(pitch):>4} ", style="dim" if pitch % 12 else "bold")
        run, run_style = [], ""
        for column in range(columns):  # one span per run of equal cells: fewer objects to draw
            who = cells.get((pitch, column))
            style, char = styles[who] if who is not None else ("dim", "|" if column in bar_columns else " ")
            if style != run_style and run:
                text.append("".join(run), style=run_style)
                run = []
            run_style = style
            run.append(char)
        text.append("".join(run) + "\n", style=run_style)
    text.append(f"     {PLAYER} player  {ANSWER} answer  {BOTH} both  | bar line  (now at the right)", style="dim")
    return text


def run_watch(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from daemon.osc_server import build_message
    from tools.cli import UserError
    from tools.osc_cli import daemon_osc_target

    if not 1 <= args.bars <= 16 or not 1.0 <= args.fps <= 30.0 or args.seconds < 0:
        raise UserError("--bars must be 1..16, --fps 1..30, --seconds >= 0")
    host, port, prefix = daemon_osc_target(args.config, args.host, args.port)
    target = f"{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    state = WatchState()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host, port))  # datagrams from the daemon only
        except OSError as err:
            raise UserError(f"cannot reach {target}: {err}") from err
        own_port = sock.getsockname()[1]
        subscribe = build_message(f"{prefix}/subscribe", [own_port])
        unsubscribe = build_message(f"{prefix}/unsubscribe", [own_port])
        end = time.monotonic() + args.seconds if args.seconds else None
        console = Console()
        try:
            # Ctrl-C is how a watch ends: a normal exit, not an error.
            with contextlib.suppress(KeyboardInterrupt), Live(
                render(state, time.monotonic(), args.bars, target), console=console,
                auto_refresh=False, transient=False,
            ) as live:
                _loop(sock, state, live, args, subscribe, target, end)
        finally:
            with contextlib.suppress(OSError):  # the daemon is gone: nothing to tell
                sock.send(unsubscribe)
    return 0


def _loop(sock: socket.socket, state: WatchState, live: Any, args: argparse.Namespace,
          subscribe: bytes, target: str, end: float | None) -> None:
    from pythonosc.osc_packet import OscPacket

    next_renew = next_draw = 0.0
    frame = 1.0 / args.fps
    while end is None or time.monotonic() < end:
        now = time.monotonic()
        if now >= next_renew:
            try:
                sock.send(subscribe)
            except OSError:  # nothing listens yet (port unreachable): try again at the next renewal
                state.subscribed = False
            next_renew = now + RENEW_S
        if now >= next_draw:
            beat = state.beat_now(now)
            if beat is not None:
                state.forget_before(beat - (args.bars + 1) * beats_per_bar(str(state.status.get("meter", "4/4"))))
            live.update(render(state, now, args.bars, target, live.console.size.height), refresh=True)
            next_draw = now + frame
        sock.settimeout(max(0.001, min(next_draw, next_renew) - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # ICMP port unreachable: the daemon is not there (yet)
            state.subscribed = False
            continue
        try:
            packets = [timed.message for timed in OscPacket(data).messages]
        except Exception:  # noqa: BLE001 - a stray datagram is not ours
            continue
        for message in packets:
            state.on_message(message.address, tuple(message.params), time.monotonic())
