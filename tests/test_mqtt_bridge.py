"""The MQTT bridge against a real mosquitto broker, with mosquitto_pub/mosquitto_sub as
independent clients and a second bridge in a child process for the last-will case."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
from typing import Any

import aiomqtt
import pytest

from daemon.controls import Command, Controls, Reload, SetParam, Status, Style
from daemon.errors import DaemonError
from daemon.mqtt_bridge import Backoff, MqttBridge, MqttConfig
from model.settings import ConfigError, load_section
from tests.fixtures.mosquitto import MosquittoBroker

WAIT = 10.0  # upper bound for anything that should happen at once; never reached when passing
FAST = Backoff(initial=0.05, factor=2.0, cap=0.5, jitter=0.5)


class FakeDaemon:
    """The bridge's collaborator: a dict of control values behind the `execute` signature."""

    def __init__(self) -> None:
        self.controls = Controls()
        self.commands: list[Command] = []
        self.changed = asyncio.Event()

    async def execute(self, command: Command) -> dict[str, Any] | None:
        if isinstance(command, Status):
            return {**self.controls.as_dict(), "model_id": "m0"}
        self.commands.append(command)
        self.changed.set()
        if isinstance(command, SetParam):
            self.controls = self.controls.apply(command)
        elif isinstance(command, Reload) and command.path == "missing.safetensors":
            raise DaemonError("missing.safetensors: no such checkpoint")
        elif isinstance(command, Style) and command.name is None:
            return {"styles": ["default", "mine"], "style": "default"}
        return None

    async def next_command(self) -> Command:
        await asyncio.wait_for(self.changed.wait(), WAIT)
        self.changed.clear()
        return self.commands[-1]


def config_for(broker: MosquittoBroker, **overrides: Any) -> MqttConfig:
    return MqttConfig(enabled=True, host=broker.host, port=broker.port, instance="test", **overrides)


async def tool(*argv: str) -> str:
    """Run a mosquitto command-line client; return its stdout."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), WAIT + 5)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {out.decode(errors='replace')}"
    return out.decode()


async def mosquitto_pub(broker: MosquittoBroker, topic: str, payload: str, retain: bool = False) -> None:
    argv = ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", topic, "-m", payload]
    await tool(*argv, *(["-r"] if retain else []))


async def late_retained(broker: MosquittoBroker, topic: str) -> str:
    """What a subscriber arriving now gets first on `topic` (the retained message)."""
    out = await tool(
        "mosquitto_sub",
        "-h",
        broker.host,
        "-p",
        str(broker.port),
        "-t",
        topic,
        "-C",
        "1",
        "-W",
        str(int(WAIT)),
    )
    return out.rstrip("\n")


class Observer:
    """An MQTT client in the test that records what arrives on the topics it watches."""

    def __init__(self, broker: MosquittoBroker, *topics: str):
        self.broker = broker
        self.topics = topics
        self.client: aiomqtt.Client | None = None

    async def __aenter__(self) -> Observer:
        self.client = aiomqtt.Client(self.broker.host, self.broker.port, timeout=WAIT)
        await self.client.__aenter__()
        for topic in self.topics:
            await self.client.subscribe(topic, qos=1)  # returns after the broker's SUBACK
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.client is not None
        await self.client.__aexit__(None, None, None)

    async def next(self, topic: str) -> bytes:
        """The next payload on exactly `topic`; others are skipped."""
        assert self.client is not None

        async def wait() -> bytes:
            async for message in self.client.messages:
                if message.topic.value == topic:
                    return bytes(message.payload)
            raise AssertionError("observer disconnected")

        return await asyncio.wait_for(wait(), WAIT)

    async def status_with(self, topic: str, **values: Any) -> dict[str, Any]:
        """Skip status messages until one holds `values`; return its parsed JSON."""
        while True:
            payload = await self.next(topic)
            if payload == b"offline":
                continue
            status = json.loads(payload)
            if all(status["values"].get(k) == v for k, v in values.items()):
                return status

    async def publish(self, topic: str, payload: bytes | str) -> None:
        assert self.client is not None
        await self.client.publish(topic, payload, qos=1)


async def until(predicate, what: str) -> None:
    """Poll `predicate` (cheap, in-process) until true; fail after WAIT seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_mqtt_bridge_set_temperature_applies_and_status_is_retained(mosquitto):
    async def scenario():
        daemon = FakeDaemon()
        config = config_for(mosquitto)
        async with MqttBridge(config, daemon.execute, backoff=FAST) as bridge:
            assert await bridge.wait_connected(WAIT)
            status_topic = "rwkv-music/test/status"
            async with Observer(mosquitto, status_topic) as observer:
                await mosquitto_pub(mosquitto, "rwkv-music/test/set/temperature", "0.8")
                assert await daemon.next_command() == SetParam("temperature", 0.8)
                status = await observer.status_with(status_topic, temperature=0.8)
                assert status["state"] == "online"
                assert status["values"]["model_id"] == "m0"
            # A subscriber arriving later gets the retained status at once.
            late = json.loads(await late_retained(mosquitto, status_topic))
            assert late["values"]["temperature"] == 0.8
            await mosquitto_pub(mosquitto, "rwkv-music/test/set/mode", "manual")
            assert await daemon.next_command() == SetParam("mode", "manual")
        # A clean exit leaves "offline" as the retained status (a clean DISCONNECT fires no will).
        assert await late_retained(mosquitto, status_topic) == "offline"
        assert bridge.stats.lost == 0 and bridge.stats.connects == 1

    run(scenario())


