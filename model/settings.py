"""config.toml loading: TOML file + `--set section.key=value` overrides -> typed dataclasses.

Each part of the program owns the dataclass for its section (`[daemon]` lives in daemon/,
`[train]` in train/, `[model]` here in model/); this module only reads, merges and validates,
once at start, with errors that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the key."""


def read_config(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a TOML file (None: no file, only overrides) and apply `section.key=value` overrides.

    Override values are parsed as TOML values when they parse (numbers, booleans, quoted
    strings, arrays), else taken as bare strings, so `--set midi.api=jack` works unquoted.
    """
    table: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: {err}") from err
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, _, name = key.strip().partition(".")
        table.setdefault(section, {})[name] = _parse_value(raw.strip())
    return table


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def load_section(cls: type[T], table: dict[str, Any], section: str) -> T:
    """Build dataclass `cls` from `table[section]`, rejecting unknown keys and wrong types.

    Range checks belong in the dataclass's `__post_init__`, raising ConfigError with the key.
    """
    values = dict(table.get(section, {}))
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"[{section}] unknown key {unknown[0]!r}; known keys: {', '.join(sorted(fields))}"
        )
    for name, value in values.items():
        values[name] = _check_type(f"{section}.{name}", value, hints[name])
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[{section}] {err}") from err


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r}: must be one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: must be a list")
        return [_check_type(f"{key}[]", v, args[0]) for v in value] if args else value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: must be a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: must be an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: must be true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: must be a string")
        return value
    return value


def check_range(key: str, value: float, low: float, high: float) -> None:
    """Raise ConfigError naming `key` unless low <= value <= high."""
    if not (low <= value <= high):
        raise ConfigError(f"{key} = {value!r}: must be between {low} and {high}")
