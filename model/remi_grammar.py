"""The grammar of our REMI token streams, and a decoder that turns a stream into notes as it grows.

The layout (see docs/remi.md) is what miditok's REMI emits for one piano track with
velocities, duration tokens, tempos, time signatures and sustain-pedal on/off tokens:

    [BOS] Bar TimeSig [Position [Tempo] [Pedal|PedalOff] (Pitch Velocity Duration)*]* Bar TimeSig ...

`RemiGrammar` is a small state machine over token kinds. After any valid prefix it gives the
boolean mask of the ids that keep the stream valid, so sampling under the mask always yields a
stream that miditok decodes; `RemiStreamDecoder` turns ids into timed notes, tempo changes and
pedal moves one token at a time, with the same times as `tokenizer.decode`.

Both are built from the tokenizer itself (the one stored in a checkpoint); `RemiLayout` is the
map from token kinds and values to ids that they (and the daemon's online encoder) share.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from model.errors import ModelError


class UnsupportedTokenizerError(ModelError):
    """The tokenizer is not the piano REMI this module understands; `problems` lists why."""

    def __init__(self, problems: list[str]):
        super().__init__("unsupported REMI configuration: " + "; ".join(problems))
        self.problems = list(problems)


class GrammarError(ModelError):
    """A token that no valid stream can have at this point (`token` is its string)."""

    def __init__(self, token_id: int, token: str, state: RemiState):
        super().__init__(f"token {token_id} ({token}) is not allowed after {state.phase.name}")
        self.token_id = token_id
        self.token = token
        self.state = state


def check_piano_remi(tokenizer) -> None:
    """Raise UnsupportedTokenizerError unless `tokenizer` is the piano REMI of `model.vocab`.

    Free parameters: pitch range, beat resolutions, velocity and tempo bins, the set of time
    signatures and the special tokens. The token kinds and their order are fixed.
    """
    from miditok import REMI

    problems: list[str] = []
    if not isinstance(tokenizer, REMI):
        raise UnsupportedTokenizerError([f"tokenizer is {type(tokenizer).__name__}, not REMI"])
    cfg = tokenizer.config
    required = {
        "use_velocities": True,
        "use_tempos": True,
        "use_time_signatures": True,
        "use_sustain_pedals": True,
        "sustain_pedal_duration": False,
        "remove_duplicated_notes": True,
        "delete_equal_successive_tempo_changes": True,
        "delete_equal_successive_time_sig_changes": True,
        "use_programs": False,
        "use_chords": False,
        "use_rests": False,
        "use_key_signatures": False,
        "use_pitch_bends": False,
        "use_control_changes": False,
        "use_pitch_intervals": False,
    }
    for name, value in required.items():
        if getattr(cfg, name, value) != value:
            problems.append(f"{name} must be {value}")
    if 0 not in cfg.use_note_duration_programs:
        problems.append("the piano (program 0) must use Duration tokens")
    extra = cfg.additional_params
    if extra.get("max_bar_embedding") is not None:
        problems.append("max_bar_embedding must be None (one Bar token)")
    if extra.get("use_bar_end_tokens"):
        problems.append("use_bar_end_tokens must be False")
    if extra.get("add_trailing_bars"):
        problems.append("add_trailing_bars must be False")
    if tokenizer.attribute_controls:
        problems.append("attribute controls are not supported")
    if tokenizer.is_trained:
        problems.append("trained (BPE/Unigram/WordPiece) vocabularies are not supported")
    if problems:
        raise UnsupportedTokenizerError(problems)


class TokenKind(enum.IntEnum):
    """What a token is, from the part of its string before the first underscore."""

    PAD = 0
    BOS = 1
    EOS = 2
    BAR = 3
    TIMESIG = 4
    POSITION = 5
    TEMPO = 6
    PEDAL = 7
    PEDAL_OFF = 8
    PITCH = 9
    VELOCITY = 10
    DURATION = 11
    PITCH_DRUM = 12  # in miditok's vocabulary by default; never part of a piano stream


_KIND_OF_PREFIX = {
    "PAD": TokenKind.PAD,
    "BOS": TokenKind.BOS,
    "EOS": TokenKind.EOS,
    "Bar": TokenKind.BAR,
    "TimeSig": TokenKind.TIMESIG,
    "Position": TokenKind.POSITION,
    "Tempo": TokenKind.TEMPO,
    "Pedal": TokenKind.PEDAL,
    "PedalOff": TokenKind.PEDAL_OFF,
    "Pitch": TokenKind.PITCH,
    "Velocity": TokenKind.VELOCITY,
    "Duration": TokenKind.DURATION,
    "PitchDrum": TokenKind.PITCH_DRUM,
}


class RemiLayout:
    """Where every kind of token lives in the vocabulary, and the values they carry.

    Times: miditok decodes at `ticks_per_quarter` (the tokenizer's time division); a beat of a
    meter with denominator d has `ticks_per_beat(d)` ticks and `positions_per_beat` positions.
    """

    def __init__(self, tokenizer):
        check_piano_remi(tokenizer)
        self.tokenizer = tokenizer
        self.vocab_size: int = len(tokenizer.vocab)
        self.ticks_per_quarter: int = int(tokenizer.time_division)
        self.positions_per_beat: int = int(tokenizer.config.max_num_pos_per_beat)
        self.kinds: list[TokenKind] = [TokenKind.PAD] * self.vocab_size
        self.values: list[object] = [None] * self.vocab_size
        self.strings: list[str] = [""] * self.vocab_size
        self.pitch_ids: dict[int, int] = {}
        self.velocity_ids: dict[int, int] = {}
        self.duration_ids: dict[tuple[int, int, int], int] = {}
        self.position_ids: dict[int, int] = {}
        self.tempo_ids: dict[str, int] = {}
        self.timesig_ids: dict[tuple[int, int], int] = {}
        self.pad_id = self.bos_id = self.eos_id = self.bar_id = -1
        self.pedal_id = self.pedal_off_id = -1
        for token, token_id in tokenizer.vocab.items():
            prefix, _, value = token.partition("_")
            kind = _KIND_OF_PREFIX.get(prefix)
            if kind is None:
                raise UnsupportedTokenizerError([f"unexpected token {token!r} in the vocabulary"])
            self.kinds[token_id] = kind
            self.strings[token_id] = token
            parsed: object = None
            if kind == TokenKind.PITCH_DRUM:
                parsed = int(value)
            elif kind in (TokenKind.PITCH, TokenKind.VELOCITY, TokenKind.POSITION):
                parsed = int(value)
                {
                    TokenKind.PITCH: self.pitch_ids,
                    TokenKind.VELOCITY: self.velocity_ids,
                    TokenKind.POSITION: self.position_ids,
                }[kind][parsed] = token_id
            elif kind == TokenKind.DURATION:
                beat, pos, res = (int(x) for x in value.split("."))
                parsed = (beat, pos, res)
                self.duration_ids[parsed] = token_id
            elif kind == TokenKind.TIMESIG:
                num, den = (int(x) for x in value.split("/"))
                parsed = (num, den)
                self.timesig_ids[parsed] = token_id
            elif kind == TokenKind.TEMPO:
                parsed = float(value)
                self.tempo_ids[value] = token_id
            else:
                attr = {
                    TokenKind.PAD: "pad_id",
                    TokenKind.BOS: "bos_id",
                    TokenKind.EOS: "eos_id",
                    TokenKind.BAR: "bar_id",
                    TokenKind.PEDAL: "pedal_id",
                    TokenKind.PEDAL_OFF: "pedal_off_id",
                }[kind]
                setattr(self, attr, token_id)
            self.values[token_id] = parsed
        missing = [n for n in ("bar_id", "pedal_id", "pedal_off_id") if getattr(self, n) < 0]
        if missing:
            raise UnsupportedTokenizerError([f"vocabulary has no {n[:-3]} token" for n in missing])

    def ticks_per_beat(self, denominator: int) -> int:
        """Ticks (at `ticks_per_quarter`) in one beat of a meter with this denominator."""
        return self.ticks_per_quarter * 4 // denominator

    def positions_in_bar(self, numerator: int) -> int:
        """How many Position values a bar of `numerator` beats has."""
        return numerator * self.positions_per_beat

    @staticmethod
    def duration_ticks(value: tuple[int, int, int], ticks_per_beat: int) -> int:
        """A Duration token's length in ticks for a beat of `ticks_per_beat` ticks (as miditok)."""
        beat, pos, res = value
        return (beat * res + pos) * ticks_per_beat // res


class Phase(enum.IntEnum):
    """Where a stream is: which kind of token came last."""

    START = 0
    AFTER_BOS = 1
    AFTER_BAR = 2
    AFTER_TIMESIG = 3
    AFTER_POSITION = 4
    AFTER_TEMPO = 5
    AFTER_PEDAL = 6
    AFTER_PITCH = 7
    AFTER_VELOCITY = 8
    AFTER_DURATION = 9
    ENDED = 10


@dataclass(frozen=True, slots=True)
class RemiState:
    """A point in a REMI stream. Immutable: keep as many as you like (one per variation).

    bar_positions: Position values of the current bar (from its TimeSig), 0 before any.
    position: the last Position in the current bar, -1 if none yet.
    pitch: the last Pitch at the current position, -1 if none yet.
    pedal_down: whether the sustain pedal is down after the tokens so far.
    """

    phase: Phase = Phase.START
    bar_positions: int = 0
    position: int = -1
    pitch: int = -1
    pedal_down: bool = False


_INF = 1 << 30


class RemiGrammar:
    """The token order miditok's REMI emits, as a state machine with cached id masks.

    Rules (strict: exactly the streams miditok's encoder produces for one piano track):
    a stream starts with [BOS] Bar; every Bar is followed by one TimeSig; after a TimeSig come a
    Bar (an empty bar), a Position, or EOS. A Position (strictly greater than the bar's previous
    one, below the bar's length) is followed by an optional Tempo, an optional Pedal or PedalOff
    (alternating: Pedal only while the pedal is up) and then notes; at least one of those must
    follow a Position. A note is Pitch Velocity Duration, pitches strictly rising within a
    position. After a note, a Tempo or a pedal token come another Pitch, a later Position, a Bar
    or EOS. After EOS only PAD.

    Masks are BoolTensor[V] on `device`, built once per distinct state and cached; `masks`
    stacks them for a batch of states.
    """

    def __init__(self, tokenizer, device: torch.device | str = "cpu"):
        self.layout = RemiLayout(tokenizer)
        self.device = torch.device(device)
        lay = self.layout
        V = lay.vocab_size
        kinds = torch.tensor([int(k) for k in lay.kinds], dtype=torch.long)  # [V]
        self._kind = {k: (kinds == int(k)).to(self.device) for k in TokenKind}  # each BoolTensor[V]
        pitch_value = torch.full((V,), -1, dtype=torch.long)
        for pitch, token_id in lay.pitch_ids.items():
            pitch_value[token_id] = pitch
        position_value = torch.full((V,), -1, dtype=torch.long)
        for pos, token_id in lay.position_ids.items():
            position_value[token_id] = pos
        self._pitch_value = pitch_value.to(self.device)  # [V], -1 where not a Pitch
        self._position_value = position_value.to(self.device)  # [V], -1 where not a Position
        self._bar_positions = {
            token_id: lay.positions_in_bar(value[0])  # type: ignore[index]
            for token_id, value in ((i, lay.values[i]) for i in lay.timesig_ids.values())
        }
        self._cache: dict[tuple, torch.Tensor] = {}

    # -- transitions ---------------------------------------------------------------------------

    def start_state(self) -> RemiState:
        """The state before the first token."""
        return RemiState()

    def next_state(self, state: RemiState, token_id: int, lenient: bool = False) -> RemiState | None:
        """The state after `token_id`, or None if the token is not allowed after `state`.

        lenient: also take a Position equal to the current one. miditok emits that in one odd
        case: a meter change of another denominator family overridden within its bar leaves
        its time grid finer than the Position resolution, so two ticks share a Position.
        """
        if not 0 <= token_id < self.layout.vocab_size:
            return None
        kind = self.layout.kinds[token_id]
        phase = state.phase
        if phase == Phase.ENDED:
            return state if kind == TokenKind.PAD else None
        if phase == Phase.START:
            if kind == TokenKind.BOS:
                return RemiState(Phase.AFTER_BOS)
            return RemiState(Phase.AFTER_BAR) if kind == TokenKind.BAR else None
        if phase == Phase.AFTER_BOS:
            return RemiState(Phase.AFTER_BAR) if kind == TokenKind.BAR else None
        if phase == Phase.AFTER_BAR:
            if kind != TokenKind.TIMESIG:
                return None
            return RemiState(Phase.AFTER_TIMESIG, self._bar_positions[token_id], -1, -1, state.pedal_down)
        if phase == Phase.AFTER_PITCH:
            return self._replace(state, Phase.AFTER_VELOCITY) if kind == TokenKind.VELOCITY else None
        if phase == Phase.AFTER_VELOCITY:
            return self._replace(state, Phase.AFTER_DURATION) if kind == TokenKind.DURATION else None
        # A Position, or somewhere inside one: what may come depends on what came already.
        if kind == TokenKind.PITCH:
            if phase == Phase.AFTER_TIMESIG:
                return None
            pitch = self.layout.values[token_id]
            if phase == Phase.AFTER_DURATION and pitch <= state.pitch:  # type: ignore[operator]
                return None
            return RemiState(Phase.AFTER_PITCH, state.bar_positions, state.position, pitch, state.pedal_down)  # type: ignore[arg-type]
        if kind in (TokenKind.PEDAL, TokenKind.PEDAL_OFF):
            if phase not in (Phase.AFTER_POSITION, Phase.AFTER_TEMPO):
                return None
            if (kind == TokenKind.PEDAL) == state.pedal_down:
                return None
            return RemiState(
                Phase.AFTER_PEDAL, state.bar_positions, state.position, -1, kind == TokenKind.PEDAL
            )
        if kind == TokenKind.TEMPO:
            return self._replace(state, Phase.AFTER_TEMPO) if phase == Phase.AFTER_POSITION else None
        if phase == Phase.AFTER_POSITION:
            return None  # a Position must carry at least one event
        if kind == TokenKind.POSITION:
            pos = self.layout.values[token_id]
            lowest = state.position if lenient and state.position >= 0 else state.position + 1
            if not lowest <= pos < state.bar_positions:  # type: ignore[operator]
                return None
            return RemiState(Phase.AFTER_POSITION, state.bar_positions, pos, -1, state.pedal_down)  # type: ignore[arg-type]
        if kind == TokenKind.BAR:
            return RemiState(Phase.AFTER_BAR, 0, -1, -1, state.pedal_down)
        if kind == TokenKind.EOS:
            return RemiState(Phase.ENDED, pedal_down=state.pedal_down)
        return None

    @staticmethod
    def _replace(state: RemiState, phase: Phase) -> RemiState:
        return RemiState(phase, state.bar_positions, state.position, state.pitch, state.pedal_down)

    def advance(self, state: RemiState, token_id: int, lenient: bool = False) -> RemiState:
        """The state after `token_id`; raises GrammarError if the token is not allowed."""
        nxt = self.next_state(state, int(token_id), lenient)
        if nxt is None:
            token = self.layout.strings[token_id] if 0 <= token_id < self.layout.vocab_size else "?"
            raise GrammarError(int(token_id), token, state)
        return nxt

    def walk(self, ids: Iterable[int], state: RemiState | None = None, lenient: bool = False) -> RemiState:
        """Advance over `ids` (e.g. the played context) from `state` (default: the start).

        lenient: see `next_state`; use it for context tokenized from arbitrary files."""
        state = self.start_state() if state is None else state
        for token_id in ids:
            state = self.advance(state, int(token_id), lenient)
        return state

    def accepts(self, ids: Iterable[int], state: RemiState | None = None, lenient: bool = False) -> bool:
        """Whether `ids` is a valid continuation of `state` (default: a valid stream prefix)."""
        try:
            self.walk(ids, state, lenient)
        except GrammarError:
            return False
        return True

    # -- masks ---------------------------------------------------------------------------------

    def _mask_key(self, state: RemiState) -> tuple:
        """The part of a state its mask depends on (so equal masks share one cache entry)."""
        phase = state.phase
        if phase in (Phase.AFTER_TEMPO, Phase.AFTER_PEDAL, Phase.AFTER_DURATION, Phase.AFTER_TIMESIG):
            pitch = state.pitch if phase == Phase.AFTER_DURATION else -1
            pedal = state.pedal_down if phase == Phase.AFTER_TEMPO else False
            return (phase, state.bar_positions, state.position, pitch, pedal)
        if phase == Phase.AFTER_POSITION:
            return (phase, 0, -1, -1, state.pedal_down)
        return (phase, 0, -1, -1, False)

    def mask(self, state: RemiState) -> torch.Tensor:
        """BoolTensor[V]: the ids allowed after `state`. Cached; do not modify it in place."""
        key = self._mask_key(state)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._build_mask(key)
            self._cache[key] = cached
        return cached

    def masks(self, states: Sequence[RemiState]) -> torch.Tensor:
        """BoolTensor[B, V]: one mask row per state."""
        return torch.stack([self.mask(s) for s in states])

    def _build_mask(self, key: tuple) -> torch.Tensor:
        phase, bar_positions, position, pitch, pedal_down = key
        k = self._kind
        K = TokenKind
        if phase == Phase.ENDED:
            return k[K.PAD].clone()
        if phase == Phase.START:
            return k[K.BOS] | k[K.BAR]
        if phase == Phase.AFTER_BOS:
            return k[K.BAR].clone()
        if phase == Phase.AFTER_BAR:
            return k[K.TIMESIG].clone()
        if phase == Phase.AFTER_PITCH:
            return k[K.VELOCITY].clone()
        if phase == Phase.AFTER_VELOCITY:
            return k[K.DURATION].clone()
        pedal = k[K.PEDAL_OFF] if pedal_down else k[K.PEDAL]
        if phase == Phase.AFTER_POSITION:
            return k[K.TEMPO] | pedal | k[K.PITCH]
        later_position = (self._position_value > position) & (self._position_value < bar_positions)
        closing = later_position | k[K.BAR] | k[K.EOS]
        if phase == Phase.AFTER_TIMESIG:
            return closing
        if phase == Phase.AFTER_TEMPO:
            return closing | pedal | k[K.PITCH]
        if phase == Phase.AFTER_PEDAL:
            return closing | k[K.PITCH]
        if phase == Phase.AFTER_DURATION:
            return closing | (self._pitch_value > pitch)
        raise AssertionError(f"unhandled phase {phase!r}")


# ---------------------------------------------------------------------------------------------
# Streaming decoder


@dataclass(frozen=True, slots=True)
class DecodedNote:
    """A complete note. Times in quarter-note beats from the stream's first Bar."""

    pitch: int
    velocity: int
    start_beats: float
    duration_beats: float


@dataclass(frozen=True, slots=True)
class DecodedTempo:
    """A Tempo token: `qpm` quarter notes per minute from `beats` on."""

    beats: float
    qpm: float


@dataclass(frozen=True, slots=True)
class DecodedPedal:
    """The sustain pedal goes down (`down`) or up at `beats`."""

    beats: float
    down: bool


DecodedEvent = DecodedNote | DecodedTempo | DecodedPedal


class RemiStreamDecoder:
    """Ids -> notes, tempo changes and pedal moves, each as soon as its last token arrives.

    Times agree with `tokenizer.decode` (which works at the tokenizer's time division): a note's
    start is its bar's start plus Position x ticks-per-position of the bar's meter, its length
    the Duration token at the meter's ticks per beat. A note is complete at its Duration token;
    tokens that break a Pitch-Velocity-Duration triple drop that note, as miditok does.
    `copy()` gives an independent decoder (one per sampled variation).
    """

    def __init__(self, tokenizer=None, *, layout: RemiLayout | None = None):
        if layout is None:
            if tokenizer is None:
                raise TypeError("RemiStreamDecoder needs a tokenizer or a layout")
            layout = RemiLayout(tokenizer)
        self.layout = layout
        self.bar_index = -1  # index of the current bar, -1 before the first Bar
        self._bar_start = 0  # ticks at the layout's ticks_per_quarter
        self._meter = (4, 4)  # miditok's default before any TimeSig
        self._tick = 0
        self._pitch: int | None = None
        self._velocity: int | None = None
        self._expect = TokenKind.PITCH  # next token kind that continues a pending note
        self._pedal_down = False
        self.tempo_qpm: float | None = None

    def copy(self) -> RemiStreamDecoder:
        """An independent decoder in the same state."""
        twin = RemiStreamDecoder(layout=self.layout)
        twin.__dict__.update(self.__dict__)
        return twin

    @property
    def meter(self) -> tuple[int, int]:
        """The current bar's time signature (numerator, denominator)."""
        return self._meter

    @property
    def bar_start_beats(self) -> float:
        """Start of the current bar, in quarter-note beats from the first Bar."""
        return self._bar_start / self.layout.ticks_per_quarter

    @property
    def time_beats(self) -> float:
        """The time of the current Position (or bar start), in quarter-note beats."""
        return self._tick / self.layout.ticks_per_quarter

    @property
    def bar_length_beats(self) -> float:
        """Length of the current bar in quarter-note beats."""
        num, den = self._meter
        return num * 4 / den

    def _bar_ticks(self) -> int:
        num, den = self._meter
        return num * self.layout.ticks_per_beat(den)

    def push(self, token_id: int) -> list[DecodedEvent]:
        """Consume one id; return the events it completes (usually none or one)."""
        lay = self.layout
        token_id = int(token_id)
        kind = lay.kinds[token_id]
        value = lay.values[token_id]
        # A note is Pitch, Velocity, Duration in a row; anything else in between drops it.
        if kind == TokenKind.VELOCITY and self._expect == TokenKind.VELOCITY:
            self._velocity = value  # type: ignore[assignment]
            self._expect = TokenKind.DURATION
            return []
        if kind == TokenKind.DURATION and self._expect == TokenKind.DURATION:
            self._expect = TokenKind.PITCH
            ticks = lay.duration_ticks(value, lay.ticks_per_beat(self._meter[1]))  # type: ignore[arg-type]
            tpq = lay.ticks_per_quarter
            return [DecodedNote(self._pitch, self._velocity, self._tick / tpq, ticks / tpq)]  # type: ignore[arg-type]
        self._expect = TokenKind.PITCH
        if kind in (TokenKind.PITCH, TokenKind.PITCH_DRUM):  # miditok decodes both as notes
            self._pitch = value  # type: ignore[assignment]
            self._expect = TokenKind.VELOCITY
        elif kind == TokenKind.BAR:
            self.bar_index += 1
            if self.bar_index > 0:
                self._bar_start += self._bar_ticks()
            self._tick = self._bar_start
        elif kind == TokenKind.TIMESIG:
            self._meter = value  # type: ignore[assignment]
        elif kind == TokenKind.POSITION:
            if self.bar_index < 0:
                self.bar_index = 0
            ticks_per_position = lay.ticks_per_beat(self._meter[1]) // lay.positions_per_beat
            self._tick = self._bar_start + value * ticks_per_position  # type: ignore[operator]
        elif kind == TokenKind.TEMPO:
            self.tempo_qpm = value  # type: ignore[assignment]
            return [DecodedTempo(self.time_beats, value)]  # type: ignore[arg-type]
        elif kind in (TokenKind.PEDAL, TokenKind.PEDAL_OFF):
            down = kind == TokenKind.PEDAL
            if down != self._pedal_down:
                self._pedal_down = down
                return [DecodedPedal(self.time_beats, down)]
        return []

    def push_many(self, ids: Iterable[int]) -> list[DecodedEvent]:
        """Consume several ids; return every event they complete, in order."""
        events: list[DecodedEvent] = []
        for token_id in ids:
            events.extend(self.push(token_id))
        return events
