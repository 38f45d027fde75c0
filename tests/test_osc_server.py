"""The OSC server over real UDP on loopback, with our client and with liblo's oscsend/oscdump."""

from __future__ import annotations

import asyncio
import math
import shutil
import socket
import subprocess
import time
from typing import Any

import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

from daemon.controls import Command, Controls, NoReplyError, Reload, SetParam, Status, Trigger
from daemon.errors import DaemonError
from daemon.osc_server import (
    OscConfig,
    OscServer,
    build_message,
    send_and_wait,
    status_arguments,
    status_values,
)
from model.settings import ConfigError, load_section

REPLY_TIMEOUT = 5.0


class FakeDaemon:
    """The server's collaborator: a dict of control values behind the `execute` signature."""

    def __init__(self) -> None:
        self.controls = Controls()
        self.commands: list[Command] = []

    async def execute(self, command: Command) -> dict[str, Any] | None:
        self.commands.append(command)
        if isinstance(command, SetParam):
            self.controls = self.controls.apply(command)
        elif isinstance(command, Status):
            return {**self.controls.as_dict(), "model_id": "abc123", "playing": False, "ports": ["in"]}
        elif isinstance(command, Reload) and command.path == "missing.safetensors":
            raise DaemonError("missing.safetensors: no such checkpoint")
        elif isinstance(command, Reload) and command.path == "crash":
            raise RuntimeError("handler bug")
        return None


