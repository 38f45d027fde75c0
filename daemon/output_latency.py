"""Output latency: send each note early so that it sounds on the grid on a slow instrument.

`[midi] output_latency_ms` (may be negative) moves every outgoing message that much earlier:
a sampler that takes 20 ms to speak, or a player piano whose hammers take 50 ms to strike,
then sounds on the beat. `[midi] output_latency_soft_ms` adds an extra lead for soft notes,
growing linearly from 0 at velocity 127 to the full amount at velocity 1: a player piano's
hammer travels more slowly when it strikes softly. Note-offs and pedal moves get the base
latency only (dampers do not depend on how hard the key was struck).

Times are moved, beats are not: the daemon feeds what it played back to the model at the
beat it was meant for, `sent + seconds(velocity)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.settings import ConfigError, check_range

MAX_LATENCY_MS = 500.0


@dataclass(frozen=True)
class OutputLatency:
    """How much earlier than its grid time a message leaves the output port."""

    base_ms: float = 0.0  # every message; negative = later
    soft_ms: float = 0.0  # extra for a note-on at velocity 1, falling to 0 at velocity 127

    def __post_init__(self) -> None:
        check_range("midi.output_latency_ms", self.base_ms, -MAX_LATENCY_MS, MAX_LATENCY_MS)
        check_range("midi.output_latency_soft_ms", self.soft_ms, 0.0, MAX_LATENCY_MS)

    @property
    def most_ms(self) -> float:
        """The earliest any message leaves, in ms before its time (for checks against the lead)."""
        return self.base_ms + self.soft_ms

    def seconds(self, velocity: int | None = None) -> float:
        """Seconds to send a message early: a note-on with `velocity`, else (None) anything else."""
        extra = 0.0
        if velocity is not None and self.soft_ms:
            extra = self.soft_ms * (127 - min(max(velocity, 1), 127)) / 126.0
        return (self.base_ms + extra) / 1000.0


def check_against_lead(latency: OutputLatency, lead_ms: float) -> None:
    """An answer is decided `lead_ms` before its bar line; its first note must still leave after that."""
    if latency.most_ms >= lead_ms:
        raise ConfigError(
            f"midi.output_latency_ms + midi.output_latency_soft_ms = {latency.most_ms:g}: must be less than "
            f"daemon.lead_ms ({lead_ms:g}), or the first notes of an answer would be late"
        )
