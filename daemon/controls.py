"""Live controls of the daemon and the commands that change them, parsed from OSC or MQTT.

This is the pure core of the control surface: no sockets, no event loop. `parse_command`
turns an address tail (`"temperature"`) and its arguments into a `Command`, and is the only
place where control values are checked, so OSC and MQTT accept exactly the same things.
Out-of-range values are rejected, never clamped: a performer who sends 7.0 for temperature
gets an error reply instead of a silently different sound.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from daemon.errors import DaemonError

# Longest string argument (mode names, checkpoint paths) and longest MQTT payload accepted; a
# bound keeps a stray binary blob from turning into a huge error message or log line.
MAX_STRING = 1024
MAX_PAYLOAD = 4096

MODES = ("call_response", "autopilot", "manual", "off")
# What a MIDI control change can steer (daemon.cc_map): controls it sets, then actions it fires.
CC_CONTROLS = ("temperature", "top_p", "length", "silence_beats", "mode")
CC_ACTIONS = ("trigger", "reset", "panic", "stop", "next_mode")
CC_TARGETS = CC_CONTROLS + CC_ACTIONS
# Significant digits kept of a float control: OSC floats are 32-bit (7 digits), so 0.7 arrives as
# 0.699999988079071; six digits give back what the musician set, in status, MQTT and the log.
FLOAT_DIGITS = 6
ParamKind = Literal["float", "int", "choice"]


class ControlError(DaemonError):
    """A control command was rejected; `reason` is the short text sent back to the sender."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NoReplyError(DaemonError):
    """An OSC request got no reply within the timeout (daemon not running, wrong port)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(f"no reply from {host}:{port} to {address} within {timeout:g} s")
        self.host = host
        self.port = port
        self.address = address
        self.timeout = timeout


@dataclass(frozen=True)
class ParamSpec:
    """One settable control: its type and allowed values (inclusive bounds)."""

    kind: ParamKind
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()
    doc: str = ""

    def describe(self) -> str:
        """The allowed values in words, as shown in error replies and docs."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        return f"between {_fmt(self.low)} and {_fmt(self.high)}"


# The one table of settable controls. top_k above the vocabulary size behaves like 0 (off);
# seed -1 draws a fresh random seed per completion; 2**31 - 1 is the largest OSC `i` value.
PARAMS: dict[str, ParamSpec] = {
    "temperature": ParamSpec("float", 0.05, 5.0, doc="sampling temperature"),
    "top_p": ParamSpec("float", 0.01, 1.0, doc="nucleus sampling mass (1 = off)"),
    "top_k": ParamSpec("int", 0, 65536, doc="keep the k most likely tokens (0 = off)"),
    "length": ParamSpec("int", 1, 64, doc="completion length in bars"),
    "mode": ParamSpec("choice", choices=MODES, doc="when the daemon plays"),
    "tempo": ParamSpec("float", 20.0, 300.0, doc="internal clock tempo in BPM"),
    "seed": ParamSpec("int", -1, 2**31 - 1, doc="sampling seed (-1 = random)"),
    "silence_beats": ParamSpec("float", 0.5, 64.0, doc="beats of silence before call_response answers"),
}


@dataclass(frozen=True)
class Controls:
    """The live control values; every field is checked against `PARAMS` on construction."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    length: int = 2
    mode: str = "call_response"
    tempo: float = 120.0
    seed: int = -1
    silence_beats: float = 2.0

    def __post_init__(self) -> None:
        for name in PARAMS:
            # Re-check through the same path commands take, so config and OSC agree.
            object.__setattr__(self, name, check_value(name, getattr(self, name)))

    def apply(self, command: SetParam) -> Controls:
        """A copy with `command`'s value set (already validated by `parse_command`)."""
        return dataclasses.replace(self, **{command.name: command.value})

    def as_dict(self) -> dict[str, float | int | str]:
        """Field name -> value, in `PARAMS` order (what status replies carry)."""
        return {name: getattr(self, name) for name in PARAMS}


@dataclass(frozen=True)
class SetParam:
    """Set one control; `value` is already checked and of the control's type."""

    name: str
    value: float | int | str


@dataclass(frozen=True)
class Trigger:
    """Play a completion now (the `manual` mode's button; works in every mode but `off`)."""


@dataclass(frozen=True)
class Reset:
    """Forget the musical context: fresh recurrent state and token history."""