class OscClient(asyncio.DatagramProtocol):
    """A UDP socket on loopback that queues every reply it receives as (address, args)."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[tuple[str, tuple[Any, ...]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        message = OscPacket(data).messages[0].message
        self.replies.put_nowait((message.address, tuple(message.params)))

    def send(self, target: tuple[str, int], address: str, *args: Any) -> None:
        self.send_raw(target, build_message(address, args))

    def send_raw(self, target: tuple[str, int], data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, target)

    async def reply(self) -> tuple[str, tuple[Any, ...]]:
        return await asyncio.wait_for(self.replies.get(), REPLY_TIMEOUT)

    async def ask(self, target: tuple[str, int], address: str, *args: Any) -> tuple[str, tuple[Any, ...]]:
        self.send(target, address, *args)
        return await self.reply()


async def open_client(host: str = "127.0.0.1") -> OscClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_datagram_endpoint(OscClient, local_addr=(host, 0))
    return client


def run(coro_fn, *args):
    return asyncio.run(asyncio.wait_for(coro_fn(*args), 30))


def test_osc_server_set_acks_and_applies():
    async def scenario():
        daemon = FakeDaemon()
        async with OscServer("127.0.0.1", 0, "/rwkv", daemon.execute) as server:
            client = await open_client()
            reply = await client.ask(server.address, "/rwkv/temperature", 0.5)
            assert reply == ("/rwkv/ack", ("/rwkv/temperature",))
            assert daemon.controls.temperature == 0.5
            # An int for a float control is accepted.
            assert await client.ask(server.address, "/rwkv/tempo", 90) == ("/rwkv/ack", ("/rwkv/tempo",))
            assert daemon.controls.tempo == 90.0
            assert await client.ask(server.address, "/rwkv/trigger") == ("/rwkv/ack", ("/rwkv/trigger",))
            assert daemon.commands[-1] == Trigger()
            assert server.stats.acked == 3 and server.stats.errors == 0

    run(scenario)


def test_osc_server_status_reflects_a_set():
    async def scenario():
        daemon = FakeDaemon()
        async with OscServer("127.0.0.1", 0, "/rwkv", daemon.execute) as server:
            client = await open_client()
            await client.ask(server.address, "/rwkv/top_k", 40)
            await client.ask(server.address, "/rwkv/mode", "manual")
            address, args = await client.ask(server.address, "/rwkv/status")
            assert address == "/rwkv/status"
            values = status_values(args)
            assert values["top_k"] == 40
            assert values["mode"] == "manual"
            assert values["temperature"] == pytest.approx(1.0)
            assert values["model_id"] == "abc123"
            assert values["playing"] is False
            assert values["ports"] == '["in"]'  # non-scalar values travel as JSON text

    run(scenario)


@pytest.mark.parametrize(
    ("address", "args", "reason"),
    [
        ("/rwkv/temperature", ("hot",), "temperature must be a number (got string 'hot')"),
        ("/rwkv/temperature", (math.nan,), "temperature must be a finite number (got nan)"),
        ("/rwkv/temperature", (math.inf,), "temperature must be a finite number (got inf)"),
        ("/rwkv/temperature", (True,), "temperature must be a number (got a boolean)"),
        ("/rwkv/temperature", (), "temperature takes 1 argument (got 0)"),
        ("/rwkv/length", (100,), "length must be between 1 and 64 (got 100)"),
        ("/rwkv/top_k", (4.0,), "top_k must be an integer (got float)"),
        ("/rwkv/mode", ("loud",), "mode must be one of call_response, autopilot, manual, off (got 'loud')"),
        ("/rwkv/volume", (1.0,), "unknown address 'volume'"),
        ("/other/temperature", (0.5,), "unknown address"),
        ("/rwkv", (), "unknown address"),
        ("/rwkv/reload", ("missing.safetensors",), "missing.safetensors: no such checkpoint"),
    ],
)
def test_osc_server_rejects_with_error_reply(address, args, reason):
    async def scenario():
        daemon = FakeDaemon()
        before = daemon.controls
        async with OscServer("127.0.0.1", 0, "/rwkv", daemon.execute) as server:
            client = await open_client()
            assert await client.ask(server.address, address, *args) == ("/rwkv/error", (address, reason))
            assert server.stats.errors == 1
        assert daemon.controls == before

    run(scenario)


def test_osc_server_survives_malformed_datagrams():
    truncated = build_message("/rwkv/temperature", [0.5])[:10]  # cut inside the address
    bundle = OscBundleBuilder(IMMEDIATELY)
    bundle.add_content(OscMessageBuilder("/rwkv/seed").build())
    garbage = [
        b"",
        b"\x00\x01\x02",
        b"hello",
        truncated,
        b"/\xff\xfe\x00,f\x00\x00\x00\x00\x00\x00",  # address not UTF-8
        b"/rwkv/temperature\x00\x00\x00,f",  # type tag not terminated
        b"#bundle\x00" + b"\x00" * 7,  # bundle header cut short
        bundle.build().dgram[:-3],
        b"/rwkv/seed\x00\x00,c\x00\x00\x00\x00\x00A",  # a type tag python-osc cannot decode
    ]

    async def scenario():
        daemon = FakeDaemon()
        async with OscServer("127.0.0.1", 0, "/rwkv", daemon.execute) as server:
            client = await open_client()
            # A plain socket: asyncio's transport silently skips empty datagrams.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.bind(("127.0.0.1", 0))
                for data in garbage:
                    raw.sendto(data, server.address)
                # Handled in arrival order: once this is answered, all garbage was seen.
                reply = await client.ask(server.address, "/rwkv/length", 4)
                assert reply == ("/rwkv/ack", ("/rwkv/length",))
                assert server.stats.malformed == len(garbage)
                raw.setblocking(False)
                with pytest.raises(BlockingIOError):
                    raw.recv(1024)  # malformed datagrams get no reply
            assert daemon.commands == [SetParam("length", 4)]

    run(scenario)


def test_osc_server_handler_crash_is_an_error_reply_and_server_goes_on():
    async def scenario():
        daemon = FakeDaemon()
        async with OscServer("127.0.0.1", 0, "/rwkv", daemon.execute) as server:
            client = await open_client()
            reply = await client.ask(server.address, "/rwkv/reload", "crash")
            assert reply == ("/rwkv/error", ("/rwkv/reload", "internal error: RuntimeError"))
            assert await client.ask(server.address, "/rwkv/panic") == ("/rwkv/ack", ("/rwkv/panic",))

    run(scenario)


def test_osc_server_bundle_messages_each_get_a_reply():
    builder = OscBundleBuilder(IMMEDIATELY)
    builder.add_content(OscMessageBuilder("/rwkv/seed").build())  # missing argument
    seed = OscMessageBuilder("/rwkv/seed")
    seed.add_arg(7)
    builder.add_content(seed.build())

    async def scenario():
        daemon = FakeDaemon()
        async with OscServer("127.0.0.1", 0, "/rwkv", daemon.execute) as server:
            client = await open_client()
            client.send_raw(server.address, builder.build().dgram)
            first, second = await client.reply(), await client.reply()
            assert first == ("/rwkv/error", ("/rwkv/seed", "seed takes 1 argument (got 0)"))
            assert second == ("/rwkv/ack", ("/rwkv/seed",))
            assert daemon.controls.seed == 7

    run(scenario)


def test_osc_server_custom_prefix_on_requests_and_replies():
    async def scenario():
        daemon = FakeDaemon()
        async with OscServer("127.0.0.1", 0, "/stage/left", daemon.execute) as server:
            client = await open_client()
            reply = await client.ask(server.address, "/stage/left/length", 8)
            assert reply == ("/stage/left/ack", ("/stage/left/length",))
            reply = await client.ask(server.address, "/rwkv/length", 8)
            assert reply == ("/stage/left/error", ("/rwkv/length", "unknown address"))

    run(scenario)


def test_osc_server_allow_list_ignores_other_senders():
    async def scenario():
        daemon = FakeDaemon()
        async with OscServer("127.0.0.1", 0, "/rwkv", daemon.execute, allow=["127.0.0.2"]) as server:
            stranger = await open_client("127.0.0.1")
            friend = await open_client("127.0.0.2")
            stranger.send(server.address, "/rwkv/temperature", 3.0)
            assert await friend.ask(server.address, "/rwkv/temperature", 0.3) == (
                "/rwkv/ack",
                ("/rwkv/temperature",),
            )
            assert server.stats.refused == 1
            assert stranger.replies.empty()
            assert daemon.controls.temperature == pytest.approx(0.3)

    run(scenario)


def test_osc_server_full_queue_answers_busy():
    async def scenario():
        entered = asyncio.Event()
        release = asyncio.Event()
        seen: list[Command] = []

        async def slow_execute(command: Command) -> None:
            seen.append(command)
            entered.set()
            await release.wait()

        async with OscServer("127.0.0.1", 0, "/rwkv", slow_execute, queue_size=1) as server:
            client = await open_client()
            client.send(server.address, "/rwkv/seed", 1)
            await asyncio.wait_for(entered.wait(), REPLY_TIMEOUT)
            client.send(server.address, "/rwkv/seed", 2)  # waits in the queue
            reply = await client.ask(server.address, "/rwkv/seed", 3)  # finds it full
            assert reply == ("/rwkv/error", ("/rwkv/seed", "busy: too many pending messages"))
            release.set()
            assert await client.reply() == ("/rwkv/ack", ("/rwkv/seed",))
            assert await client.reply() == ("/rwkv/ack", ("/rwkv/seed",))
            assert seen == [SetParam("seed", 1), SetParam("seed", 2)]
            assert server.stats.dropped == 1

    run(scenario)


def test_osc_server_port_in_use_is_a_daemon_error():
    async def scenario():
        daemon = FakeDaemon()
        async with OscServer("127.0.0.1", 0, "/rwkv", daemon.execute) as first:
            with pytest.raises(DaemonError, match="cannot listen for OSC"):
                async with OscServer("127.0.0.1", first.address[1], "/rwkv", daemon.execute):
                    pass

    run(scenario)


def test_send_and_wait_round_trip_against_running_server():
    async def scenario():
        daemon = FakeDaemon()
        async with OscServer("127.0.0.1", 0, "/rwkv", daemon.execute) as server:
            host, port = server.address
            reply = await asyncio.to_thread(send_and_wait, host, port, "/rwkv/top_p", [0.5], REPLY_TIMEOUT)
            assert reply == ("/rwkv/ack", ("/rwkv/top_p",))
            address, args = await asyncio.to_thread(
                send_and_wait, host, port, "/rwkv/status", [], REPLY_TIMEOUT
            )
            assert address == "/rwkv/status" and status_values(args)["top_p"] == 0.5

    run(scenario)


def test_send_and_wait_nothing_listening_is_a_daemon_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing bound: loopback answers ICMP port unreachable, seen as a refused connection.
    with pytest.raises(DaemonError, match="nothing listens"):
        send_and_wait("127.0.0.1", port, "/rwkv/status", [], timeout=REPLY_TIMEOUT)


def test_send_and_wait_silent_peer_raises_no_reply():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        with pytest.raises(NoReplyError) as info:
            send_and_wait("127.0.0.1", silent.getsockname()[1], "/rwkv/status", [], timeout=0.2)
        assert silent.recv(1024) == build_message("/rwkv/status", [])
    assert info.value.address == "/rwkv/status"


def test_status_arguments_round_trip():
    values = {"temperature": 0.5, "top_k": 3, "mode": "off", "ok": True, "none": None, "ids": [1, 2]}
    assert status_values(status_arguments(values)) == {**values, "ids": "[1,2]"}


def test_osc_config_loads_and_validates():
    table = {"osc": {"host": "0.0.0.0", "port": 9100, "prefix": "/band", "allow": ["127.0.0.1"]}}
    config = load_section(OscConfig, table, "osc")
    assert (config.host, config.port, config.prefix, config.allow) == (
        "0.0.0.0",
        9100,
        "/band",
        ["127.0.0.1"],
    )
    assert load_section(OscConfig, {}, "osc") == OscConfig()
    for bad, key in [
        ({"port": 70000}, "osc.port"),
        ({"prefix": "rwkv"}, "osc.prefix"),
        ({"prefix": "/rwkv/"}, "osc.prefix"),
        ({"prefix": "/rw*"}, "osc.prefix"),
        ({"allow": ["localhost"]}, "osc.allow"),
        ({"port": "9000"}, "osc.port"),
        ({"bogus": 1}, "bogus"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_section(OscConfig, {"osc": bad}, "osc")


needs_liblo = pytest.mark.skipif(
    shutil.which("oscsend") is None or shutil.which("oscdump") is None,
    reason="liblo-tools (oscsend, oscdump) not installed",
)


def _wait_until_bound(port: int, process: subprocess.Popen[str]) -> None:
    """Return once some process holds UDP `port` (binding it ourselves then fails)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, "oscdump exited"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.02)
    raise AssertionError(f"oscdump did not bind port {port}")


