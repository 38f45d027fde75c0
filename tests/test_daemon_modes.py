"""The pure mode logic (daemon.modes) and the daemon's configuration (daemon.config)."""

from __future__ import annotations

import pytest

from daemon.config import DaemonConfig, load_daemon_settings
from daemon.modes import Answer, AnswerAt, Discard, ModeMachine, RegularBars, TakeOver
from model.settings import ConfigError

BAR = 4.0  # 4/4


def machine(**kwargs) -> ModeMachine:
    values = dict(mode="call_response", silence_beats=2.0, length_bars=2, lead_beats=0.5, min_lead_beats=0.125)
    values.update(kwargs)
    return ModeMachine(RegularBars(BAR), **values)


def run_until(m: ModeMachine, start: float, end: float, step: float = 0.01) -> list[tuple[float, object]]:
    """Advance in small steps like the daemon's ticker; return (beat, decision) pairs."""
    out = []
    beat = start
    while beat <= end + 1e-9:
        out += [(beat, d) for d in m.advance(beat)]
        beat = round(beat + step, 6)
    return out


def play(m: ModeMachine, notes: list[tuple[float, float, int]]) -> list[object]:
    """Press and release keys (start, end, pitch) in time order; return the decisions."""
    events = sorted([(s, 1, p) for s, _, p in notes] + [(e, 0, p) for _, e, p in notes])
    out = []
    for beat, on, pitch in events:
        out += m.note_on(pitch, beat) if on else m.note_off(pitch, beat)
    return out


# -- call_response -----------------------------------------------------------------------------


def test_call_response_answers_at_the_first_bar_line_after_the_silence():
    m = machine()
    play(m, [(0.0, 1.0, 60), (1.0, 2.5, 64)])  # silent from beat 2.5: threshold 4.5 -> bar 2 (beat 8)
    decisions = run_until(m, 2.5, 12.0)
    assert len(decisions) == 1
    beat, decision = decisions[0]
    assert isinstance(decision, AnswerAt)
    answer = decision.answer
    assert (answer.bar, answer.bars, answer.start_beat, answer.end_beat) == (2, 2, 8.0, 16.0)
    assert answer.reason == "silence"
    # Decided lead_beats before its bar line, not earlier (the player might still play).
    assert beat == pytest.approx(7.5, abs=0.011)


def test_call_response_answers_on_the_bar_line_the_silence_reaches_exactly():
    m = machine()
    play(m, [(0.0, 2.0, 60)])  # threshold exactly at beat 4
    (beat, decision), = run_until(m, 2.0, 8.0)
    assert decision.answer.start_beat == 4.0 and beat == pytest.approx(3.5, abs=0.011)


def test_call_response_waits_while_a_key_is_held():
    m = machine()
    m.note_on(60, 0.0)
    assert run_until(m, 0.0, 20.0) == []  # held for ever: never silent
    m.note_off(60, 20.0)
    (_, decision), = run_until(m, 20.0, 28.0)
    assert decision.answer.start_beat == 24.0  # 20 + 2 -> next bar line 24


def test_call_response_answers_once_per_phrase():
    m = machine()
    play(m, [(0.0, 1.0, 60)])
    decisions = run_until(m, 1.0, 40.0)
    assert len(decisions) == 1  # its own answer and the silence after it do not start another
    play(m, [(41.0, 41.5, 62)])
    later = run_until(m, 41.5, 60.0)
    assert len(later) == 1 and later[0][1].answer.start_beat == 44.0


def test_call_response_skips_a_bar_line_too_close_to_reach():
    m = machine(lead_beats=0.5, min_lead_beats=0.25)
    play(m, [(0.0, 1.9, 60)])  # threshold 3.9: bar line 4.0 is only 0.1 beat after it
    (_, decision), = run_until(m, 3.9, 12.0)
    assert decision.answer.start_beat == 8.0