def test_mqtt_bridge_malformed_set_payloads_give_error_events(mosquitto):
    cases = [
        ("temperature", b"hot", "temperature must be a number (got string 'hot')"),
        ("temperature", b"NaN", "temperature must be a finite number (got nan)"),
        ("temperature", b"", "temperature takes 1 argument (got 0)"),
        ("length", b"100", "length must be between 1 and 64 (got 100)"),
        ("top_k", b"2.5", "top_k must be an integer (got float)"),
        ("mode", b"{}", "payload must be a number, a string, or a JSON array of them"),
        ("seed", b"\xff\xfe", "payload is not UTF-8 text"),
        ("volume", b"1", "unknown address 'volume'"),
        ("reload", b"missing.safetensors", "missing.safetensors: no such checkpoint"),
    ]

    async def scenario():
        daemon = FakeDaemon()
        before = daemon.controls
        async with MqttBridge(config_for(mosquitto), daemon.execute, backoff=FAST) as bridge:
            assert await bridge.wait_connected(WAIT)
            events = "rwkv-music/test/events"
            async with Observer(mosquitto, events) as observer:
                for param, payload, reason in cases:
                    topic = f"rwkv-music/test/set/{param}"
                    await observer.publish(topic, payload)
                    event = json.loads(await observer.next(events))
                    assert (event["event"], event["topic"], event["reason"]) == ("error", topic, reason)
                    assert isinstance(event["time"], float)
                # The bridge still works after all that.
                await observer.publish("rwkv-music/test/set/length", b"4")
                assert await daemon.next_command() == SetParam("length", 4)
            assert bridge.stats.rejected == len(cases)
        assert daemon.controls == before.apply(SetParam("length", 4))

    run(scenario())


def test_mqtt_bridge_daemon_events_and_status_request(mosquitto):
    async def scenario():
        daemon = FakeDaemon()
        async with MqttBridge(config_for(mosquitto), daemon.execute, backoff=FAST) as bridge:
            assert await bridge.wait_connected(WAIT)
            events, status = "rwkv-music/test/events", "rwkv-music/test/status"
            async with Observer(mosquitto, events, status) as observer:
                await observer.status_with(status)  # the retained one
                assert bridge.publish_event("completion_played", bars=2, notes=17)
                event = json.loads(await observer.next(events))
                assert (event["event"], event["bars"], event["notes"]) == ("completion_played", 2, 17)
                # set/status asks for a fresh status message instead of changing anything.
                daemon.controls = daemon.controls.apply(SetParam("top_p", 0.5))
                await observer.publish("rwkv-music/test/set/status", b"")
                assert (await observer.status_with(status, top_p=0.5))["state"] == "online"
            assert daemon.commands == []

    run(scenario())


