"""The CC map (pure core), the learned-bindings file, output latency and the subscriber set."""

from __future__ import annotations

import json

import pytest

from daemon.cc_learned import read_learned, write_learned
from daemon.cc_map import CcBinding, CcConfig, CcMap
from daemon.config import load_daemon_settings
from daemon.controls import MODES, Controls, Panic, SetParam, StopAnswer, Trigger
from daemon.midi_events import ControlChange
from daemon.output_latency import OutputLatency
from daemon.subscribers import LEASE_S, MAX_SUBSCRIBERS, SubscriberSet
from model.settings import ConfigError


def cc(control: int, value: int, channel: int = 0) -> ControlChange:
    return ControlChange(channel, control, value, 0.0)


def test_cc_map_temperature_is_logarithmic_rounded_and_monotonic():
    cc_map = CcMap(CcConfig(temperature=21))
    values = [cc_map.handle(cc(21, v), Controls()).commands[0].value for v in range(128)]
    assert values[0] == 0.3 and values[127] == 2.0
    assert values[64] == pytest.approx((0.3 * 2.0) ** 0.5, abs=0.01)  # the geometric middle
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert all(round(v, 2) == v for v in values)


def test_cc_map_length_silence_top_p_and_mode_ranges():
    cc_map = CcMap(CcConfig(temperature=-1, length=20, silence_beats=21, top_p=22, mode=23))
    assert cc_map.value_for("length", 0) == 1 and cc_map.value_for("length", 127) == 16
    assert cc_map.value_for("silence_beats", 127) == 8.0 and cc_map.value_for("silence_beats", 40) % 0.25 == 0
    assert cc_map.value_for("top_p", 0) == 0.5 and cc_map.value_for("top_p", 127) == 1.0
    assert [cc_map.value_for("mode", v) for v in (0, 31, 32, 64, 96, 127)] == [
        "call_response", "call_response", "autopilot", "manual", "off", "off"
    ]
    assert cc_map.handle(cc(20, 127), Controls()).commands == (SetParam("length", 16),)


def test_cc_map_action_fires_once_per_rising_edge_past_64():
    cc_map = CcMap(CcConfig(trigger=30, panic=[31, 2], stop=32, next_mode=33))
    fired = [cc_map.handle(cc(30, v), Controls()).commands for v in (0, 63, 64, 127, 90, 10, 100)]
    assert fired == [(), (), (Trigger(),), (), (), (), (Trigger(),)]
    assert cc_map.handle(cc(31, 127, channel=0), Controls()) is None  # panic listens on channel 2 only
    assert cc_map.handle(cc(31, 127, channel=1), Controls()).commands == (Panic(),)
    assert cc_map.handle(cc(32, 127), Controls()).commands == (StopAnswer(),)
    assert cc_map.handle(cc(33, 127), Controls(mode="off")).commands == (SetParam("mode", MODES[0]),)


def test_cc_map_consumes_mapped_ccs_only_and_leaves_the_sustain_pedal():
    cc_map = CcMap(CcConfig(temperature=1, trigger=[30, 3]))
    assert cc_map.consumes(5, 1) and cc_map.consumes(2, 30)
    assert not cc_map.consumes(0, 30) and not cc_map.consumes(0, 7) and not cc_map.consumes(0, 64)
    assert cc_map.handle(cc(64, 127), Controls()) is None and cc_map.handle(cc(7, 100), Controls()) is None
    cc_map.learn("top_p")
    assert cc_map.consumes(0, 7) and not cc_map.consumes(0, 64)  # learning takes the next CC, not the pedal
    assert cc_map.handle(cc(64, 127), Controls()) is None
    result = cc_map.handle(cc(1, 90, channel=3), Controls())  # the mod wheel leaves temperature for top_p
    assert result.learned == ("top_p", CcBinding(1, 4)) and result.commands == ()
    assert cc_map.learning is None and cc_map.describe() == {"top_p": "CC 1 ch 4", "trigger": "CC 30 ch 3"}
    assert cc_map.unbind("top_p") == CcBinding(1, 4) and not cc_map.consumes(3, 1)


