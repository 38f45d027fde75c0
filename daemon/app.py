"""The daemon: MIDI in -> encoder -> engine -> mode decisions -> scheduler -> MIDI out.

One asyncio event loop owns the state; the model runs in a process of its own
(`daemon.engine_process`, so its work never holds this process's interpreter lock), driven from
ONE worker thread (a single-thread executor) that waits on it; the output scheduler has a thread
of its own, the MIDI reader a third. How the parts connect
(docs/daemon.md has the long version):

- Input: each MIDI event from the player is stamped at arrival and converted to beats by the
  clock; notes and the sustain pedal go to the online encoder, notes also to the mode machine.
- A ticker (every TICK_S) advances the encoder to a little before now
  (`daemon.conversation_feed`: events still on their way to the loop must not arrive behind
  the encoder's watermark), so tokens become final as time passes; final ids go to
  `Engine.feed` in the engine thread, in order.
  The ticker also advances the mode machine, and swaps in a reloaded model at a bar line.
- Decisions (`daemon.answer_player`): "answer at bar N" starts `Engine.generate` in the engine
  thread `lead_ms` before the bar line; each decoded note is scheduled as it is drawn at
  `clock.time_at(bar beat + note beat)`; a note already `late_ms` late is dropped and counted,
  never played late. "take over" stops the generation (`should_stop`), cancels pending output
  and sends note-offs for the sounding notes.
- Feedback: every message the scheduler actually sends comes back to the loop and goes into
  the encoder at its beat, so the model's state holds both parts of the conversation.
- Control: one `execute(command)` serves OSC, MQTT and the control changes `daemon.cc_map` maps
  (see docs/control.md); note and status events go to OSC subscribers (`daemon.subscribers`).

Every stop path (takeover, mode off, panic, reset, shutdown) releases every sounding note.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from daemon import encoder as enc
from daemon import midi_events
from daemon.answer_output import AnswerOutput, LiveAnswer
from daemon.answer_player import AnswerPlayer, AnswerRecord
from daemon.cc_learned import learned_path, read_learned, write_learned
from daemon.cc_map import CcBinding, CcMap
from daemon.clock import Clock, ClockEvent, LinkClock, TempoChanged, TransportChanged, make_clock
from daemon.config import DaemonSettings
from daemon.controls import (
    Command,
    ControlError,
    Controls,
    Learn,
    Panic,
    Reload,
    Reset,
    SetParam,
    Status,
    StopAnswer,
    Style,
    Subscribe,
    Trigger,
    Unlearn,
    Unsubscribe,
)
from daemon.conversation_feed import ConversationFeed
from daemon.engine_process import EngineProcess
from daemon.engine_thread import EngineThread
from daemon.errors import ClockError, DaemonError, MidiError
from daemon.exit_watchdog import exit_watchdog
from daemon.midi_ports import MidiPorts
from daemon.model_swap import ModelSwap
from daemon.modes import Decision, ModeMachine
from daemon.mqtt_bridge import MqttBridge
from daemon.osc_server import OscServer, status_arguments
from daemon.reload import FileSignature, ReloadError, resolve_reload_path
from daemon.scheduler import OutputScheduler, short_switch_interval
from daemon.status import DaemonStats, daemon_status
from daemon.styles import StyleLibrary
from daemon.subscribers import FLUSH_INTERVAL_S, SubscriberSet

log = logging.getLogger(__name__)

TICK_S = 0.005
# At most one log line per this many seconds for a failure that repeats every tick.
_LOG_EVERY_S = 5.0
# Closing everything (notes off, engine process, ports, servers) takes well under a second; past
# this the process ends with every thread's traceback instead of hanging (daemon.exit_watchdog).
_SHUTDOWN_LIMIT_S = 30.0


class CheckpointMissingError(DaemonError):
    """The checkpoint to play does not exist."""

    def __init__(self, path: Path):
        super().__init__(
            f"checkpoint {path} not found: train one (rwkv-music train --out DIR) and pass "
            "--checkpoint DIR/latest.safetensors, or set daemon.checkpoint in config.toml"
        )
        self.path = path


class Daemon:
    """The running service, as an async context manager.

    Use::

        async with Daemon(settings) as daemon:
            await stop_event.wait()

    Entering loads the model, opens the MIDI ports, starts the scheduler, the OSC server, the
    MQTT bridge (if enabled) and the background tasks; leaving stops them in reverse order,
    releasing every sounding note before the ports close.
    """

    def __init__(self, settings: DaemonSettings):
        self.settings = settings
        self.controls: Controls = settings.initial_controls()
        self.stats = DaemonStats()
        self.swap = ModelSwap(Path(settings.daemon.checkpoint), self.stats,
                              publish=self._publish, status_changed=self._status_changed)
        self.styles = StyleLibrary(settings.daemon.styles_dir, settings.daemon.checkpoint)
        self._channel = settings.daemon.output_channel - 1
        self._latency = settings.midi.output_latency
        self.cc = CcMap(settings.cc)  # the learned bindings are added when the daemon opens
        self._learned_file = learned_path(settings.cc.learn_file)
        self.subscribers: SubscriberSet | None = None
        self._late_s = settings.daemon.late_ms / 1000.0
        self._stack: contextlib.AsyncExitStack | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._last_log: dict[str, float] = {}
        self._closing = False  # shutting down: nothing new goes to the engine thread
        self._tasks: list[asyncio.Task[Any]] = []
        self.engine: EngineProcess | None = None
        self.feed: ConversationFeed | None = None
        self.clock: Clock | None = None
        self.machine: ModeMachine | None = None
        self.ports: MidiPorts | None = None
        self.scheduler: OutputScheduler | None = None
        self.output: AnswerOutput | None = None
        self.answers: AnswerPlayer | None = None
        self.osc: OscServer | None = None
        self.mqtt: MqttBridge | None = None

    @property
    def live_answers(self) -> dict[int, LiveAnswer]:
        """The answers from their decision until their last bar is over, by id."""
        return self.answers.live if self.answers is not None else {}

    @property
    def recent_answers(self) -> collections.deque[AnswerRecord]:
        """What the last finished answers did (daemon.answer_player.RECENT_ANSWERS), oldest first."""
        return self.answers.recent if self.answers is not None else collections.deque()

    # ------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Daemon:
        stack = contextlib.AsyncExitStack()
        try:
            await self._open(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            # Closing the MIDI clients can block inside libjack where no Python timeout reaches.
            with exit_watchdog(_SHUTDOWN_LIMIT_S):
                await stack.aclose()
        log.info("stopped")

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        import torch

        cfg = self.settings.daemon
        self._loop = asyncio.get_running_loop()
        checkpoint = self.swap.checkpoint_path
        if not checkpoint.is_file():
            raise CheckpointMissingError(checkpoint)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwkv-engine")
        self._executor = executor
        stack.callback(executor.shutdown, wait=True, cancel_futures=True)
        signature = FileSignature.of(checkpoint)
        self.engine = await self._in_engine(functools.partial(
            EngineProcess, checkpoint, device=device, history_tokens=cfg.history_tokens,
            threads=cfg.threads, niceness=cfg.engine_niceness, weights=cfg.weights,
        ))
        stack.callback(self._close_engine)

        clock = make_clock(self.settings.clock)
        if isinstance(clock, LinkClock):
            await stack.enter_async_context(clock)
        self.clock = clock
        engine_thread = EngineThread(self._submit, self._from_engine)
        watcher = self.swap.start(self.engine, clock, engine_thread, cfg.watch_interval_s, signature)
        self.feed = ConversationFeed(self.engine.tokenizer, clock, self.stats, self._feed_engine)
        self.machine = ModeMachine(
            clock,
            mode=self.controls.mode,
            silence_beats=self.controls.silence_beats,
            length_bars=self.controls.length,
        )
        self._update_leads()
        clock.add_listener(self._on_clock_event)

        self.cc = CcMap(self.settings.cc, read_learned(self._learned_file))
        self.ports = await stack.enter_async_context(MidiPorts(self.settings.midi, consumes=self.cc.consumes))
        stack.enter_context(short_switch_interval())
        self.scheduler = stack.enter_context(
            OutputScheduler(self._send_output, realtime_priority=cfg.output_priority)
        )
        self.output = AnswerOutput(self.scheduler, clock, self._channel, self._latency, self._late_s)
        self.answers = AnswerPlayer(
            self.machine, clock, self.engine, self.output, self.stats, engine_thread,
            has_output=self.ports.has_output, controls=lambda: self.controls, publish=self._publish,
            model_id=lambda: self.model_id, no_output=self._no_output,
        )
        stack.callback(self._final_silence)

        self.osc = await stack.enter_async_context(OscServer.from_config(self.settings.osc, self.execute))
        if self.settings.mqtt.enabled:
            self.mqtt = await stack.enter_async_context(MqttBridge(self.settings.mqtt, self.execute))
        self.subscribers = SubscriberSet(self.osc.send_to, self.settings.osc.prefix)

        self._tasks = [
            asyncio.create_task(self._tick_forever(), name="daemon-ticker"),
            asyncio.create_task(self._read_input(), name="daemon-input"),
            asyncio.create_task(self._feed_subscribers(), name="daemon-subscribers"),
        ]
        if cfg.watch:
            self._tasks.append(asyncio.create_task(watcher.run(), name="checkpoint-watcher"))
        stack.push_async_callback(self._cancel_tasks)
        # A full collection holds the interpreter lock while it walks every object, tens to
        # hundreds of ms with torch and miditok loaded on a busy machine: the scheduler thread
        # would send late. What exists now lives until shutdown, so it is moved out of the
        # collector's sight; only objects made while playing are ever walked.
        gc.collect()
        gc.freeze()
        stack.callback(gc.unfreeze)

        osc_host, osc_port = self.osc.address
        meter = clock.meter
        log.info(
            "ready: model %s (step %d, %s) | MIDI %s, in %s, out %s | OSC %s:%d %s | clock %s %.1f BPM %s | mode %s",
            self.engine.model_id, self.engine.meta.step, self.engine.device, self.ports.api_name,
            self.ports.input_description, self.ports.output_description, osc_host, osc_port,
            self.settings.osc.prefix, self.settings.clock.source, clock.tempo, meter, self.controls.mode,
        )

    def _close_engine(self) -> None:
        """After the last engine call has finished: stop the engine process."""
        assert self._executor is not None and self.engine is not None
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.engine.close()

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _final_silence(self) -> None:
        """Shutdown: stop every answer and silence the output before the ports close."""
        self._closing = True
        if self.feed is not None:
            self.feed.stop()
        if self.machine is not None:
            self._end_answers(self.machine.stop_all(self._now_beat()), output=False, reason="shutdown")
        if self.answers is not None:
            self.answers.stop_generating()
        self._silence(extra_channels=[self._channel])

    # ------------------------------------------------------------------------------ public

    @property
    def model_id(self) -> str:
        return self.swap.model_id

    @property
    def osc_address(self) -> tuple[str, int]:
        """(host, port) the OSC server listens on."""
        if self.osc is None:
            raise DaemonError("the daemon is not running")
        return self.osc.address

    async def execute(self, command: Command) -> dict[str, Any] | None:
        """Carry out one control command (from OSC or MQTT): a dict for Status and for Style
        without a name (the styles), else None.

        Raises DaemonError (the reason goes back to the sender) when it cannot be done.
        """
        if isinstance(command, Status):
            return self.status()
        if isinstance(command, SetParam):
            self._set(command)
        elif isinstance(command, Trigger):
            if self.controls.mode == "off":
                raise DaemonError("mode is off: set another mode to play")
            self._apply(self.machine.trigger(self._now_beat()))  # type: ignore[union-attr]
        elif isinstance(command, Reset):
            self._reset()
        elif isinstance(command, Panic):
            self._panic()
        elif isinstance(command, StopAnswer):
            self._stop_answers()
        elif isinstance(command, (Learn, Unlearn)):
            self._learn(command)
        elif isinstance(command, (Subscribe, Unsubscribe)):
            self._subscribe(command)
            return None
        elif isinstance(command, Reload):
            await self._reload_command(command)
        elif isinstance(command, Style):
            if command.name is None:
                return {"styles": self.styles.names(), "style": self.styles.name_of(self.swap.checkpoint_path)}
            await self.swap.load(self.styles.path_of(command.name), origin="request")
        self._status_changed()
        return None

    def status(self) -> dict[str, Any]:
        """Controls, model, mode, tempo, ports and counters, for /rwkv/status and MQTT."""
        return daemon_status(self)

    # ------------------------------------------------------------------------------ controls

    def _set(self, command: SetParam) -> None:
        machine = self.machine
        assert machine is not None and self.clock is not None
        if command.name == "tempo":
            self.clock.set_tempo(float(command.value))  # ClockError (a DaemonError) for MIDI clock
        elif command.name == "mode":
            self._apply(machine.set_mode(str(command.value), self._now_beat()))
        elif command.name == "length":
            machine.length_bars = int(command.value)
        elif command.name == "silence_beats":
            machine.silence_beats = float(command.value)
        self.controls = self.controls.apply(command)
        log.info("%s = %s", command.name, command.value)

    def _stop_answers(self) -> None:
        """Stop the answers now (note-offs for what sounds); the player must play again before
        call_response answers."""
        assert self.machine is not None
        self._end_answers(self.machine.stop_all(self._now_beat()), output=False, reason="stop")
        self._silence()
        log.info("stop: the answer stopped")

    def _learn(self, command: Learn | Unlearn) -> None:
        if isinstance(command, Learn):
            self.cc.learn(command.target)
            log.info("MIDI learn: the next control change moves %s", command.target)
            return
        removed = self.cc.unbind(command.target)
        log.info("%s unbound from %s", command.target, removed.describe() if removed else "nothing")
        self._keep_learned()

    def _learned(self, target: str, binding: CcBinding) -> None:
        log.info("MIDI learn: %s moves %s", binding.describe(), target)
        self._keep_learned()
        self._publish("cc_learned", target=target, cc=binding.control, channel=binding.channel)
        self._status_changed()

    def _keep_learned(self) -> None:
        """Write the learned map (every target that differs from config.toml) to the user's file."""
        path = self._learned_file
        if path is None:
            return
        configured, current = self.settings.cc.bindings(), self.cc.bindings
        learned = {t: current.get(t) for t in {*configured, *current} if configured.get(t) != current.get(t)}
        try:
            write_learned(path, learned)
        except OSError as err:
            log.error("the learned CC map was not kept in %s: %s", path, err)

    def _subscribe(self, command: Subscribe | Unsubscribe) -> None:
        if command.host is None or self.subscribers is None:
            raise ControlError("subscriptions are made over OSC: the events go to the sender's UDP port")
        if isinstance(command, Subscribe):
            self.subscribers.subscribe(command.host, command.port)
        elif not self.subscribers.unsubscribe(command.host, command.port):
            raise ControlError(f"{command.host}:{command.port} is not subscribed")

    def _reset(self) -> None:
        """Forget the conversation: stop answers, fresh encoder from this bar, fresh state."""
        assert self.machine is not None and self.clock is not None and self.feed is not None
        beat = self._now_beat()
        self._end_answers(self.machine.stop_all(beat), output=False, reason="reset")
        self._silence()
        self.feed.restart(self.clock.bar_start_beat(self.clock.bar_index(beat)), flush=False)
        self._submit(self.engine.reset, "reset")
        log.info("conversation reset")

    def _panic(self) -> None:
        assert self.machine is not None
        self._end_answers(self.machine.stop_all(self._now_beat()), output=False, reason="panic")
        self._silence(extra_channels=range(16))
        log.info("panic: every note released")

    async def _reload_command(self, command: Reload) -> None:
        """A reload from OSC/MQTT: resolve and confine the path, load and check, swap later."""
        cfg = self.settings.daemon
        path = self.swap.checkpoint_path
        if command.path is not None:
            try:
                path = resolve_reload_path(command.path, cfg.checkpoint, cfg.reload_dirs)
            except ReloadError as err:
                self.swap.refused(err, "request")
                raise
        if command.model_id is not None and command.model_id == self.model_id:
            log.info("checkpoint %s announced with the model already playing (%s)", path, self.model_id)
            return
        await self.swap.load(path, origin="request")

    # ------------------------------------------------------------------------------ time

    def _now_beat(self) -> float:
        assert self.clock is not None
        return self.clock.now_beat()

    def _update_leads(self) -> None:
        """Lead times are fixed in milliseconds; the machine counts in beats."""
        assert self.clock is not None and self.machine is not None
        beats_per_s = self.clock.tempo / 60.0
        self.machine.lead_beats = self.settings.daemon.lead_ms / 1000.0 * beats_per_s
        self.machine.min_lead_beats = self.settings.daemon.min_lead_ms / 1000.0 * beats_per_s

    def _on_clock_event(self, event: ClockEvent) -> None:
        if isinstance(event, TempoChanged):
            self._update_leads()
            self._hear(enc.TempoChange, event.beat, qpm=event.bpm)
            with contextlib.suppress(DaemonError):  # a MIDI clock may run outside the control's range
                self.controls = self.controls.apply(SetParam("tempo", round(event.bpm, 3)))
        elif isinstance(event, TransportChanged):
            assert self.clock is not None and self.machine is not None and self.feed is not None
            self._end_answers(self.machine.stop_all(event.beat), output=False, reason="transport moved")
            self._silence()
            self.machine.forget_activity()  # the beats jumped: old activity times mean nothing
            if event.running:
                self.feed.restart(self.clock.bar_start_beat(self.clock.bar_index(event.beat)), flush=True)
            log.info("transport %s at beat %.2f", "running" if event.running else "stopped", event.beat)

    # ------------------------------------------------------------------------------ background

    async def _tick_forever(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:  # the ticker must survive anything
                self._log_rarely("tick", "daemon tick failed")
            await asyncio.sleep(TICK_S)

    def _tick(self) -> None:
        clock, feed = self.clock, self.feed
        assert clock is not None and feed is not None and self.machine is not None
        if not clock.running:
            return
        beat = clock.beat_at(time.perf_counter())
        feed.advance(beat)
        self._apply(self.machine.advance(beat))
        self.swap.at_beat(beat)
        if self.answers is not None:
            self.answers.forget_finished()

    async def _feed_subscribers(self) -> None:
        """Every FLUSH_INTERVAL_S: the notes since the last time (and the status now and then)
        to the subscribers, from the loop: the output thread never waits for a watcher."""
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            subscribers = self.subscribers
            if subscribers is None or not len(subscribers):
                continue
            try:
                subscribers.flush(status_arguments(self.status()) if subscribers.status_due() else None)
            except Exception:  # a watcher must never stop the daemon
                self._log_rarely("subscribers", "sending to subscribers failed")

    async def _on_cc(self, event: midi_events.ControlChange) -> bool:
        """A control change the CC map takes: execute its commands; False when it is not mapped."""
        result = self.cc.handle(event, self.controls)
        if result is None:
            return False
        if result.learned is not None:
            self._learned(*result.learned)
        for command in result.commands:
            try:
                await self.execute(command)
            except DaemonError as err:
                log.warning("CC %d (%s) refused: %s", event.control, type(command).__name__, err)
        return True

    async def _read_input(self) -> None:
        assert self.ports is not None
        try:
            async for event in self.ports:
                try:
                    if not (isinstance(event, midi_events.ControlChange) and await self._on_cc(event)):
                        self._on_midi(event)
                except Exception:  # one bad event must not end the input
                    self._log_rarely("input", "MIDI input event %r failed", event)
        except MidiError as err:
            log.error("MIDI input stopped: %s; the daemon goes on without input", err)

    def _on_midi(self, event: midi_events.MidiEvent) -> None:
        clock, machine = self.clock, self.machine
        assert clock is not None and machine is not None
        if clock.handle(event) or not clock.running:
            return
        if isinstance(event, midi_events.NoteOn):
            beat = clock.beat_at(event.time)
            self.stats.input_notes += 1
            self._watched("player", event.note, event.velocity, beat)
            self._hear(enc.NoteOn, beat, pitch=event.note, velocity=event.velocity)
            self._apply(machine.note_on(event.note, beat))
        elif isinstance(event, midi_events.NoteOff):
            beat = clock.beat_at(event.time)
            self._watched("player", event.note, 0, beat)
            self._hear(enc.NoteOff, beat, pitch=event.note)
            self._apply(machine.note_off(event.note, beat))
        elif isinstance(event, midi_events.ControlChange) and event.is_sustain:
            self._hear(enc.SustainPedal, clock.beat_at(event.time), down=event.pedal_down)

    def _watched(self, who: str, pitch: int, velocity: int, beat: float) -> None:
        if self.subscribers is not None:
            self.subscribers.note(who, pitch, velocity, beat)

    def _hear(self, kind: type, beat: float, **fields: Any) -> None:
        """One performance event (clock beat `beat`) for the model's ears."""
        if self.feed is not None:
            self.feed.hear(kind, beat, **fields)

    def _feed_engine(self, ids: list[int]) -> None:
        self._submit(self.engine.feed, "feed", ids)

    # ------------------------------------------------------------------------------ answers

    def _apply(self, decisions: Iterable[Decision]) -> None:
        if self.answers is not None:
            self.answers.apply(decisions)

    def _end_answers(self, decisions: Iterable[Decision], *, output: bool = True, reason: str = "") -> None:
        if self.answers is not None:
            self.answers.end(decisions, output=output, reason=reason)

    def _no_output(self) -> None:
        self._log_rarely("no-output", "no MIDI output port is configured: answers are not played", failure=False)

    def _cancel_pending(self) -> None:
        if self.output is not None:
            self.output.cancel_pending()

    def _silence(self, extra_channels: Iterable[int] = ()) -> None:
        if self.output is not None:
            self.output.silence(extra_channels)

    # ------------------------------------------------------------------------------ output

    def _send_output(self, message: midi_events.MidiBytes) -> None:
        """The scheduler's sender (scheduler thread): send, then report it to the loop so what
        was played goes into the encoder."""
        assert self.ports is not None
        self.ports.send(message)
        sent = time.perf_counter()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._on_played, message, sent)

    def _on_played(self, message: midi_events.MidiBytes, sent: float) -> None:
        clock = self.clock
        if clock is None or not clock.running or len(message) < 3 or self._closing:
            return
        kind = message[0] & 0xF0
        note_on = kind == midi_events.NOTE_ON and message[2] > 0
        try:  # the beat it was meant for: it left early by the output latency
            beat = clock.beat_at(sent + self._latency.seconds(message[2] if note_on else None))
        except ClockError:  # e.g. the Link session already left during shutdown
            return
        if note_on:
            self.stats.notes_played += 1
            self._watched("answer", message[1], message[2], beat)
            self._hear(enc.NoteOn, beat, pitch=message[1], velocity=message[2])
        elif kind in (midi_events.NOTE_OFF, midi_events.NOTE_ON):
            self._watched("answer", message[1], 0, beat)
            self._hear(enc.NoteOff, beat, pitch=message[1])
        elif kind == midi_events.CONTROL_CHANGE and message[1] == midi_events.SUSTAIN_PEDAL:
            self._hear(enc.SustainPedal, beat, down=message[2] >= 64)

    # ------------------------------------------------------------------------------ plumbing

    def _submit(self, fn: Callable[..., Any], what: str, *args: Any) -> Future:
        """Run `fn(*args)` in the engine thread, after everything submitted before."""
        assert self._executor is not None
        future = self._executor.submit(fn, *args)
        if what in ("feed", "reset"):
            future.add_done_callback(functools.partial(self._check_job, what))
        return future

    def _check_job(self, what: str, future: Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._log_rarely(what, "engine %s failed: %r", what, future.exception(), failure=False)

    async def _in_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _from_engine(self, callback: Callable[[Future], None]) -> Callable[[Future], None]:
        """A future callback that runs `callback` on the event loop (futures call back on the
        engine thread)."""
        loop = self._loop
        assert loop is not None

        def hand_over(future: Future) -> None:
            if future.cancelled():
                return
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                loop.call_soon_threadsafe(callback, future)

        return hand_over

    def _publish(self, event: str, **fields: Any) -> None:
        if self.mqtt is not None:
            self.mqtt.publish_event(event, **fields)

    def _status_changed(self) -> None:
        if self.mqtt is not None:
            self.mqtt.status_changed()

    def _log_rarely(self, key: str, message: str, *args: Any, failure: bool = True) -> None:
        """Log at most once per _LOG_EVERY_S per key; `failure`: an error with its traceback."""
        now = time.monotonic()
        if now - self._last_log.get(key, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_log[key] = now
            if failure:
                log.exception(message, *args)
            else:
                log.warning(message, *args)


def resolve_device(device: str) -> str:
    """`auto` -> "cuda" when a CUDA device is available, else "cpu"; cuda without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DaemonError("daemon.device = 'cuda' but no CUDA device is available (use auto or cpu)")
    return device
