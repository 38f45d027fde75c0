"""The pure control core: values, ranges, command parsing for OSC arguments and MQTT text."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.controls import (
    ADDRESSES,
    MAX_PAYLOAD,
    MODES,
    PARAMS,
    ControlError,
    Controls,
    Panic,
    Reload,
    Reset,
    SetParam,
    Status,
    Trigger,
    check_value,
    parse_announcement,
    parse_command,
    parse_payload,
    parse_text_command,
)
from daemon.errors import DaemonError


def test_controls_defaults_are_within_ranges():
    values = Controls().as_dict()
    assert list(values) == list(PARAMS)
    for name, value in values.items():
        assert check_value(name, value) == value


def test_controls_apply_returns_updated_copy():
    before = Controls()
    after = before.apply(parse_command("temperature", (0.7,)))
    assert after.temperature == pytest.approx(0.7)
    assert before.temperature == 1.0
    assert after.as_dict() | {"temperature": 1.0} == before.as_dict()


def test_controls_construction_rejects_out_of_range():
    with pytest.raises(ControlError, match="length"):
        Controls(length=0)
    with pytest.raises(ControlError, match="mode"):
        Controls(mode="loud")


def test_control_error_is_daemon_error_with_reason():
    with pytest.raises(DaemonError) as info:
        parse_command("temperature", (99.0,))
    assert isinstance(info.value, ControlError)
    assert info.value.reason == "temperature must be between 0.05 and 5 (got 99)"


@pytest.mark.parametrize(
    ("tail", "args", "expected"),
    [
        ("temperature", (0.8,), SetParam("temperature", 0.8)),
        ("temperature", (2,), SetParam("temperature", 2.0)),  # int accepted for a float
        ("top_p", (1.0,), SetParam("top_p", 1.0)),
        ("top_k", (0,), SetParam("top_k", 0)),
        ("length", (64,), SetParam("length", 64)),
        ("mode", ("autopilot",), SetParam("mode", "autopilot")),
        ("tempo", (20,), SetParam("tempo", 20.0)),
        ("seed", (-1,), SetParam("seed", -1)),
        ("seed", (2**31 - 1,), SetParam("seed", 2**31 - 1)),
        ("silence_beats", (1.5,), SetParam("silence_beats", 1.5)),
        ("trigger", (), Trigger()),
        ("reset", (), Reset()),
        ("panic", (), Panic()),
        ("status", (), Status()),
        ("reload", (), Reload(None)),
        ("reload", ("runs/a/latest.safetensors",), Reload("runs/a/latest.safetensors")),
    ],
)
def test_parse_command_accepts(tail, args, expected):
    command = parse_command(tail, args)
    assert command == expected
    if isinstance(expected, SetParam):
        assert type(command.value) is type(expected.value)


@pytest.mark.parametrize(
    ("tail", "args", "reason"),
    [
        ("temperature", (float("nan"),), "temperature must be a finite number (got nan)"),
        ("temperature", (float("inf"),), "temperature must be a finite number (got inf)"),
        ("temperature", (True,), "temperature must be a number (got a boolean)"),
        ("temperature", ("hot",), "temperature must be a number (got string 'hot')"),
        ("temperature", (0.0,), "temperature must be between 0.05 and 5 (got 0)"),
        ("temperature", (10**400,), "temperature must be between 0.05 and 5 (got 100000000000000000000...)"),
        ("temperature", (), "temperature takes 1 argument (got 0)"),
        ("temperature", (0.5, 0.6), "temperature takes 1 argument (got 2)"),
        ("top_p", (1.01,), "top_p must be between 0.01 and 1 (got 1.01)"),
        ("top_k", (5.0,), "top_k must be an integer (got float)"),
        ("top_k", (-1,), "top_k must be between 0 and 65536 (got -1)"),
        ("length", (0,), "length must be between 1 and 64 (got 0)"),
        ("length", (65,), "length must be between 1 and 64 (got 65)"),
        ("mode", ("loud",), "mode must be one of call_response, autopilot, manual, off (got 'loud')"),
        ("mode", (1,), "mode must be a string, one of call_response, autopilot, manual, off"),
        ("tempo", (19.9,), "tempo must be between 20 and 300 (got 19.9)"),
        ("seed", (-2,), "seed must be between -1 and 2147483647 (got -2)"),
        ("seed", (None,), "seed must be an integer (got nothing)"),
        ("trigger", (1.0,), "trigger takes no arguments (got 1)"),
        ("reload", ("",), "reload path must be a non-empty string of at most 1024 characters"),
        ("reload", ("a" * 1025,), "reload path must be a non-empty string of at most 1024 characters"),
        ("reload", (3,), "reload path must be a string (got int)"),
        ("reload", ("a", "b"), "reload takes 0 or 1 argument (got 2)"),
        ("volume", (1,), "unknown address 'volume'"),
        ("", (), "unknown address ''"),
    ],
)
def test_parse_command_rejects(tail, args, reason):
    with pytest.raises(ControlError) as info:
        parse_command(tail, args)
    assert info.value.reason == reason


def test_parse_command_knows_every_documented_address():
    for tail in ADDRESSES:
        spec = PARAMS.get(tail)
        if tail in ("learn", "unlearn"):
            parse_command(tail, ("temperature",))
        elif tail in ("subscribe", "unsubscribe"):
            parse_command(tail, (9001,))
        elif spec is None:
            parse_command(tail, ())
        elif spec.kind == "choice":
            parse_command(tail, (spec.choices[0],))
        else:
            parse_command(tail, (spec.low,))
            parse_command(tail, (spec.high,))


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_parse_command_float_accepted_exactly_when_in_range(value):
    spec = PARAMS["temperature"]
    inside = math.isfinite(value) and spec.low <= value <= spec.high
    if inside:
        assert parse_command("temperature", (value,)) == SetParam("temperature", float(f"{value:.6g}"))
    else:
        with pytest.raises(ControlError):
            parse_command("temperature", (value,))


# Plain ints, and ints far beyond what a float holds (they must not overflow the check).
ANY_INT = st.integers() | st.integers(-(10**30), 10**30).map(lambda i: i * 10**300)


@given(ANY_INT)
def test_parse_command_int_accepted_exactly_when_in_range(value):
    if 1 <= value <= 64:
        assert parse_command("length", (value,)) == SetParam("length", value)
    else:
        with pytest.raises(ControlError):
            parse_command("length", (value,))


@given(ANY_INT)
def test_parse_command_int_for_float_control_accepted_exactly_when_in_range(value):
    if 20 <= value <= 300:
        command = parse_command("tempo", (value,))
        assert command == SetParam("tempo", float(value)) and isinstance(command.value, float)
    else:
        with pytest.raises(ControlError):
            parse_command("tempo", (value,))


@pytest.mark.parametrize(
    ("payload", "args"),
    [
        (b"0.8", (0.8,)),
        (b" 12\n", (12,)),
        (b"call_response", ("call_response",)),
        (b'"manual"', ("manual",)),
        (b"runs/x/latest.safetensors", ("runs/x/latest.safetensors",)),
        (b"", ()),
        ("  ", ()),
        (b"true", (True,)),
        (b"[1, 2]", (1, 2)),
        (b"0.8abc", ("0.8abc",)),
    ],
)
def test_parse_payload_text_to_arguments(payload, args):
    assert parse_payload(payload) == args


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "payload is not UTF-8 text"),
        (b"null", "payload must be a number, a string, or a JSON array of them"),
        (b'{"value": 1}', "payload must be a number, a string, or a JSON array of them"),
        (b"[[1]]", "payload must be a number, a string, or a JSON array of them"),
        (b"1" * (MAX_PAYLOAD + 1), f"payload longer than {MAX_PAYLOAD} bytes"),
    ],
)
def test_parse_payload_rejects_malformed(payload, reason):
    with pytest.raises(ControlError) as info:
        parse_payload(payload)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("tail", "payload", "expected"),
    [
        ("temperature", b"0.8", SetParam("temperature", 0.8)),
        ("top_k", b"40", SetParam("top_k", 40)),
        ("mode", b"call_response", SetParam("mode", "call_response")),
        ("trigger", b"", Trigger()),
        ("reload", b"", Reload(None)),
        ("reload", b"ckpt/new.safetensors", Reload("ckpt/new.safetensors")),
    ],
)
def test_parse_text_command_accepts(tail, payload, expected):
    assert parse_text_command(tail, payload) == expected


@pytest.mark.parametrize(
    ("tail", "payload", "reason"),
    [
        ("temperature", b"NaN", "temperature must be a finite number (got nan)"),
        ("temperature", b"Infinity", "temperature must be a finite number (got inf)"),
        ("temperature", b"warm", "temperature must be a number (got string 'warm')"),
        ("temperature", b"true", "temperature must be a number (got a boolean)"),
        ("temperature", b"", "temperature takes 1 argument (got 0)"),
        ("top_k", b"4.5", "top_k must be an integer (got float)"),
        ("mode", b"7", "mode must be a string, one of call_response, autopilot, manual, off"),
        ("trigger", b"1", "trigger takes no arguments (got 1)"),
    ],
)
def test_parse_text_command_rejects(tail, payload, reason):
    with pytest.raises(ControlError) as info:
        parse_text_command(tail, payload)
    assert info.value.reason == reason


def test_parse_announcement_reads_path_and_model_id():
    assert parse_announcement(b'{"path": "runs/a/latest.safetensors", "model_id": "ab12"}') == Reload(
        "runs/a/latest.safetensors", "ab12"
    )
    assert parse_announcement('{"path": "x.safetensors"}') == Reload("x.safetensors", None)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"runs/a/latest.safetensors", "announcement is not JSON"),
        (b"\xff", "announcement is not JSON"),
        (b"[1]", 'announcement must be a JSON object with a "path"'),
        (b'{"model_id": "ab"}', 'announcement must be a JSON object with a "path"'),
        (b'{"path": 3}', "announcement path must be a string (got int)"),
        (b'{"path": "x", "model_id": 5}', "announcement model_id must be a string"),
    ],
)
def test_parse_announcement_rejects_malformed(payload, reason):
    with pytest.raises(ControlError) as info:
        parse_announcement(payload)
    assert info.value.reason == reason


def test_modes_match_the_mode_param():
    assert PARAMS["mode"].choices == MODES


def test_parse_command_float32_temperature_reads_as_set():
    """OSC floats are 32-bit: 0.7 arrives as 0.699999988079071 and must show as 0.7."""
    import struct

    as_sent = struct.unpack(">f", struct.pack(">f", 0.7))[0]
    assert as_sent != 0.7
    assert parse_command("temperature", (as_sent,)) == SetParam("temperature", 0.7)
    assert parse_command("top_p", (struct.unpack(">f", struct.pack(">f", 0.93))[0],)).value == 0.93


@pytest.mark.parametrize(
    ("tail", "args", "reason"),
    [
        ("learn", (), "learn takes 1 argument"),
        ("learn", ("volume",), "learn takes one of temperature, top_p"),
        ("unlearn", (3,), "unlearn takes one of"),
        ("subscribe", (), "subscribe takes 1 argument"),
        ("subscribe", (0,), "port must be an integer between 1 and 65535 (got 0)"),
        ("subscribe", (9001.0,), "port must be an integer"),
        ("stop", (1,), "stop takes no arguments"),
    ],
)
def test_parse_command_learn_and_subscribe_refuse_bad_arguments(tail, args, reason):
    with pytest.raises(ControlError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_command(tail, args)