def test_cc_learned_file_round_trip_and_overrides_the_config(tmp_path):
    path = tmp_path / "sub" / "learned.json"
    write_learned(path, {"top_p": CcBinding(21, 1), "temperature": None})
    learned = read_learned(path)
    assert learned == {"top_p": CcBinding(21, 1), "temperature": None}
    cc_map = CcMap(CcConfig(temperature=1, trigger=21), learned)
    assert cc_map.describe() == {"top_p": "CC 21 ch 1"}  # learned CC 21 took it from trigger
    assert read_learned(tmp_path / "missing.json") == {}
    path.write_text(json.dumps({"version": 1, "bindings": {"volume": None}}))
    with pytest.raises(ConfigError, match="learn_file .*unknown target 'volume'"):
        read_learned(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cc.top_p=1", "cc.top_p = CC 1: cc.temperature has it already"),
        ("cc.trigger=64", "cc.trigger = 64: CC 64 cannot be bound"),
        ("cc.stop=[3, 17]", "cc.stop = [3, 17]: channel must be 1..16"),
        ("cc.length_range=[0, 16]", "cc.length_range = [0, 16]: must be [low, high] with 1 <= low < high <= 64"),
        ("midi.output_latency_ms=-600", "midi.output_latency_ms = -600.0: must be between -500.0 and 500.0"),
        ("midi.output_latency_ms=300", "must be less than daemon.lead_ms (300)"),
    ],
)
def test_cc_and_latency_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_daemon_settings(None, [override])
    assert message in str(info.value)


def test_output_latency_soft_notes_leave_earlier():
    latency = OutputLatency(20.0, 30.0)
    assert latency.seconds() == pytest.approx(0.020)
    assert latency.seconds(127) == pytest.approx(0.020) and latency.seconds(1) == pytest.approx(0.050)
    assert latency.seconds(64) == pytest.approx(0.020 + 0.030 * 63 / 126)
    assert OutputLatency(-10.0).seconds(100) == pytest.approx(-0.010)


def test_subscriber_set_is_bounded_batches_notes_and_forgets_silent_subscribers():
    now = [100.0]
    sent: list[tuple[str, list, tuple[str, int]]] = []
    subs = SubscriberSet(lambda a, args, to: sent.append((a, list(args), to)), "/rwkv", clock=lambda: now[0])
    subs.note("player", 60, 90, 1.0)  # nobody listens: not even queued
    subs.subscribe("127.0.0.1", 9100)
    for port in range(1, MAX_SUBSCRIBERS):
        subs.subscribe("127.0.0.1", 9100 + port)
    with pytest.raises(Exception, match="too many subscribers"):
        subs.subscribe("127.0.0.1", 9999)
    for i in range(70):
        subs.note("answer", 60 + i % 12, 80, i / 8)
    assert subs.status_due()
    subs.flush(["tempo", 120.0])
    to_first = [(a, args) for a, args, to in sent if to == ("127.0.0.1", 9100)]
    assert [a for a, _ in to_first] == ["/rwkv/notes", "/rwkv/notes", "/rwkv/status"]
    assert len(to_first[0][1]) == 64 * 4 and to_first[0][1][:4] == ["answer", 60, 80, 0.0]
    assert not subs.status_due()
    now[0] += LEASE_S / 2
    subs.subscribe("127.0.0.1", 9100)  # renewed; the others are not
    assert subs.unsubscribe("127.0.0.1", 9101) and not subs.unsubscribe("127.0.0.1", 9101)
    now[0] += LEASE_S / 2 + 1
    subs.flush()
    assert subs.addresses == [("127.0.0.1", 9100)] and subs.stats.expired == MAX_SUBSCRIBERS - 2