def test_mqtt_bridge_set_style_swaps_and_an_empty_payload_lists_the_styles(mosquitto):
    async def scenario():
        daemon = FakeDaemon()
        async with MqttBridge(config_for(mosquitto), daemon.execute, backoff=FAST) as bridge:
            assert await bridge.wait_connected(WAIT)
            async with Observer(mosquitto, "rwkv-music/test/events") as observer:
                await observer.publish("rwkv-music/test/set/style", b"mine")
                assert await daemon.next_command() == Style("mine")
                await observer.publish("rwkv-music/test/set/style", b"")
                event = json.loads(await observer.next("rwkv-music/test/events"))
                assert (event["event"], event["styles"], event["style"]) == ("styles", ["default", "mine"], "default")
                await observer.publish("rwkv-music/test/set/style", b"../secret")
                event = json.loads(await observer.next("rwkv-music/test/events"))
                assert event["event"] == "error" and "without folders" in event["reason"]

    run(scenario())


def test_mqtt_bridge_checkpoint_announcement_reloads_once(mosquitto):
    async def scenario():
        daemon = FakeDaemon()
        async with MqttBridge(config_for(mosquitto), daemon.execute, backoff=FAST) as bridge:
            assert await bridge.wait_connected(WAIT)
            announcement = json.dumps({"path": "runs/a/latest.safetensors", "model_id": "m1"})
            await mosquitto_pub(mosquitto, "rwkv-music/checkpoints", announcement, retain=True)
            assert await daemon.next_command() == Reload("runs/a/latest.safetensors", "m1")
            async with Observer(mosquitto, "rwkv-music/test/events") as observer:
                # The same announcement again is skipped; a malformed one is an error event.
                await observer.publish("rwkv-music/checkpoints", announcement)
                await observer.publish("rwkv-music/checkpoints", b"runs/b/latest.safetensors")
                event = json.loads(await observer.next("rwkv-music/test/events"))
                assert event["reason"] == "announcement is not JSON"
                await observer.publish("rwkv-music/checkpoints", b'{"path": "runs/b.safetensors"}')
                assert await daemon.next_command() == Reload("runs/b.safetensors", None)
            assert daemon.commands == [
                Reload("runs/a/latest.safetensors", "m1"),
                Reload("runs/b.safetensors", None),
            ]

    run(scenario())


def test_mqtt_bridge_survives_broker_loss_and_republishes_status(mosquitto):
    async def scenario():
        daemon = FakeDaemon()
        status_topic = "rwkv-music/test/status"
        async with MqttBridge(config_for(mosquitto), daemon.execute, backoff=FAST) as bridge:
            assert await bridge.wait_connected(WAIT)
            await mosquitto_pub(mosquitto, "rwkv-music/test/set/seed", "42")
            assert await daemon.next_command() == SetParam("seed", 42)

            await asyncio.to_thread(mosquitto.stop)
            await until(lambda: not bridge.connected, "the bridge to notice the broker is gone")
            await until(lambda: bridge.stats.failed >= 2, "reconnect attempts")
            dropped = bridge.stats.dropped
            assert not bridge.publish_event("completion_played", bars=1)
            assert bridge.stats.dropped == dropped + 1

            # The broker comes back empty (no persistence): the status it holds is the bridge's
            # republished one.
            await asyncio.to_thread(mosquitto.start)
            assert await bridge.wait_connected(WAIT)
            async with Observer(mosquitto, status_topic) as observer:
                status = await observer.status_with(status_topic, seed=42)
                assert status["state"] == "online"
            await mosquitto_pub(mosquitto, "rwkv-music/test/set/seed", "7")
            assert await daemon.next_command() == SetParam("seed", 7)
        assert bridge.stats.lost == 1 and bridge.stats.connects == 2

    run(scenario())


def test_mqtt_bridge_without_broker_keeps_retrying_and_exits_cleanly(mosquitto):
    async def scenario():
        daemon = FakeDaemon()
        await asyncio.to_thread(mosquitto.stop)
        async with MqttBridge(config_for(mosquitto), daemon.execute, backoff=FAST) as bridge:
            await until(lambda: bridge.stats.failed >= 3, "three failed attempts")
            assert not bridge.connected
        assert bridge.stats.connects == 0

    run(scenario())


CHILD = """
import asyncio, os, sys
from daemon.mqtt_bridge import MqttBridge, MqttConfig

async def execute(command):
    return {"pid": os.getpid()}

async def main():
    config = MqttConfig(enabled=True, host="127.0.0.1", port=int(sys.argv[1]), instance="child")
    async with MqttBridge(config, execute):
        await asyncio.Event().wait()

asyncio.run(main())
"""


