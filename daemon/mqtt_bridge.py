"""MQTT bridge: the daemon's status and events out, control commands and checkpoint news in.

Topics (`P` = prefix, `I` = instance):
    P/I/status         retained JSON {"state": "online", "values": {...}}; last will "offline"
    P/I/events         JSON {"event": name, "time": unix seconds, ...}
    P/I/set/<param>    text payload, parsed like an OSC message to <prefix>/<param>
    P/checkpoints      a trainer's JSON {"path": ..., "model_id": ...} -> Reload

The broker is optional to the music: the bridge lives in a task of its own, reconnects with
capped, jittered exponential backoff, bounds every network wait with a timeout, and never
lets a broker failure out of its context manager. Events published while disconnected are
dropped and counted; the status is not queued but rebuilt and republished on each connect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from daemon.controls import Command, ControlError, Reload, Status, Style, parse_announcement, parse_text_command
from daemon.errors import DaemonError
from model.settings import ConfigError, check_range

log = logging.getLogger(__name__)

Execute = Callable[[Command], Awaitable["dict[str, Any] | None"]]

OFFLINE = "offline"
_TOPIC_FORBIDDEN = frozenset("+#\x00")


@dataclass
class MqttConfig:
    """`[mqtt]` section of config.toml. Empty strings mean "not set" (TOML has no null)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "rwkv-music"  # first topic level(s); may hold inner slashes
    instance: str = "default"  # one topic level naming this daemon
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""  # CA bundle for TLS; empty = the system's trusted CAs
    tls_insecure: bool = False  # TLS without checking the broker's host name
    keepalive: int = 60  # seconds between pings; the broker fires the will after 1.5x this

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("mqtt.host must not be empty")
        check_range("mqtt.port", self.port, 1, 65535)
        check_range("mqtt.keepalive", self.keepalive, 5, 3600)
        if not self.prefix or self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ConfigError(f"mqtt.prefix = {self.prefix!r}: must be non-empty, no leading or trailing '/'")
        if _TOPIC_FORBIDDEN & set(self.prefix) or "//" in self.prefix:
            raise ConfigError(f"mqtt.prefix = {self.prefix!r}: must not hold '+', '#' or empty levels")
        if not self.instance or (_TOPIC_FORBIDDEN | {"/"}) & set(self.instance):
            raise ConfigError(f"mqtt.instance = {self.instance!r}: must be one non-empty topic level")
        if self.password and not self.username:
            raise ConfigError("mqtt.password is set but mqtt.username is not")
        if (self.ca_file or self.tls_insecure) and not self.tls:
            raise ConfigError("mqtt.ca_file and mqtt.tls_insecure need mqtt.tls = true")
        if self.ca_file and not Path(self.ca_file).is_file():
            raise ConfigError(f"mqtt.ca_file = {self.ca_file!r}: no such file")

    @property
    def base(self) -> str:
        """`<prefix>/<instance>`, the root of this daemon's topics."""
        return f"{self.prefix}/{self.instance}"


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: attempt n waits up to min(cap, initial*factor**n).

    The wait is shortened by a random fraction up to `jitter`, so daemons that lost the same
    broker do not all come back in the same instant.
    """

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.cap and self.factor >= 1 and 0 <= self.jitter <= 1):
            raise ValueError(f"invalid backoff {self}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before reconnect attempt `attempt` (0 = first retry)."""
        # The exponent stops growing long after the cap is reached (and before float overflow).
        base = min(self.cap, self.initial * self.factor ** min(attempt, 64))
        return base * (1.0 - self.jitter * rng.random())


@dataclass
class MqttStats:
    """Counters since the bridge started."""

    connects: int = 0
    lost: int = 0  # sessions ended by the broker or the network
    failed: int = 0  # connection attempts that did not get as far as subscribing
    received: int = 0
    rejected: int = 0  # messages that became error events
    published: int = 0
    dropped: int = 0  # events not sent: disconnected, or the outbox was full