@dataclass(frozen=True)
class Panic:
    """Stop sounding at once: note-offs for held notes, then All Notes Off on every output."""


@dataclass(frozen=True)
class StopAnswer:
    """Stop the answer now (note-offs for what sounds); the mode stays as it is."""


@dataclass(frozen=True)
class Learn:
    """MIDI learn: bind the next control change on the input to `target` (one of CC_TARGETS)."""

    target: str


@dataclass(frozen=True)
class Unlearn:
    """Remove the control change bound to `target` (learned or configured); cancels its learn."""

    target: str


@dataclass(frozen=True)
class Subscribe:
    """Send note and status events to `port` on `host` (the OSC sender's address) for a while."""

    port: int
    host: str | None = None  # filled in by the OSC server from the sender


@dataclass(frozen=True)
class Unsubscribe:
    """Stop sending events to `port` on `host`."""

    port: int
    host: str | None = None


@dataclass(frozen=True)
class Reload:
    """Load a checkpoint (`path`; None: the one in use) and swap it in at a bar boundary.

    `model_id` comes from a trainer's announcement; the daemon may skip a reload whose id
    equals the running model's.
    """

    path: str | None = None
    model_id: str | None = None


@dataclass(frozen=True)
class Style:
    """Swap to a tuned checkpoint in `[daemon] styles_dir` by name at the next bar line (`name`
    "default": the configured checkpoint); None lists the styles (daemon.styles)."""

    name: str | None = None


@dataclass(frozen=True)
class Status:
    """Ask for the current values; the handler answers with a dict."""


Command = (
    SetParam | Trigger | Reset | Panic | StopAnswer | Reload | Style | Status
    | Learn | Unlearn | Subscribe | Unsubscribe
)

_ACTIONS: dict[str, type[Command]] = {
    "trigger": Trigger,
    "reset": Reset,
    "panic": Panic,
    "stop": StopAnswer,
    "status": Status,
}
_TARGETED: dict[str, type[Learn] | type[Unlearn]] = {"learn": Learn, "unlearn": Unlearn}
_PORTED: dict[str, type[Subscribe] | type[Unsubscribe]] = {"subscribe": Subscribe, "unsubscribe": Unsubscribe}

# Every address tail parse_command understands, in the order the docs list them.
ADDRESSES: tuple[str, ...] = (*PARAMS, *_ACTIONS, "reload", "style", *_TARGETED, *_PORTED)