@needs_liblo
def test_osc_server_with_liblo_oscsend_and_oscdump():
    """liblo encodes the requests and decodes the replies: an independent implementation.

    oscsend sends from a throw-away port, so the server runs with reply_port pointing at
    oscdump, the way controllers that listen on a fixed port are served.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        dump_port = sock.getsockname()[1]
    dump = subprocess.Popen(
        ["oscdump", "-L", str(dump_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    async def scenario() -> None:
        daemon = FakeDaemon()
        async with OscServer("127.0.0.1", 0, "/rwkv", daemon.execute, reply_port=dump_port) as server:
            port = str(server.address[1])

            async def oscsend(*argv: str) -> str:
                proc = await asyncio.create_subprocess_exec("oscsend", "127.0.0.1", port, *argv)
                assert await proc.wait() == 0
                line = await asyncio.wait_for(asyncio.to_thread(dump.stdout.readline), REPLY_TIMEOUT)
                # oscdump prints "<time tag> <address> <types> <args>".
                return line.split(" ", 1)[1].strip()

            assert await oscsend("/rwkv/temperature", "f", "0.25") == '/rwkv/ack s "/rwkv/temperature"'
            assert daemon.controls.temperature == 0.25
            assert await oscsend("/rwkv/length", "i", "8") == '/rwkv/ack s "/rwkv/length"'
            assert await oscsend("/rwkv/mode", "s", "autopilot") == '/rwkv/ack s "/rwkv/mode"'
            assert await oscsend("/rwkv/length", "i", "0") == (
                '/rwkv/error ss "/rwkv/length" "length must be between 1 and 64 (got 0)"'
            )
            assert await oscsend("/rwkv/top_p", "s", "x") == (
                '/rwkv/error ss "/rwkv/top_p" "top_p must be a number (got string \'x\')"'
            )
            status = await oscsend("/rwkv/status")
            assert status.startswith("/rwkv/status sfsfsisisssfsisfsssFss ")
            assert '"temperature" 0.250000' in status
            assert '"length" 8 "mode" "autopilot"' in status

    try:
        _wait_until_bound(dump_port, dump)
        run(scenario)
    finally:
        dump.kill()
        dump.wait()


def test_osc_server_from_config_replies_from_configured_prefix():
    config = OscConfig(host="127.0.0.1", port=0, prefix="/duo", allow=["127.0.0.1"])

    async def scenario():
        daemon = FakeDaemon()
        async with OscServer.from_config(config, daemon.execute) as server:
            assert server.address[0] == "127.0.0.1" and server.address[1] != 0
            client = await open_client()
            assert await client.ask(server.address, "/duo/reset") == ("/duo/ack", ("/duo/reset",))

    run(scenario)


def test_osc_server_unencodable_status_is_an_error_reply():
    async def execute(command: Command) -> dict[str, Any] | None:
        return {"counter": 2**70} if isinstance(command, Status) else None

    async def scenario():
        async with OscServer("127.0.0.1", 0, "/rwkv", execute) as server:
            client = await open_client()
            reply = await client.ask(server.address, "/rwkv/status")
            assert reply == ("/rwkv/error", ("/rwkv/status", "reply not encodable as OSC"))
            assert await client.ask(server.address, "/rwkv/reset") == ("/rwkv/ack", ("/rwkv/reset",))

    run(scenario)