def test_mqtt_bridge_last_will_when_process_dies(mosquitto):
    """A bridge in a child process is killed (SIGKILL): its TCP connection drops without a
    DISCONNECT, so the broker publishes the will, "offline", as the retained status."""
    status_topic = "rwkv-music/child/status"

    async def scenario():
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(mosquitto.port)])
        try:
            async with Observer(mosquitto, status_topic) as observer:
                online = json.loads(await observer.next(status_topic))
                assert online == {"state": "online", "values": {"pid": child.pid}}
                os.kill(child.pid, signal.SIGKILL)
                assert await observer.next(status_topic) == b"offline"
            assert await late_retained(mosquitto, status_topic) == "offline"
        finally:
            child.kill()
            child.wait()

    run(scenario())


def test_backoff_grows_to_cap_with_jitter():
    backoff = Backoff(initial=0.5, factor=2.0, cap=30.0, jitter=0.5)
    rng = random.Random(1)
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (3, 4.0), (6, 30.0), (10_000, 30.0)]:
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(ceiling * 0.5 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling * 0.3  # really jittered
    with pytest.raises(ValueError):
        Backoff(initial=0.0)


def test_mqtt_config_loads_and_validates(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked until connect\n")
    table = {
        "mqtt": {
            "enabled": True,
            "host": "broker.local",
            "port": 8883,
            "prefix": "studio/rwkv",
            "instance": "left",
            "username": "me",
            "password": "pw",
            "tls": True,
            "ca_file": str(ca),
            "keepalive": 30,
        }
    }
    config = load_section(MqttConfig, table, "mqtt")
    assert config.base == "studio/rwkv/left" and config.tls and config.ca_file == str(ca)
    assert load_section(MqttConfig, {}, "mqtt") == MqttConfig()
    for bad, key in [
        ({"port": 0}, "mqtt.port"),
        ({"keepalive": 1}, "mqtt.keepalive"),
        ({"prefix": "/rwkv"}, "mqtt.prefix"),
        ({"prefix": "a/+/b"}, "mqtt.prefix"),
        ({"instance": "a/b"}, "mqtt.instance"),
        ({"instance": "#"}, "mqtt.instance"),
        ({"password": "pw"}, "mqtt.password"),
        ({"ca_file": str(ca)}, "mqtt.ca_file"),
        ({"tls": True, "ca_file": str(tmp_path / "none.pem")}, "mqtt.ca_file"),
        ({"enabled": "yes"}, "mqtt.enabled"),
        ({"retries": 3}, "retries"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_section(MqttConfig, {"mqtt": bad}, "mqtt")


@pytest.mark.parametrize(
    ("host", "password", "insecure", "failure"),
    [
        ("localhost", "secret", False, None),  # the certificate names localhost
        ("127.0.0.1", "secret", True, None),  # name not checked
        ("127.0.0.1", "secret", False, "IP address mismatch"),
        ("localhost", "wrong", False, "Not authorized"),
    ],
)
def test_mqtt_bridge_tls_and_password(mosquitto_tls, caplog, host, password, insecure, failure):
    broker = mosquitto_tls
    config = MqttConfig(
        enabled=True,
        host=host,
        port=broker.port,
        instance="test",
        username="player",
        password=password,
        tls=True,
        ca_file=str(broker.ca_file),
        tls_insecure=insecure,
    )

    async def scenario():
        daemon = FakeDaemon()
        async with MqttBridge(config, daemon.execute, backoff=FAST) as bridge:
            if failure is None:
                assert await bridge.wait_connected(WAIT)
                client = ["-h", "localhost", "-p", str(broker.port), "--cafile", str(broker.ca_file)]
                client += ["-u", "player", "-P", "secret", "-q", "1"]
                await tool("mosquitto_pub", *client, "-t", "rwkv-music/test/set/length", "-m", "3")
                assert await daemon.next_command() == SetParam("length", 3)
            else:
                await until(lambda: bridge.stats.failed >= 2, "failed attempts")
                assert not bridge.connected and bridge.stats.connects == 0

    caplog.set_level(logging.WARNING, logger="daemon.mqtt_bridge")
    run(scenario())
    if failure is not None:
        warnings = [r.getMessage() for r in caplog.records if r.name == "daemon.mqtt_bridge"]
        assert len(warnings) == 1 and failure in warnings[0]  # one warning per outage
