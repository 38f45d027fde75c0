"""MIDI control changes as the daemon's controls and actions: the `[cc]` section and MIDI learn.

The pure core of steering from the instrument: no ports, no event loop. A `CcMap` holds which
control change (number 0-127, optionally one channel) moves which target, and turns an incoming
`ControlChange` into the same `Command`s OSC and MQTT send (`daemon.controls`), so a knob goes
through the one `Daemon.execute` and takes effect at the same safe points.

- A control (temperature, top_p, length, silence_beats) maps the CC value 0..127 onto its range
  from `[cc]`: temperature logarithmically (equal knob travel, equal ratio: 0.3 -> 0.75 -> 2.0),
  the others linearly; values are rounded to what a person would set (temperature 0.01, top_p
  0.001, length whole bars, silence_beats a quarter beat).
- `mode`: the value picks one of the four modes (0-31 call_response, 32-63 autopilot, 64-95
  manual, 96-127 off); the action `next_mode` steps through them instead.
- An action (trigger, reset, panic, stop, next_mode) fires when the value rises past 64 (a value
  >= 64 after one below 64): a pedal or a button fires once per press, whatever it sends on release.
- A mapped CC is consumed: it is neither fed to the model nor echoed by MIDI thru.
- MIDI learn: `learn(target)` makes the next control change the binding of `target`; a CC moves
  one target only, so it leaves any other target it was bound to. The sustain pedal (CC 64, the
  model's pedal) and the channel mode messages (CC 120-127) are never bound.

`consumes(channel, control)` is read on the MIDI reader thread (thru); it reads one immutable
snapshot, replaced whole on every change, so it needs no lock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from daemon.controls import (
    CC_ACTIONS,
    CC_CONTROLS,
    CC_TARGETS,
    MODES,
    PARAMS,
    Command,
    Controls,
    Panic,
    Reset,
    SetParam,
    StopAnswer,
    Trigger,
)
from daemon.midi_events import SUSTAIN_PEDAL, ControlChange
from model.settings import ConfigError

# The sustain pedal is played music (encoded, fed to the model, echoed); 120-127 are the channel
# mode messages (All Sound Off, Reset All Controllers, All Notes Off, ...), handled by the ports.
RESERVED_CCS = frozenset({SUSTAIN_PEDAL, *range(120, 128)})
ACTION_THRESHOLD = 64  # an action fires when the value rises to this or above
CC_MAX = 127
UNMAPPED = -1
DEFAULT_LEARN_FILE = "~/.config/rwkv-music/learned-cc.json"

_ACTION_COMMANDS: dict[str, type[Command]] = {
    "trigger": Trigger,
    "reset": Reset,
    "panic": Panic,
    "stop": StopAnswer,
}
# Steps a continuous control's value is rounded to: what a person would set by hand.
_ROUNDING = {"temperature": 0.01, "top_p": 0.001, "length": 1, "silence_beats": 0.25}


@dataclass(frozen=True)
class CcBinding:
    """One control change: its number and, optionally, its channel (1-16; None = any channel)."""

    control: int
    channel: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.control, bool) or not isinstance(self.control, int) or not 0 <= self.control <= CC_MAX:
            raise ValueError(f"CC number must be 0..127 (got {self.control!r})")
        if self.channel is not None and (isinstance(self.channel, bool) or not 1 <= self.channel <= 16):
            raise ValueError(f"channel must be 1..16 (got {self.channel!r})")
        if self.control in RESERVED_CCS:
            raise ValueError(f"CC {self.control} cannot be bound (the sustain pedal and CC 120-127 are reserved)")

    def describe(self) -> str:
        """As status and the log show it: "CC 21" or "CC 21 ch 2"."""
        return f"CC {self.control}" if self.channel is None else f"CC {self.control} ch {self.channel}"

    def to_json(self) -> dict[str, int | None]:
        return {"cc": self.control, "channel": self.channel}

    @classmethod
    def from_json(cls, value: object) -> CcBinding:
        """From `to_json`'s dict; ValueError when it is not one."""
        if not isinstance(value, dict) or set(value) - {"cc", "channel"} or "cc" not in value:
            raise ValueError(f'expected {{"cc": N, "channel": N or null}} (got {value!r})')
        return cls(value["cc"], value.get("channel"))