def test_note_before_the_bar_line_discards_the_pending_answer():
    m = machine()
    play(m, [(0.0, 1.0, 60)])
    (_, decided), = run_until(m, 1.0, 3.7)
    assert decided.answer.start_beat == 4.0
    out = m.note_on(62, 3.8)  # the player goes on before the answer's bar line
    assert out == [Discard(decided.answer, 3.8)]
    assert m.answers == ()
    m.note_off(62, 4.2)
    (_, again), = run_until(m, 4.2, 9.0)
    assert again.answer.start_beat == 8.0 and again.answer.id != decided.answer.id


def test_playing_over_a_sounding_answer_takes_over():
    m = machine()
    play(m, [(0.0, 1.0, 60)])
    (_, decided), = run_until(m, 1.0, 5.0)
    out = m.note_on(67, 5.5)  # the answer sounds from beat 4
    assert out == [TakeOver(decided.answer, 5.5)]
    assert m.answers == ()
    m.note_off(67, 6.0)
    (_, answer), = run_until(m, 6.0, 12.0)
    assert answer.answer.start_beat == 8.0  # the new phrase gets its own answer


def test_answer_is_over_at_its_end_and_a_later_note_stops_nothing():
    m = machine(length_bars=1)
    play(m, [(0.0, 1.0, 60)])
    run_until(m, 1.0, 8.5)  # answer in [4, 8)
    assert m.answers == ()
    assert m.note_on(60, 9.0) == []


# -- autopilot ------------------------------------------------------------------------------------


def test_autopilot_chains_answers_bar_after_bar_until_the_player_plays():
    m = machine(mode="autopilot", length_bars=1)
    decisions = run_until(m, 0.0, 15.6)
    starts = [d.answer.start_beat for _, d in decisions]
    assert starts == [4.0, 8.0, 12.0, 16.0]  # bar 0 is too close at beat 0
    assert all(d.answer.reason == "autopilot" for _, d in decisions)
    # Each one is decided lead_beats before its bar line, while the previous one plays.
    assert [round(b, 2) for b, _ in decisions] == [3.5, 7.5, 11.5, 15.5]
    out = m.note_on(60, 15.8)
    kinds = sorted(type(d).__name__ for d in out)
    assert kinds == ["Discard", "TakeOver"]  # the sounding one and the decided next one
    assert run_until(m, 15.8, 30.0) == []  # key held: quiet
    m.note_off(60, 30.0)
    resumed = run_until(m, 30.0, 37.0)
    assert [d.answer.start_beat for _, d in resumed] == [32.0, 36.0]


def test_autopilot_follows_silence_after_playing():
    m = machine(mode="autopilot", length_bars=2)
    play(m, [(0.0, 5.0, 60)])
    decisions = run_until(m, 5.0, 20.0)
    assert [d.answer.start_beat for _, d in decisions] == [8.0, 16.0]


# -- manual and off ----------------------------------------------------------------------------------


def test_manual_plays_only_on_trigger():
    m = machine(mode="manual")
    play(m, [(0.0, 1.0, 60)])
    assert run_until(m, 1.0, 20.0) == []
    (decision,) = m.trigger(20.1)
    assert isinstance(decision, AnswerAt)
    assert decision.answer.start_beat == 24.0 and decision.answer.reason == "trigger"
    # A second trigger queues after the first answer.
    (second,) = m.trigger(21.0)
    assert second.answer.start_beat == 32.0
    assert run_until(m, 21.0, 40.0) == []


def test_trigger_near_a_bar_line_takes_the_next_reachable_one():
    m = machine(mode="manual", min_lead_beats=0.25)
    (decision,) = m.trigger(3.9)
    assert decision.answer.start_beat == 8.0


def test_off_never_plays_and_switching_to_it_stops_everything():
    m = machine(mode="autopilot", length_bars=1)
    decisions = run_until(m, 0.0, 7.6)  # answers at 4 (sounding) and 8 (decided)
    assert len(decisions) == 2
    out = m.set_mode("off", 6.0)
    assert [type(d) for d in out] == [TakeOver, Discard]
    assert m.trigger(6.5) == []
    play(m, [(7.0, 8.0, 60)])
    assert run_until(m, 8.0, 30.0) == []
    m.set_mode("call_response", 30.0)
    play(m, [(30.0, 31.0, 60)])
    assert [d.answer.start_beat for _, d in run_until(m, 31.0, 37.0)] == [36.0]


