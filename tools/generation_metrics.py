"""Figures that compare a generated continuation with the real one, over plain note lists.

- histogram overlap: the sum over bins of the minimum of two normalised histograms (1 = the
  same shape, 0 = nothing in common); used on pitch classes and on onset positions in the bar;
- density ratio: generated notes per bar / real notes per bar;
- the key of a passage by the Krumhansl-Schmuckler method (correlate the passage's
  duration-weighted pitch-class profile with the 24 rotated key profiles, take the best), and the
  share of notes whose pitch class belongs to that key's scale;
- texture, each figure of one passage on its own (compare a continuation's with the real one's):
  chord share (onsets where two or more notes start together), mean polyphony (notes sounding at
  once, on a sixteenth-note grid, where anything sounds), pitch range (semitones from the lowest
  to the highest note) and the entropy of the pitch-class histogram (bits; 0 = one pitch class,
  log2 12 = 3.58 = all twelve equally).

Pure functions: no tokenizer, no model. Notes are `BarNote`s, positioned inside their bar.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Krumhansl & Kessler's probe-tone key profiles (C major and C minor, index = semitones above
# the tonic): C. L. Krumhansl and E. J. Kessler, "Tracing the dynamic changes in perceived tonal
# organization in a spatial representation of musical keys", Psychological Review 89 (1982),
# used for key finding in C. L. Krumhansl, "Cognitive Foundations of Musical Pitch" (1990).
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])

MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
# Natural minor plus the raised seventh: the leading tone belongs to minor-key practice in the
# corpus (chorale cadences), so counting it out of key would call the real music wrong.
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10, 11)

PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


@dataclass(frozen=True, slots=True)
class BarNote:
    """A note placed in its bar: `bar` counts from 0 at the passage's first bar line; `onset`
    and `duration` are in quarter-note beats, `onset` from the start of that bar."""

    pitch: int
    bar: int
    onset: float
    duration: float


@dataclass(frozen=True, slots=True)
class Key:
    tonic: int  # pitch class 0..11, 0 = C
    minor: bool
    correlation: float  # Pearson r of the passage's profile with this key's profile

    @property
    def name(self) -> str:
        return f"{PITCH_NAMES[self.tonic]} {'minor' if self.minor else 'major'}"

    def scale(self) -> frozenset[int]:
        """The pitch classes of the key's scale (see MINOR_SCALE for the minor)."""
        steps = MINOR_SCALE if self.minor else MAJOR_SCALE
        return frozenset((self.tonic + step) % 12 for step in steps)


def pitch_class_histogram(notes: Iterable[BarNote]) -> np.ndarray:
    """Note counts per pitch class: float64 [12] (not normalised)."""
    counts = np.zeros(12)
    for note in notes:
        counts[note.pitch % 12] += 1
    return counts


def onset_histogram(notes: Iterable[BarNote], grid_per_beat: int = 4) -> np.ndarray:
    """Note counts per onset position in the bar, on a grid of `grid_per_beat` steps per quarter
    note (4 = sixteenth notes); an onset between grid lines goes to the nearest one.
    float64 [n_bins], n_bins = the last occupied position + 1 (0 for no notes)."""
    positions = [int(math.floor(note.onset * grid_per_beat + 0.5)) for note in notes]
    if not positions:
        return np.zeros(0)
    return np.bincount(positions).astype(np.float64)