@dataclass
class CcConfig:
    """`[cc]` in config.toml: which CC moves which control or fires which action, and the ranges.

    A binding is a CC number (any channel), [number, channel] for one channel (1-16), or -1 for
    none. By default only the modulation wheel (CC 1) moves the temperature (docs/control.md says
    why); everything else is unmapped until configured or learned.
    """

    temperature: int | list[int] = 1  # the modulation wheel
    top_p: int | list[int] = UNMAPPED
    length: int | list[int] = UNMAPPED
    silence_beats: int | list[int] = UNMAPPED
    mode: int | list[int] = UNMAPPED
    trigger: int | list[int] = UNMAPPED
    reset: int | list[int] = UNMAPPED
    panic: int | list[int] = UNMAPPED
    stop: int | list[int] = UNMAPPED
    next_mode: int | list[int] = UNMAPPED
    temperature_range: list[float] = field(default_factory=lambda: [0.3, 2.0])  # logarithmic
    top_p_range: list[float] = field(default_factory=lambda: [0.5, 1.0])
    length_range: list[int] = field(default_factory=lambda: [1, 16])  # bars
    silence_beats_range: list[float] = field(default_factory=lambda: [0.5, 8.0])
    learn_file: str = DEFAULT_LEARN_FILE  # learned bindings, read at start ("" = learning is not kept)

    def __post_init__(self) -> None:
        bound = list(self.bindings().items())
        for i, (target, binding) in enumerate(bound):
            for other, other_binding in bound[:i]:
                if _overlap(binding, other_binding):
                    raise ConfigError(
                        f"cc.{target} = {binding.describe()}: cc.{other} has it already (a CC moves one target)"
                    )
        for name in ("temperature", "top_p", "length", "silence_beats"):
            key = f"cc.{name}_range"
            low_high = getattr(self, f"{name}_range")
            spec = PARAMS[name]
            if len(low_high) != 2 or not spec.low <= low_high[0] < low_high[1] <= spec.high:
                raise ConfigError(
                    f"{key} = {low_high!r}: must be [low, high] with {spec.low:g} <= low < high <= {spec.high:g}"
                )

    def bindings(self) -> dict[str, CcBinding]:
        """Target -> binding of the mapped targets. Raises ConfigError naming the key."""
        found = {}
        for target in CC_TARGETS:
            value = getattr(self, target)
            key = f"cc.{target}"
            if value == UNMAPPED:
                continue
            try:
                if isinstance(value, list):
                    if len(value) != 2:
                        raise ValueError("expected [CC number, channel]")
                    found[target] = CcBinding(value[0], value[1])
                else:
                    found[target] = CcBinding(value)
            except ValueError as err:
                raise ConfigError(f"{key} = {value!r}: {err}; -1 = none") from err
        return found

    def range_of(self, target: str) -> tuple[float, float]:
        low, high = getattr(self, f"{target}_range")
        return low, high


def _overlap(a: CcBinding, b: CcBinding) -> bool:
    """Whether one control change could match both bindings."""
    return a.control == b.control and (a.channel is None or b.channel is None or a.channel == b.channel)


@dataclass(frozen=True)
class CcResult:
    """What one consumed control change does: commands to execute, and a binding it was learned as."""

    commands: tuple[Command, ...] = ()
    learned: tuple[str, CcBinding] | None = None


