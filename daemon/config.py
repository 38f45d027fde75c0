"""The daemon's configuration: config.toml's [daemon], [midi], [clock], [osc], [mqtt] and [cc].

Read and validated once at start (`load_daemon_settings`); an error names the key and what is
allowed. `[daemon]` is `DaemonConfig` here; the other sections belong to the modules that use
them (`MidiConfig`, `ClockConfig`, `OscConfig`, `MqttConfig`, `CcConfig`). The live controls start from
`[daemon]` (and the clock's tempo) and are checked by the same rules as OSC messages, so a
value the config accepts is one OSC accepts too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from daemon.cc_map import CcConfig
from daemon.clock import ClockConfig
from daemon.controls import ControlError, Controls, check_value
from daemon.midi_ports import MidiConfig
from daemon.mqtt_bridge import MqttConfig
from daemon.osc_server import OscConfig
from daemon.output_latency import check_against_lead
from kernels.weight_formats import DEFAULT_WEIGHTS
from model.settings import ConfigError, check_range, load_section, read_config

DEFAULT_CHECKPOINT = "checkpoints/default.safetensors"


@dataclass
class DaemonConfig:
    """`[daemon]` in config.toml: the model, the starting controls and the timing margins."""

    checkpoint: str = DEFAULT_CHECKPOINT  # the model to play; watched for changes (hot reload)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    threads: int = 1  # torch CPU threads, 0..64 (0 = torch's default); 1 keeps the model off the scheduler's core
    # How the compiled CPU step stores the large matrices (docs/cpu-step.md, "Weight formats")
    weights: Literal["fp32", "bf16", "int8"] = DEFAULT_WEIGHTS
    engine_niceness: int = 5  # the engine process's nice increment, 0..19: the OS runs the output first
    output_priority: int = 60  # SCHED_FIFO priority of the output thread where allowed, 0..99 (0 = normal)
    mode: Literal["call_response", "autopilot", "manual", "off"] = "call_response"
    length_bars: int = 2  # bars per answer, 1..64
    silence_beats: float = 2.0  # beats of player silence before call_response answers, 0.5..64
    temperature: float = 1.0  # 0.05..5
    top_p: float = 0.95  # 0.01..1 (1 = off)
    top_k: int = 0  # 0..65536 (0 = off)
    seed: int = -1  # -1..2**31-1 (-1 = a fresh seed per answer)
    output_channel: int = 1  # MIDI channel of the answers, 1..16
    lead_ms: float = 300.0  # an answer is decided and generated this long before its bar line, 20..5000
    min_lead_ms: float = 60.0  # a bar line closer than this is skipped for the next one, 0..lead_ms
    late_ms: float = 20.0  # a generated note already this late is dropped (counted), 1..1000
    watch: bool = True  # reload the checkpoint when its file changes
    watch_interval_s: float = 0.5  # how often the checkpoint's mtime and size are polled, 0.05..60
    reload_dirs: list[str] = field(default_factory=list)  # folders besides the checkpoint's that reloads may read
    styles_dir: str = "styles"  # tuned checkpoints (rwkv-music tune) that /rwkv/style <name> switches to
    history_tokens: int = 4096  # tokens of conversation kept to re-prime a reloaded model, 16..1000000

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("daemon.checkpoint must not be empty")
        check_range("daemon.threads", self.threads, 0, 64)
        check_range("daemon.engine_niceness", self.engine_niceness, 0, 19)
        check_range("daemon.output_priority", self.output_priority, 0, 99)
        check_range("daemon.output_channel", self.output_channel, 1, 16)
        check_range("daemon.lead_ms", self.lead_ms, 20.0, 5000.0)
        check_range("daemon.min_lead_ms", self.min_lead_ms, 0.0, self.lead_ms)
        check_range("daemon.late_ms", self.late_ms, 1.0, 1000.0)
        check_range("daemon.watch_interval_s", self.watch_interval_s, 0.05, 60.0)
        check_range("daemon.history_tokens", self.history_tokens, 16, 1_000_000)
        for name, control in (
            ("length_bars", "length"),
            ("silence_beats", "silence_beats"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("top_k", "top_k"),
            ("seed", "seed"),
        ):
            _check_control(f"daemon.{name}", control, getattr(self, name))


def _check_control(key: str, control: str, value: Any) -> None:
    """Apply the OSC rules of `control` to a config value, reporting the config key."""
    try:
        check_value(control, value)
    except ControlError as err:
        reason = err.reason.removeprefix(control).strip()
        raise ConfigError(f"{key} = {value!r}: {reason}") from err


@dataclass
class DaemonSettings:
    """Everything `rwkv-music daemon` reads from config.toml, validated."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    midi: MidiConfig = field(default_factory=MidiConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    osc: OscConfig = field(default_factory=OscConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    cc: CcConfig = field(default_factory=CcConfig)

    def __post_init__(self) -> None:
        # The clock accepts a wider range than the live tempo control; the start must fit both.
        _check_control("clock.tempo", "tempo", self.clock.tempo)
        check_against_lead(self.midi.output_latency, self.daemon.lead_ms)

    def initial_controls(self) -> Controls:
        """The live controls at start."""
        d = self.daemon
        return Controls(
            temperature=d.temperature,
            top_p=d.top_p,
            top_k=d.top_k,
            length=d.length_bars,
            mode=d.mode,
            tempo=self.clock.tempo,
            seed=d.seed,
            silence_beats=d.silence_beats,
        )

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.daemon.checkpoint)


def load_daemon_settings(
    path: str | Path | None, overrides: list[str] | None = None, *, checkpoint: str | Path | None = None
) -> DaemonSettings:
    """config.toml (None: defaults only) + `--set section.key=value` overrides + an explicit
    checkpoint -> validated settings. Raises ConfigError naming the key.

    Sections other than the daemon's ([model], [train]) are ignored here.
    """
    table = read_config(path, overrides)
    if checkpoint is not None:
        table.setdefault("daemon", {})["checkpoint"] = str(checkpoint)
    return DaemonSettings(
        daemon=load_section(DaemonConfig, table, "daemon"),
        midi=load_section(MidiConfig, table, "midi"),
        clock=load_section(ClockConfig, table, "clock"),
        osc=load_section(OscConfig, table, "osc"),
        mqtt=load_section(MqttConfig, table, "mqtt"),
        cc=load_section(CcConfig, table, "cc"),
    )
