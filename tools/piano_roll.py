"""Piano-roll pictures: a context phrase in grey, one coloured continuation per row.

Every row of the figure shows the same context followed by one continuation, so variations of
a completion (or a call and its answer) can be compared bar by bar. Times are quarter-note
beats on one axis shared by the context and the continuations: the caller places the
continuation after the context. Bar lines fall every `beats_per_bar` beats from beat 0; a black
one marks the bar where the continuations begin (the bar line at or before their first note).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CONTEXT_COLOR = "#9a9a9a"
# Distinct hues for up to ten rows (matplotlib's tab10), reused cyclically beyond that.
ROW_COLORMAP = "tab10"
# Figure geometry, in inches: wide enough to read sixteenth notes over a dozen bars, capped so
# a long context does not make a picture no viewer can open.
INCHES_PER_BEAT = 0.35
MIN_WIDTH_IN, MAX_WIDTH_IN = 6.0, 40.0
ROW_HEIGHT_IN = 2.4
DPI = 100


@dataclass(frozen=True)
class RollNote:
    """A note on the roll: from `start_beats` to `end_beats` (quarter-note beats), MIDI pitch."""

    start_beats: float
    end_beats: float
    pitch: int
    velocity: int = 80


def _pitch_range(notes: Sequence[RollNote]) -> tuple[int, int]:
    """The lowest and highest pitch to show, with a semitone of air; middle C's octave if none."""
    if not notes:
        return 59, 73
    low = min(n.pitch for n in notes)
    high = max(n.pitch for n in notes)
    # At least an octave tall so a single repeated pitch still reads as a roll.
    while high - low < 12:
        low, high = low - 1, high + 1
    return low - 1, high + 1


def _note_name(pitch: int) -> str:
    """MIDI pitch -> scientific pitch name (60 -> C4)."""
    return ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")[pitch % 12] + str(pitch // 12 - 1)


def _draw_notes(ax, notes: Sequence[RollNote], color: str) -> None:
    import matplotlib.colors as mcolors
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    if not notes:
        return
    boxes = [Rectangle((n.start_beats, n.pitch - 0.4), max(n.end_beats - n.start_beats, 0.05), 0.8)
             for n in notes]
    # Louder notes are more opaque: the roll shows dynamics without a second colour scale.
    faces = [mcolors.to_rgba(color, 0.35 + 0.65 * min(max(n.velocity, 1), 127) / 127) for n in notes]
    ax.add_collection(PatchCollection(boxes, facecolors=faces, edgecolors="black", linewidths=0.3))


def save_piano_roll(path: Path | str, context: Sequence[RollNote],
                    continuations: Sequence[Sequence[RollNote]], *, beats_per_bar: float = 4.0,
                    title: str = "") -> Path:
    """Draw `context` (grey) and each continuation (coloured) as one row per continuation; save a PNG.

    context: notes shown on every row. continuations: K lists of notes, one row each (with no
    continuation, one row shows the context alone). beats_per_bar: quarter-note beats per bar
    (4.0 for 4/4, 3.0 for 6/8), > 0; bar lines are drawn from beat 0. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: files only, and no GUI toolkit import
    from matplotlib.figure import Figure

    if not beats_per_bar > 0 or not math.isfinite(beats_per_bar):
        raise ValueError(f"beats_per_bar must be a positive number, got {beats_per_bar}")
    path = Path(path)
    rows = [list(c) for c in continuations] or [[]]
    every = list(context) + [n for row in rows for n in row]
    start = min([0.0] + [n.start_beats for n in every])
    end = max([beats_per_bar] + [n.end_beats for n in every])
    end = math.ceil(end / beats_per_bar - 1e-9) * beats_per_bar  # finish on a bar line
    low, high = _pitch_range(every)
    first_note = min((n.start_beats for row in rows for n in row), default=None)
    # Continuations start on a bar line; mark the one at or before their first note.
    continuation_start = (None if first_note is None
                          else math.floor(first_note / beats_per_bar + 1e-9) * beats_per_bar)

    bars = range(math.floor(start / beats_per_bar + 1e-9), round(end / beats_per_bar) + 1)
    bar_lines = [b * beats_per_bar for b in bars]
    bar_labels = [str(b + 1) for b in bars]  # bar 1 starts at beat 0
    # Octave labels (every C) when the range has one, else the lowest note's name.
    pitch_ticks = [p for p in range(low + 1, high) if p % 12 == 0] or [low + 1]
    width = min(MAX_WIDTH_IN, max(MIN_WIDTH_IN, (end - start) * INCHES_PER_BEAT))
    # A Figure of its own, not pyplot's global figure registry: safe to call from any thread.
    fig = Figure(figsize=(width, ROW_HEIGHT_IN * len(rows) + 0.6), dpi=DPI)
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    cmap = matplotlib.colormaps[ROW_COLORMAP]
    for index, (ax, row) in enumerate(zip(axes, rows, strict=True)):
        for bar in bar_lines:
            ax.axvline(bar, color="#d0d0d0", linewidth=0.8, zorder=0)
        if continuation_start is not None:
            ax.axvline(continuation_start, color="black", linewidth=1.2, zorder=0)
        _draw_notes(ax, context, CONTEXT_COLOR)
        _draw_notes(ax, row, matplotlib.colors.to_hex(cmap(index % cmap.N)))
        ax.set_xlim(start, end)
        ax.set_ylim(low, high)
        ax.set_yticks(pitch_ticks, [_note_name(p) for p in pitch_ticks])
        ax.set_xticks(bar_lines, bar_labels)
        ax.tick_params(labelsize=8)
        if continuations:
            ax.set_title(f"variation {index + 1}" if len(rows) > 1 else "continuation", fontsize=9, loc="left")
    axes[-1].set_xlabel(f"bar ({beats_per_bar:g} beats each)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    log.debug("piano roll: %d rows, %.1f beats -> %s", len(rows), end - start, path)
    return path