def check_value(name: str, value: Any) -> float | int | str:
    """Check `value` for control `name` and return it in the control's type.

    Ints are accepted for float controls; bools are not numbers; floats are not accepted for
    int controls (5.5 bars has no meaning, and accepting 5.0 but not 5.5 surprises people).
    Raises ControlError with a short reason.
    """
    spec = PARAMS.get(name)
    if spec is None:
        raise ControlError(f"unknown control {_short(name)}")
    if spec.kind == "choice":
        if not isinstance(value, str):
            raise ControlError(f"{name} must be a string, {spec.describe()}")
        if value not in spec.choices:
            raise ControlError(f"{name} must be {spec.describe()} (got {_short(value)})")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if spec.kind == "int" else "a number"
        raise ControlError(f"{name} must be {kind} (got {_type_name(value)})")
    if spec.kind == "int" and not isinstance(value, int):
        raise ControlError(f"{name} must be an integer (got {_type_name(value)})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ControlError(f"{name} must be a finite number (got {value})")
    # Compared before any int -> float conversion, which overflows for huge ints.
    if not (spec.low <= value <= spec.high):
        raise ControlError(f"{name} must be {spec.describe()} (got {_fmt(value)})")
    return float(f"{value:.{FLOAT_DIGITS}g}") if spec.kind == "float" else value


def parse_command(address_tail: str, args: tuple[Any, ...] | list[Any]) -> Command:
    """Turn an address tail (`"temperature"`, no prefix, no slash) and its arguments into a Command.

    Controls take exactly one argument; trigger, reset, panic, stop and status take none; reload
    takes none or one non-empty path string; style none (list the styles) or one name; learn and
    unlearn one of CC_TARGETS; subscribe and unsubscribe one UDP port. Raises ControlError(reason)
    for anything else.
    """
    args = tuple(args)
    if address_tail in PARAMS:
        if len(args) != 1:
            raise ControlError(f"{address_tail} takes 1 argument (got {len(args)})")
        return SetParam(address_tail, check_value(address_tail, args[0]))
    if address_tail in _ACTIONS:
        if args:
            raise ControlError(f"{address_tail} takes no arguments (got {len(args)})")
        return _ACTIONS[address_tail]()
    if address_tail == "reload":
        if not args:
            return Reload(None)
        if len(args) > 1:
            raise ControlError(f"reload takes 0 or 1 argument (got {len(args)})")
        return Reload(check_path(args[0], "reload path"))
    if address_tail == "style":
        from daemon.styles import check_style_name

        if len(args) > 1:
            raise ControlError(f"style takes 0 or 1 argument (got {len(args)})")
        return Style(check_style_name(args[0]) if args else None)
    if address_tail in _TARGETED:
        if len(args) != 1:
            raise ControlError(f"{address_tail} takes 1 argument, the control or action (got {len(args)})")
        target = args[0]
        if not isinstance(target, str) or target not in CC_TARGETS:
            raise ControlError(f"{address_tail} takes one of {', '.join(CC_TARGETS)} (got {_short(target)})")
        return _TARGETED[address_tail](target)
    if address_tail in _PORTED:
        if len(args) != 1:
            raise ControlError(f"{address_tail} takes 1 argument, the UDP port to send to (got {len(args)})")
        port = args[0]
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ControlError(f"{address_tail} port must be an integer between 1 and 65535 (got {_short(port)})")
        return _PORTED[address_tail](port)
    raise ControlError(f"unknown address {_short(address_tail)}")


def check_path(value: Any, what: str) -> str:
    """A checkpoint path as sent by a client: a non-empty string without NUL, bounded length."""
    if not isinstance(value, str):
        raise ControlError(f"{what} must be a string (got {_type_name(value)})")
    if not value or "\x00" in value or len(value) > MAX_STRING:
        raise ControlError(f"{what} must be a non-empty string of at most {MAX_STRING} characters")
    return value


def parse_payload(payload: bytes | str) -> tuple[Any, ...]:
    """MQTT payload text -> argument tuple for `parse_command`.

    Empty -> no arguments. JSON numbers, strings and booleans -> one argument (so "0.8" is a
    float, "12" an int, "true" a bool that number controls then reject); a JSON array of
    such scalars -> several arguments; text that is not JSON (`call_response`, a path) -> one
    string. JSON null and objects, non-UTF-8 bytes and oversized payloads -> ControlError.
    """
    if isinstance(payload, (bytes, bytearray)):
        if len(payload) > MAX_PAYLOAD:
            raise ControlError(f"payload longer than {MAX_PAYLOAD} bytes")
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ControlError("payload is not UTF-8 text") from err
    else:
        text = payload
        if len(text) > MAX_PAYLOAD:
            raise ControlError(f"payload longer than {MAX_PAYLOAD} characters")
    text = text.strip()
    if not text:
        return ()
    try:
        value = json.loads(text)
    except ValueError:
        return (text,)
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item is None or isinstance(item, (dict, list)):
            raise ControlError("payload must be a number, a string, or a JSON array of them")
    return tuple(items)


def parse_text_command(address_tail: str, payload: bytes | str) -> Command:
    """`parse_command` for text payloads (MQTT `set/<param>` topics)."""
    return parse_command(address_tail, parse_payload(payload))


def parse_announcement(payload: bytes | str) -> Reload:
    """A trainer's checkpoint announcement, JSON {"path": str, "model_id": str?} -> Reload."""
    if isinstance(payload, (bytes, bytearray)) and len(payload) > MAX_PAYLOAD:
        raise ControlError(f"announcement longer than {MAX_PAYLOAD} bytes")
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as err:
        raise ControlError("announcement is not JSON") from err
    if not isinstance(value, Mapping) or "path" not in value:
        raise ControlError('announcement must be a JSON object with a "path"')
    model_id = value.get("model_id")
    if model_id is not None and (not isinstance(model_id, str) or len(model_id) > MAX_STRING):
        raise ControlError("announcement model_id must be a string")
    return Reload(check_path(value["path"], "announcement path"), model_id)


def _fmt(value: float) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"string {_short(value)}"
    if value is None:
        return "nothing"
    return type(value).__name__