class CcMap:
    """Bindings from control changes to targets, action edges and the pending MIDI learn."""

    def __init__(self, config: CcConfig, learned: Mapping[str, CcBinding | None] | None = None):
        self.config = config
        bindings = config.bindings()
        for target, binding in (learned or {}).items():
            bindings.pop(target, None)
            if binding is not None:
                self._take_away(bindings, binding)
                bindings[target] = binding
        self._bindings: dict[str, CcBinding] = bindings
        self._index = self._build_index()
        self._high: dict[str, bool] = {}  # action -> its CC's last value was >= ACTION_THRESHOLD
        self.learning: str | None = None  # the target waiting for its control change

    # -- reading (any thread) -----------------------------------------------------------------

    def consumes(self, channel: int, control: int) -> bool:
        """Whether the daemon takes CC `control` on `channel` (0-15) for itself (thru skips it)."""
        if self.learning is not None and control not in RESERVED_CCS:
            return True
        index = self._index
        return (channel, control) in index or (None, control) in index

    @property
    def bindings(self) -> dict[str, CcBinding]:
        return dict(self._bindings)

    def describe(self) -> dict[str, str]:
        """Target -> "CC n [ch c]" for the status, in CC_TARGETS order."""
        return {t: self._bindings[t].describe() for t in CC_TARGETS if t in self._bindings}

    # -- the event loop ------------------------------------------------------------------------

    def handle(self, event: ControlChange, controls: Controls) -> CcResult | None:
        """The commands `event` stands for; None when it is not the daemon's (feed it onward)."""
        if self.learning is not None and event.control not in RESERVED_CCS:
            target, self.learning = self.learning, None
            binding = CcBinding(event.control, event.channel + 1)
            self.bind(target, binding)
            self._high[target] = event.value >= ACTION_THRESHOLD  # learning is no press
            return CcResult(learned=(target, binding))
        index = self._index
        target = index.get((event.channel, event.control)) or index.get((None, event.control))
        if target is None:
            return None
        if target in CC_ACTIONS:
            high = event.value >= ACTION_THRESHOLD
            rising = high and not self._high.get(target, False)
            self._high[target] = high
            if not rising:
                return CcResult()
            if target == "next_mode":
                following = MODES[(MODES.index(controls.mode) + 1) % len(MODES)]
                return CcResult((SetParam("mode", following),))
            return CcResult((_ACTION_COMMANDS[target](),))
        return CcResult((SetParam(target, self.value_for(target, event.value)),))

    def value_for(self, target: str, value: int) -> float | int | str:
        """The control value CC value `value` (0..127) stands for."""
        x = min(max(value, 0), CC_MAX) / CC_MAX
        if target == "mode":
            return MODES[min(len(MODES) - 1, value * len(MODES) // (CC_MAX + 1))]
        low, high = self.config.range_of(target)
        if target == "temperature":  # equal knob travel, equal ratio
            raw = low * math.exp(x * math.log(high / low))
        else:
            raw = low + x * (high - low)
        step = _ROUNDING[target]
        if target == "length":
            return int(min(max(round(raw), low), high))
        rounded = round(round(raw / step) * step, 6)
        return min(max(rounded, low), high)

    def learn(self, target: str) -> None:
        """The next control change (not CC 64 or 120-127) becomes `target`'s binding."""
        if target not in CC_TARGETS:
            raise ValueError(f"unknown CC target {target!r}")
        self.learning = target

    def bind(self, target: str, binding: CcBinding) -> None:
        """Bind `target` to `binding`, taking that CC away from any other target."""
        bindings = dict(self._bindings)
        self._take_away(bindings, binding)
        bindings[target] = binding
        self._bindings = bindings
        self._index = self._build_index()

    def unbind(self, target: str) -> CcBinding | None:
        """Remove `target`'s binding (and a learn waiting for it); returns what it was bound to."""
        if self.learning == target:
            self.learning = None
        bindings = dict(self._bindings)
        removed = bindings.pop(target, None)
        self._bindings = bindings
        self._index = self._build_index()
        return removed

    @staticmethod
    def _take_away(bindings: dict[str, CcBinding], binding: CcBinding) -> None:
        for other, existing in list(bindings.items()):
            if _overlap(existing, binding):
                del bindings[other]

    def _build_index(self) -> dict[tuple[int | None, int], str]:
        return {
            (None if b.channel is None else b.channel - 1, b.control): target for target, b in self._bindings.items()
        }


__all__ = ["CC_CONTROLS", "CcBinding", "CcConfig", "CcMap", "CcResult", "RESERVED_CCS"]
