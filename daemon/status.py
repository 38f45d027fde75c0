"""What the daemon reports: its counters and the values of /rwkv/status, MQTT's status and the
events sent to subscribers (docs/daemon.md, "Status").

Kept apart from `daemon.app` (which runs the music) so that adding a value to report does not
touch the running parts; `daemon_status` only reads.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.app import Daemon


@dataclass
class DaemonStats:
    """Counters since start (shown in /rwkv/status)."""

    input_notes: int = 0  # note-ons from the player
    answers: int = 0  # answers started (generation begun)
    discarded: int = 0  # answers dropped before their bar line (the player played on)
    takeovers: int = 0  # sounding answers stopped by the player or mode off
    failed: int = 0  # generations that raised
    notes_scheduled: int = 0
    late_dropped: int = 0  # generated notes too late to play
    notes_played: int = 0  # note-ons the scheduler sent (fed back to the encoder)
    tokens_fed: int = 0  # final ids fed to the engine (player and daemon)
    encoder_rejected: int = 0  # events the encoder refused
    reloads: int = 0
    reload_errors: int = 0
    ready_before_bar_ms: float | None = None  # last answer: bar line minus the time its first note was scheduled
    generation_ms: float | None = None  # last answer's whole generation
    last_swap_beat: float | None = None  # clock beat at which the last reloaded model was swapped in


def daemon_status(daemon: Daemon) -> dict[str, Any]:
    """Controls, CC map, model, mode, tempo, ports and counters, for /rwkv/status and MQTT."""
    values: dict[str, Any] = dict(daemon.controls.as_dict())
    values["cc"] = daemon.cc.describe()
    values["cc_learning"] = daemon.cc.learning
    values["output_latency_ms"] = daemon.settings.midi.output_latency_ms
    clock, ports, scheduler = daemon.clock, daemon.ports, daemon.scheduler
    if clock is not None:
        values["tempo"] = round(clock.tempo, 3)
        values["meter"] = str(clock.meter)
        values["clock"] = daemon.settings.clock.source
        values["clock_running"] = clock.running
        beat = clock.beat_at(time.perf_counter())
        values["beat"] = round(beat, 3)
        values["bar"] = clock.bar_index(beat)
    values["model_id"] = daemon.model_id
    if daemon.engine is not None:
        values["model_step"] = daemon.swap.playing.step if daemon.swap.playing is not None else None
        values["device"] = str(daemon.engine.device)
    values["checkpoint"] = str(daemon.swap.checkpoint_path)
    values["style"] = daemon.styles.name_of(daemon.swap.checkpoint_path)
    values["reload_pending"] = daemon.swap.pending is not None
    values["last_reload_error"] = daemon.swap.last_error
    if ports is not None:
        values["midi_api"] = ports.api_name
        values["in_port"] = ports.input_description
        values["out_port"] = ports.output_description
        midi = ports.stats
        values["input_overflowed"] = midi.overflowed
        values["midi_connected"] = ports.connected
        values["midi_server_lost"] = midi.server_lost
        values["midi_reconnected"] = midi.reconnected
        values["midi_deaf_reopens"] = midi.deaf_reopens
        values["midi_invalid"] = midi.invalid
        values["midi_lost_output"] = midi.lost_output
    if daemon.osc is not None:
        values["osc"] = "{}:{}".format(*daemon.osc.address)
    values["mqtt_connected"] = daemon.mqtt.connected if daemon.mqtt is not None else False
    if daemon.subscribers is not None:
        values.update(daemon.subscribers.describe())
    values["answers_active"] = len(daemon.live_answers)
    values.update(dataclasses.asdict(daemon.stats))
    if scheduler is not None:
        sched = scheduler.stats
        values["output_sent"] = sched.sent
        values["output_late"] = sched.late
        values["output_max_lateness_ms"] = round(sched.max_lateness_s * 1000.0, 3)
        values["output_pending"] = scheduler.pending
        values["sounding"] = len(scheduler.sounding_notes)
    if daemon.feed is not None:
        values["encoder_late_events"] = daemon.feed.encoder.late_events
    return values
