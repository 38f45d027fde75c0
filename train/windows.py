"""Training windows over token shards: bar-aligned starts, carried state, augmentation.

Two ways to cut a piece into windows of `ctx_len` tokens:
- carry_state: the batch is B "lanes"; each lane reads one piece from its start, window after
  consecutive window, and the trainer carries each lane's recurrent state from one window to
  the next (truncated BPTT), as the daemon continues from a long history. A lane that finishes
  its piece starts a new one and its state is reset.
- otherwise every window is independent: a random piece, a random bar line to start at, and the
  tempo and time signature in force there re-stated at the window's head, as miditok writes them
  at a change, so the model is never left guessing the meter.

Augmentation: a random transposition (per piece, kept inside the 88 keys) and a random shift of
the tempo tokens by a few bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from train.shards import TokenShards

IGNORE = -1  # target id that carries no loss


@dataclass
class TokenTable:
    """Facts about token ids that windows need, derived once from the tokenizer's vocabulary."""

    pad_id: int
    bos_id: int
    bar_id: int
    pitch_of: np.ndarray  # [V] MIDI pitch of a Pitch token, -1 otherwise
    pitch_id: np.ndarray  # [128] id of Pitch_p, -1 if p is outside the vocabulary
    tempo_rank: np.ndarray  # [V] index of a Tempo token among tempos sorted by value, -1 otherwise
    tempo_ids: np.ndarray  # tempo token ids sorted by tempo value
    is_position: np.ndarray  # [V] bool
    is_timesig: np.ndarray  # [V] bool

    @classmethod
    def from_vocab(cls, vocab: dict[str, int]) -> TokenTable:
        V = max(vocab.values()) + 1
        pitch_of = np.full(V, -1, np.int64)
        pitch_id = np.full(128, -1, np.int64)
        tempo_rank = np.full(V, -1, np.int64)
        is_position = np.zeros(V, bool)
        is_timesig = np.zeros(V, bool)
        tempos = []
        for name, i in vocab.items():
            kind, _, value = name.partition("_")
            if kind == "Pitch":
                pitch_of[i] = int(value)
                pitch_id[int(value)] = i
            elif kind == "Tempo":
                tempos.append((float(value), i))
            elif kind == "Position":
                is_position[i] = True
            elif kind == "TimeSig":
                is_timesig[i] = True
        tempo_ids = np.array([i for _, i in sorted(tempos)], np.int64)
        tempo_rank[tempo_ids] = np.arange(len(tempo_ids))
        return cls(vocab["PAD_None"], vocab["BOS_None"], vocab["Bar_None"], pitch_of, pitch_id,
                   tempo_rank, tempo_ids, is_position, is_timesig)

    def transpose(self, tokens: np.ndarray, semitones: int) -> np.ndarray:
        """Tokens with every Pitch shifted; the caller keeps the shift inside the vocabulary."""
        if semitones == 0:
            return tokens
        pitches = self.pitch_of[tokens]
        out = tokens.copy()
        is_pitch = pitches >= 0
        out[is_pitch] = self.pitch_id[pitches[is_pitch] + semitones]
        return out

    def shift_tempo(self, tokens: np.ndarray, bins: int) -> np.ndarray:
        if bins == 0 or len(self.tempo_ids) == 0:
            return tokens
        ranks = self.tempo_rank[tokens]
        out = tokens.copy()
        is_tempo = ranks >= 0
        out[is_tempo] = self.tempo_ids[np.clip(ranks[is_tempo] + bins, 0, len(self.tempo_ids) - 1)]
        return out

    def transpose_range(self, tokens: np.ndarray, limit: int) -> tuple[int, int]:
        """The shifts in [-limit, limit] that keep every pitch of `tokens` in the vocabulary."""
        pitches = self.pitch_of[tokens]
        pitches = pitches[pitches >= 0]
        if limit == 0 or len(pitches) == 0:
            return 0, 0
        valid = np.flatnonzero(self.pitch_id >= 0)
        return max(-limit, int(valid[0] - pitches.min())), min(limit, int(valid[-1] - pitches.max()))


@dataclass
class Batch:
    idx: torch.Tensor  # [B, T] int64 inputs
    targets: torch.Tensor  # [B, T] int64, IGNORE where no loss
    reset: torch.Tensor  # [B] bool: the lane starts a new piece (zero its state)