class MqttBridge:
    """Async context manager connecting the daemon to an MQTT broker, in the background.

    `execute(command)` is the daemon's handler (the same one the OSC server uses): it
    returns a dict for `Status` and raises `DaemonError` to refuse a command. Entering
    starts the task named "mqtt-bridge" and returns at once, connected or not; leaving
    publishes "offline" as the retained status (when connected) and disconnects cleanly.
    """

    def __init__(
        self,
        config: MqttConfig,
        execute: Execute,
        *,
        backoff: Backoff = Backoff(),
        timeout: float = 5.0,
        outbox_size: int = 256,
        rng: random.Random | None = None,
    ):
        self.config = config
        self.backoff = backoff
        self.timeout = timeout
        self.stats = MqttStats()
        self.status_topic = f"{config.base}/status"
        self.events_topic = f"{config.base}/events"
        self.set_topic = f"{config.base}/set"
        self.checkpoints_topic = f"{config.prefix}/checkpoints"
        self._execute = execute
        self._outbox_size = outbox_size
        self._events: deque[bytes] = deque()
        self._status_wanted = False
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._last_announcement: Reload | None = None
        self._session_up = False

    @property
    def connected(self) -> bool:
        """True while a broker session is up (subscribed, status published or about to be)."""
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a broker session; True if there is one."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def status_changed(self) -> None:
        """Republish the retained status (built from `execute(Status())`) when connected.

        Calls coalesce: several changes before the next publish make one message.
        """
        self._status_wanted = True
        self._wake.set()

    def publish_event(self, event: str, **fields: Any) -> bool:
        """Queue JSON {"event": event, "time": ..., **fields} on the events topic.

        Never blocks. Returns False, and counts it in `stats.dropped`, when disconnected or
        when `outbox_size` events already wait.
        """
        if not self.connected or len(self._events) >= self._outbox_size:
            self.stats.dropped += 1
            log.debug("MQTT event %s dropped (connected=%s)", event, self.connected)
            return False
        payload = {"event": event, "time": round(time.time(), 3), **fields}
        self._events.append(json.dumps(payload, default=str, separators=(",", ":")).encode())
        self._wake.set()
        return True

    async def __aenter__(self) -> MqttBridge:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="mqtt-bridge")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stopping.set()
        if self._task is None:
            return
        # Connected: time for the offline message and the DISCONNECT, each bounded by
        # `timeout`. Not connected: the backoff sleep ends at once; a connect in progress is
        # cut short, since there is nothing to say offline on.
        grace = 2 * self.timeout + 3 if self.connected else 1.0
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except asyncio.TimeoutError:
            log.warning("MQTT bridge did not stop within %.0f s; cancelling it", grace)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None

    async def _run(self) -> None:
        attempt = 0
        outage_logged = False
        while not self._stopping.is_set():
            self._session_up = False
            try:
                await self._session()
            except aiomqtt.MqttError as err:
                if self._session_up:
                    self.stats.lost += 1
                    log.warning("MQTT connection to %s:%d lost: %s", self.config.host, self.config.port, err)
                else:
                    self.stats.failed += 1
                    # One warning per outage; the retries that follow are debug noise.
                    level = logging.DEBUG if outage_logged else logging.WARNING
                    log.log(
                        level, "MQTT broker %s:%d unavailable: %s", self.config.host, self.config.port, err
                    )
                outage_logged = True
            except Exception:  # a bug here must not take the daemon down; retry with backoff
                self.stats.failed += 1
                log.exception("MQTT bridge session failed")
            if self._stopping.is_set():
                break
            if self._session_up:
                attempt = 0
            delay = self.backoff.delay(attempt, self._rng)
            attempt += 1
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def _client(self) -> aiomqtt.Client:
        cfg = self.config
        tls_params = aiomqtt.TLSParameters(ca_certs=cfg.ca_file or None) if cfg.tls else None
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username or None,
            password=cfg.password or None,
            identifier=f"rwkv-music-{cfg.instance}-{os.getpid()}-{self._rng.randrange(1 << 24):06x}",
            will=aiomqtt.Will(self.status_topic, OFFLINE, qos=1, retain=True),
            keepalive=cfg.keepalive,
            timeout=self.timeout,
            tls_params=tls_params,
            tls_insecure=cfg.tls_insecure if cfg.tls else None,
            max_queued_incoming_messages=self._outbox_size,
            logger=logging.getLogger(f"{__name__}.client"),
        )

    async def _session(self) -> None:
        """One broker connection, until it drops or the bridge stops.

        Sets `_session_up` once subscribed; raises aiomqtt.MqttError when the connection
        fails or is lost.
        """
        client = self._client()
        try:
            # aiomqtt bounds the TCP connect (paho, 5 s) and the CONNACK wait (`timeout`);
            # this outer bound covers both plus TLS set-up.
            await asyncio.wait_for(client.__aenter__(), 2 * self.timeout + 5)
        except asyncio.TimeoutError as err:
            raise aiomqtt.MqttError("connect timed out") from err
        tasks: list[asyncio.Task[Any]] = []
        try:
            await client.subscribe(f"{self.set_topic}/+", qos=1, timeout=self.timeout)
            await client.subscribe(self.checkpoints_topic, qos=1, timeout=self.timeout)
            self.stats.connects += 1
            self._session_up = True
            self._connected.set()
            log.info("MQTT connected to %s:%d as %s", self.config.host, self.config.port, self.config.base)
            self.status_changed()
            tasks = [
                asyncio.create_task(self._receive(client), name="mqtt-receive"),
                asyncio.create_task(self._send(client), name="mqtt-send"),
                asyncio.create_task(self._stopping.wait(), name="mqtt-stop"),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not tasks[2]:
                    task.result()  # raises the MqttError that ended the session
            await self._say_offline(client)
        finally:
            self._connected.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._events:
                self.stats.dropped += len(self._events)
                self._events.clear()
            try:
                await asyncio.wait_for(client.__aexit__(None, None, None), self.timeout + 1)
            except (aiomqtt.MqttError, asyncio.TimeoutError) as err:
                log.debug("MQTT disconnect was not clean: %s", err)

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        # A clean DISCONNECT does not fire the will, so the retained status is set here.
        try:
            await client.publish(self.status_topic, OFFLINE, qos=1, retain=True, timeout=self.timeout)
        except aiomqtt.MqttError as err:
            log.debug("MQTT offline status not sent: %s", err)

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._status_wanted or self._events:
                if self._status_wanted:
                    self._status_wanted = False
                    topic, payload, retain = self.status_topic, await self._status_payload(), True
                else:
                    topic, payload, retain = self.events_topic, self._events[0], False
                await client.publish(topic, payload, qos=1, retain=retain, timeout=self.timeout)
                if not retain:
                    self._events.popleft()  # only once sent, so a lost session counts it dropped
                self.stats.published += 1

    async def _status_payload(self) -> bytes:
        try:
            values = await self._execute(Status()) or {}
        except Exception as err:  # noqa: BLE001 - status must go out even if the handler fails
            log.warning("status for MQTT failed: %s", err)
            values = {}
        return json.dumps({"state": "online", "values": values}, default=str, separators=(",", ":")).encode()

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.stats.received += 1
            await self._handle(message.topic.value, message.payload)

    async def _handle(self, topic: str, payload: Any) -> None:
        if not isinstance(payload, (bytes, bytearray, str)):
            payload = b"" if payload is None else str(payload)
        try:
            if topic == self.checkpoints_topic:
                command: Command = parse_announcement(payload)
                if command == self._last_announcement:
                    # The same announcement again (a retained one after a reconnect).
                    return
            elif topic.startswith(self.set_topic + "/"):
                command = parse_text_command(topic[len(self.set_topic) + 1 :], payload)
            else:
                return
            if isinstance(command, Status):
                self.status_changed()
                return
            result = await self._execute(command)
            if isinstance(command, Style) and command.name is None:
                self.publish_event("styles", **(result or {}))
        except ControlError as err:
            self._reject(topic, err.reason)
            return
        except DaemonError as err:
            self._reject(topic, str(err))
            return
        except Exception as err:  # noqa: BLE001 - a handler bug must not end the session
            log.exception("MQTT handler failed on %s", topic)
            self._reject(topic, f"internal error: {type(err).__name__}")
            return
        if topic == self.checkpoints_topic:
            self._last_announcement = command  # type: ignore[assignment]
        self.status_changed()

    def _reject(self, topic: str, reason: str) -> None:
        self.stats.rejected += 1
        log.debug("MQTT %s refused: %s", topic, reason)
        self.publish_event("error", topic=topic, reason=reason)