def test_stop_all_forgets_the_phrase():
    m = machine()
    play(m, [(0.0, 1.0, 60)])
    (_, decided), = run_until(m, 1.0, 3.6)
    assert m.stop_all(3.7) == [Discard(decided.answer, 3.7)]
    assert run_until(m, 3.7, 20.0) == []  # reset/panic: no answer until the player plays again


def test_length_and_silence_changes_apply_to_the_next_answer():
    m = machine()
    m.length_bars, m.silence_beats = 3, 4.0
    play(m, [(0.0, 1.0, 60)])
    (_, decision), = run_until(m, 1.0, 9.0)
    assert (decision.answer.start_beat, decision.answer.bars, decision.answer.end_beat) == (8.0, 3, 20.0)


def test_regular_bars_and_other_meters():
    bars = RegularBars(3.0)
    assert [bars.bar_index(b) for b in (0.0, 2.999, 3.0, 6.5)] == [0, 0, 1, 2]
    m = ModeMachine(bars, silence_beats=1.0, length_bars=1, lead_beats=0.5)
    play(m, [(0.0, 1.0, 60)])
    (_, decision), = run_until(m, 1.0, 4.0)
    assert decision.answer == Answer(decision.answer.id, 1, 1, 3.0, 6.0, "silence")
    with pytest.raises(ValueError, match="mode"):
        ModeMachine(bars, mode="loud")


# -- configuration ----------------------------------------------------------------------------------


def test_daemon_settings_defaults_and_overrides(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[daemon]\nmode = "manual"\nlength_bars = 4\n[clock]\ntempo = 96.0\n[midi]\napi = "jack"\n')
    settings = load_daemon_settings(config, ["daemon.temperature=0.7", "osc.port=9100"], checkpoint="x.safetensors")
    assert settings.daemon.mode == "manual" and settings.daemon.length_bars == 4
    assert settings.daemon.checkpoint == "x.safetensors"
    assert settings.midi.api == "jack" and settings.osc.port == 9100
    controls = settings.initial_controls()
    assert (controls.mode, controls.length, controls.temperature, controls.tempo) == ("manual", 4, 0.7, 96.0)


@pytest.mark.parametrize(
    "override, key",
    [
        ("daemon.temperature=7.0", "daemon.temperature"),
        ("daemon.length_bars=0", "daemon.length_bars"),
        ("daemon.mode=loud", "daemon.mode"),
        ("daemon.output_channel=17", "daemon.output_channel"),
        ("daemon.min_lead_ms=500.0", "daemon.min_lead_ms"),
        ("daemon.device=tpu", "daemon.device"),
        ("daemon.weights=fp16", "daemon.weights"),
        ("daemon.volume=3", "volume"),
        ("clock.tempo=350.0", "clock.tempo"),
        ("clock.meter=4-4", "clock.meter"),
    ],
)
def test_daemon_settings_refuse_bad_values_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_daemon_settings(None, [override])


def test_config_toml_documents_every_daemon_key_with_its_default():
    """config.toml's sections hold exactly the dataclasses' keys, at their default values."""
    import dataclasses
    from pathlib import Path

    import tomllib

    from daemon.cc_map import CcConfig
    from daemon.clock import ClockConfig
    from daemon.midi_ports import MidiConfig
    from daemon.mqtt_bridge import MqttConfig
    from daemon.osc_server import OscConfig

    table = tomllib.loads((Path(__file__).parents[1] / "config.toml").read_text())
    for section, cls in [("daemon", DaemonConfig), ("midi", MidiConfig), ("clock", ClockConfig),
                         ("osc", OscConfig), ("mqtt", MqttConfig), ("cc", CcConfig)]:
        defaults = dataclasses.asdict(cls())
        assert table[section] == defaults, section