class WindowSampler:
    """Yields training batches; its position and random state can be saved for exact resume."""

    def __init__(self, shards: TokenShards, table: TokenTable, batch_size: int, ctx_len: int, *,
                 carry_state: bool, transpose: int, tempo_jitter: int, loss_on: str = "all",
                 context_bars: int = 0, seed: int = 0):
        if len(shards) == 0:
            raise ValueError(f"{shards!r} has no pieces")
        self.shards, self.table = shards, table
        self.batch_size, self.ctx_len = batch_size, ctx_len
        self.carry_state, self.transpose, self.tempo_jitter = carry_state, transpose, tempo_jitter
        self.loss_on, self.context_bars = loss_on, context_bars
        self.rng = np.random.default_rng(seed)
        # Per lane: [piece, next token offset in the BOS-prefixed piece, semitones, tempo bins];
        # piece -1 means "start a new piece on the next batch".
        self.lanes = [[-1, 0, 0, 0] for _ in range(batch_size)]

    # ----------------------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        return {"lanes": [list(map(int, lane)) for lane in self.lanes],
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, d: dict) -> None:
        self.lanes = [list(lane) for lane in d["lanes"]]
        self.rng.bit_generator.state = d["rng"]

    # ----------------------------------------------------------------------------- batches

    def next_batch(self) -> Batch:
        rows, targets, resets = [], [], []
        for lane in range(self.batch_size):
            if self.carry_state:
                x, y, reset = self._next_lane_window(lane)
            else:
                (x, y), reset = self._random_window(), True
            rows.append(x)
            targets.append(y)
            resets.append(reset)
        return Batch(torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(targets)),
                     torch.tensor(resets))

    def _piece_with_bos(self, piece: int) -> np.ndarray:
        return np.concatenate([[self.table.bos_id], self.shards.piece(piece).astype(np.int64)])

    def _augment(self, tokens: np.ndarray, semitones: int, tempo_bins: int) -> np.ndarray:
        return self.table.shift_tempo(self.table.transpose(tokens, semitones), tempo_bins)

    def _draw_augmentation(self, tokens: np.ndarray) -> tuple[int, int]:
        low, high = self.table.transpose_range(tokens, self.transpose)
        semitones = int(self.rng.integers(low, high + 1))
        bins = int(self.rng.integers(-self.tempo_jitter, self.tempo_jitter + 1)) if self.tempo_jitter else 0
        return semitones, bins

    def _next_lane_window(self, lane: int) -> tuple[np.ndarray, np.ndarray, bool]:
        piece, offset, semitones, bins = self.lanes[lane]
        reset = piece < 0
        if reset:
            piece = int(self.rng.integers(len(self.shards)))
            semitones, bins = self._draw_augmentation(self.shards.piece(piece))
            offset = 0
        tokens = self._piece_with_bos(piece)
        chunk = self._augment(tokens[offset: offset + self.ctx_len + 1], semitones, bins)
        x, y = self._pad(chunk[:-1], chunk[1:])
        offset += self.ctx_len
        # The piece is done once no target is left for a further window.
        self.lanes[lane] = [-1, 0, 0, 0] if offset >= len(tokens) - 1 else [piece, offset, semitones, bins]
        if self.loss_on == "completion" and reset:
            y = self._mask_context_bars(x, y)
        return x, y, reset

    def _random_window(self) -> tuple[np.ndarray, np.ndarray]:
        piece = int(self.rng.integers(len(self.shards)))
        raw = self.shards.piece(piece).astype(np.int64)
        bars = self.shards.bars_of_piece(piece)
        context = self.shards.bar_context[self.shards.bar_slice(piece)]
        semitones, bins = self._draw_augmentation(raw)
        if len(bars) == 0:
            start, restate = 0, None
        else:
            b = int(self.rng.integers(len(bars)))
            start, restate = int(bars[b]), (context[b] if b > 0 else None)
        chunk = raw[start: start + self.ctx_len + 1]
        keep = np.ones(len(chunk), bool)
        if start == 0:
            chunk, keep = np.concatenate([[self.table.bos_id], chunk]), np.concatenate([[False], keep])
        elif restate is not None:
            chunk, keep = self._restate_context(chunk, int(restate[0]), int(restate[1]))
        chunk = self._augment(chunk[: self.ctx_len + 1], semitones, bins)
        keep = keep[: self.ctx_len + 1]
        x, y = chunk[:-1], np.where(keep[1:], chunk[1:], IGNORE)
        x, y = self._pad(x, y)
        if self.loss_on == "completion":
            y = self._mask_context_bars(x, y)
        return x, y

    def _restate_context(self, chunk: np.ndarray, tempo_id: int, timesig_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Insert the time signature after the window's first Bar and the tempo after its first
        Position, where they are missing; inserted tokens carry no loss."""
        tokens, keep = list(chunk), [True] * len(chunk)
        if timesig_id >= 0 and (len(tokens) < 2 or not self.table.is_timesig[tokens[1]]):
            tokens.insert(1, timesig_id)
            keep.insert(1, False)
        if tempo_id >= 0:
            pos = next((i for i, t in enumerate(tokens) if self.table.is_position[t]), None)
            if pos is not None and (pos + 1 >= len(tokens) or self.table.tempo_rank[tokens[pos + 1]] < 0):
                tokens.insert(pos + 1, tempo_id)
                keep.insert(pos + 1, False)
        return np.array(tokens, np.int64), np.array(keep)

    def _mask_context_bars(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """No loss before the start of bar number `context_bars` (counted from the window head)."""
        bar_starts = np.flatnonzero(x == self.table.bar_id)
        if len(bar_starts) > self.context_bars:
            y = y.copy()
            y[: bar_starts[self.context_bars]] = IGNORE
        else:
            y = np.full_like(y, IGNORE)
        return y

    def _pad(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.ctx_len - len(x)
        if n > 0:
            x = np.concatenate([x, np.full(n, self.table.pad_id, np.int64)])
            y = np.concatenate([y, np.full(n, IGNORE, np.int64)])
        return x.astype(np.int64), y.astype(np.int64)


def eval_windows(shards: TokenShards, table: TokenTable, ctx_len: int, max_windows: int):
    """Deterministic validation: whole pieces from their start, in order, cut into consecutive
    windows (state carried). Yields (piece_index, x [T], y [T], first_window_of_piece)."""
    produced = 0
    for piece in range(len(shards)):
        tokens = np.concatenate([[table.bos_id], shards.piece(piece).astype(np.int64)])
        for offset in range(0, len(tokens) - 1, ctx_len):
            chunk = tokens[offset: offset + ctx_len + 1]
            x, y = chunk[:-1], chunk[1:]
            n = ctx_len - len(x)
            if n:
                x = np.concatenate([x, np.full(n, table.pad_id, np.int64)])
                y = np.concatenate([y, np.full(n, IGNORE, np.int64)])
            yield piece, x, y, offset == 0
            produced += 1
            if produced >= max_windows:
                return