def histogram_overlap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """sum_i min(a_i / sum a, b_i / sum b); the shorter histogram is padded with zeros.

    1.0 for histograms of the same shape, 0.0 for disjoint ones; 0.0 when either is empty
    (no notes share nothing with anything)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.sum() <= 0 or b.sum() <= 0:
        return 0.0
    n = max(len(a), len(b))
    a = np.pad(a, (0, n - len(a))) / a.sum()
    b = np.pad(b, (0, n - len(b))) / b.sum()
    return float(np.minimum(a, b).sum())


def notes_per_bar(notes: Sequence[BarNote], bars: int) -> float:
    if bars <= 0:
        raise ValueError("bars must be positive")
    return len(notes) / bars


def density_ratio(generated: Sequence[BarNote], real: Sequence[BarNote], bars: int,
                  real_bars: int | None = None) -> float:
    """(generated notes per bar) / (real notes per bar); real_bars defaults to `bars`.
    Raises ValueError when the real passage has no notes (the ratio has no meaning)."""
    if not real:
        raise ValueError("the real passage has no notes")
    return notes_per_bar(generated, bars) / notes_per_bar(real, bars if real_bars is None else real_bars)


def pitch_class_durations(notes: Iterable[BarNote]) -> np.ndarray:
    """Summed duration (beats) per pitch class: float64 [12], the input of the key finder."""
    weights = np.zeros(12)
    for note in notes:
        weights[note.pitch % 12] += note.duration
    return weights


def estimate_key(notes: Iterable[BarNote]) -> Key | None:
    """The Krumhansl-Schmuckler key of `notes` (durations weight the pitch classes); None when
    the profile is flat (no notes, or every pitch class equally long), which fits no key."""
    profile = pitch_class_durations(notes)
    if np.ptp(profile) == 0:
        return None
    best: Key | None = None
    for minor, reference in ((False, MAJOR_PROFILE), (True, MINOR_PROFILE)):
        for tonic in range(12):
            # The key's profile indexed by absolute pitch class: rotate the tonic to `tonic`.
            r = float(np.corrcoef(profile, np.roll(reference, tonic))[0, 1])
            if best is None or r > best.correlation:
                best = Key(tonic, minor, r)
    return best


def in_key_share(notes: Sequence[BarNote], key: Key) -> float:
    """The share of `notes` whose pitch class is in `key`'s scale; NaN for no notes."""
    if not notes:
        return float("nan")
    scale = key.scale()
    return sum(note.pitch % 12 in scale for note in notes) / len(notes)


def chord_share(notes: Sequence[BarNote], grid_per_beat: int = 8) -> float:
    """The share of distinct onsets (bar, position on a 1/`grid_per_beat`-beat grid) at which two
    or more notes start; NaN for no notes. A single melodic line gives 0, block chords 1."""
    if not notes:
        return float("nan")
    counts: dict[tuple[int, int], int] = {}
    for note in notes:
        key = (note.bar, int(math.floor(note.onset * grid_per_beat + 0.5)))
        counts[key] = counts.get(key, 0) + 1
    return sum(c >= 2 for c in counts.values()) / len(counts)


def mean_polyphony(notes: Sequence[BarNote], beats_per_bar: float = 4.0, grid_per_beat: int = 4) -> float:
    """The mean number of notes sounding at once over the grid steps where at least one sounds;
    NaN for no notes. `beats_per_bar` places the bars on one time line (only the overlap of notes
    across bar lines depends on it)."""
    if not notes:
        return float("nan")
    starts = [int(round((n.bar * beats_per_bar + n.onset) * grid_per_beat)) for n in notes]
    ends = [max(s + 1, int(round((n.bar * beats_per_bar + n.onset + n.duration) * grid_per_beat)))
            for n, s in zip(notes, starts)]
    origin = min(starts)
    sounding = np.zeros(max(ends) - origin, np.int64)
    for s, e in zip(starts, ends):
        sounding[s - origin:e - origin] += 1
    busy = sounding[sounding > 0]
    return float(busy.mean())


def pitch_range(notes: Sequence[BarNote]) -> float:
    """Semitones from the lowest to the highest pitch; NaN for no notes."""
    if not notes:
        return float("nan")
    pitches = [n.pitch for n in notes]
    return float(max(pitches) - min(pitches))


def pitch_class_entropy(notes: Sequence[BarNote]) -> float:
    """Shannon entropy (bits) of the normalised pitch-class histogram; NaN for no notes."""
    counts = pitch_class_histogram(notes)
    if counts.sum() == 0:
        return float("nan")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@dataclass(frozen=True)
class Summary:
    """Mean of a figure over pairs, its sample standard deviation, the half-width of a 95%
    confidence interval of the mean (normal approximation, 1.96 standard errors) and the
    median; NaN values (a figure undefined for a pair) are left out and `n` counts the rest."""

    mean: float
    std: float
    ci95: float
    n: int
    median: float = float("nan")

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        x = np.array([v for v in values if not math.isnan(v)], np.float64)
        if len(x) == 0:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
        return cls(float(x.mean()), std, 1.96 * std / math.sqrt(len(x)), len(x), float(np.median(x)))
