"""Reliability and security of the OSC control surface of a real daemon process, over real UDP:
wrong types, unknown addresses, NaN and infinities, empty and 64 KB strings, malformed packets,
reload paths that try to leave the checkpoint folder, a flood, and hypothesis fuzzing. Every
well-formed message gets one reply (ack, error or status), everything else silence; the daemon
never goes down and its controls never leave their ranges.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pythonosc.osc_packet import OscPacket

from daemon.controls import ADDRESSES, PARAMS, Controls
from daemon.osc_server import build_message
from tests.test_daemon_jack import save_random_checkpoint
from tests.test_reliability_midi import DaemonProcess

REPLIES = {"/rwkv/ack", "/rwkv/error", "/rwkv/status", "/rwkv/styles"}


@pytest.fixture(scope="module")
def daemon(jack_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    folder = tmp_path_factory.mktemp("osc-reliability")
    checkpoint = folder / "run" / "latest.safetensors"
    save_random_checkpoint(checkpoint, seed=3)
    (folder / "secret.safetensors").write_bytes(b"outside the checkpoint folder")
    (folder / "run" / "escape.safetensors").symlink_to(folder / "secret.safetensors")
    process = DaemonProcess(checkpoint, folder, "clock.tempo=240.0", "daemon.mode=manual")
    yield process
    try:
        assert process.stop() == 0
        assert "Traceback" not in process.log_text()
    finally:
        process.kill()


class RawClient:
    """A UDP socket on loopback that sends any bytes and reads back what comes.

    `exchange` sends a datagram and then a marker message (an unknown address, answered with an
    error that names it): the server handles datagrams in arrival order, so every reply before
    the marker's belongs to the datagram, and no reply means none was sent. No fixed waits.
    """

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self._markers = 0

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    def receive(self, timeout: float) -> tuple[str, tuple[Any, ...]]:
        self.sock.settimeout(timeout)
        message = OscPacket(self.sock.recv(1 << 17)).messages[0].message
        return message.address, tuple(message.params)

    def exchange(self, data: bytes, timeout: float = 10.0) -> list[tuple[str, tuple[Any, ...]]]:
        """The replies to `data` (see the class docstring)."""
        self._markers += 1
        marker = f"/rwkv/marker-{self._markers}"
        self.send(data)
        self.send(build_message(marker, []))
        replies = []
        while True:
            reply = self.receive(timeout)
            if reply[0] == "/rwkv/error" and reply[1][:1] == (marker,):
                return replies
            replies.append(reply)

    def ask(self, address: str, *args: Any) -> tuple[str, tuple[Any, ...]] | None:
        """Send one message; its reply, or None when it got none."""
        replies = self.exchange(build_message(address, args))
        assert len(replies) <= 1, replies
        return replies[0] if replies else None

    def drain(self) -> list[tuple[str, tuple[Any, ...]]]:
        """Whatever waits in the socket now (after a flood)."""
        found = []
        try:
            while True:
                found.append(self.receive(0.2))
        except TimeoutError:
            return found

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[RawClient]:
    raw = RawClient(daemon.osc_address)
    yield raw
    raw.close()


def controls_of(status: dict[str, Any]) -> dict[str, Any]:
    return {name: status[name] for name in PARAMS}


def assert_controls_in_range(status: dict[str, Any]) -> None:
    Controls(**{**controls_of(status), "length": status["length"]})  # raises when out of range


LONG = "x" * 65_000  # a 64 KB string: one datagram still carries it over loopback


@pytest.mark.parametrize(
    ("address", "args", "reason"),
    [
        ("/rwkv/temperature", ("hot",), "temperature must be a number"),
        ("/rwkv/temperature", (math.nan,), "finite number (got nan)"),
        ("/rwkv/top_p", (math.inf,), "finite number (got inf)"),
        ("/rwkv/tempo", (-math.inf,), "finite number (got -inf)"),
        ("/rwkv/length", (2**40,), "length must be between 1 and 64"),
        ("/rwkv/top_k", (1.5,), "top_k must be an integer"),
        ("/rwkv/seed", (True,), "seed must be an integer (got a boolean)"),
        ("/rwkv/mode", ("",), "mode must be one of"),
        ("/rwkv/mode", (LONG,), "mode must be one of"),
        ("/rwkv/mode", (), "mode takes 1 argument"),
        ("/rwkv/trigger", (1.0,), "trigger takes no arguments"),
        ("/rwkv/volume", (1.0,), "unknown address 'volume'"),
        ("/rwkv/", (), "unknown address"),
        ("/other/tempo", (90.0,), "unknown address"),
        ("/rwkv/reload", ("",), "non-empty string"),
        ("/rwkv/reload", (LONG,), "at most 1024 characters"),
        ("/rwkv/reload", ("../secret.safetensors",), "outside the folders reloads may read"),
        ("/rwkv/reload", ("/etc/passwd",), "outside the folders reloads may read"),
        ("/rwkv/reload", ("escape.safetensors",), "outside the folders reloads may read"),  # a symlink out
    ],
)
def test_daemon_refuses_bad_osc_messages_with_a_reason_and_changes_nothing(daemon, client, address, args, reason):
    before = controls_of(daemon.status())
    reply = client.ask(address, *args)
    assert reply is not None and reply[0] == "/rwkv/error", reply
    assert reply[1][0] == address and reason in reply[1][1], reply
    assert len(reply[1][1]) < 300  # a reason, not an echo of what was sent
    assert controls_of(daemon.status()) == before


def test_daemon_answers_a_64_kb_address_or_stays_silent_and_survives(daemon, client):
    """The error reply would echo the address: beyond a datagram's size it is refused shorter."""
    reply = client.ask("/rwkv/" + LONG)
    assert reply is not None and reply[0] == "/rwkv/error" and len(reply[1][0]) < 1000, reply
    assert daemon.alive and daemon.status()["mode"] == "manual"


def test_daemon_ignores_malformed_datagrams(daemon, client):
    garbage = [
        b"\x00", b"hello", b"/rwkv/tempo", b"/rwkv/tempo\x00\x00\x00\x00,f\x00\x00",  # no float data
        b"/rwkv/tempo\x00\x00\x00\x00,q\x00\x00\x00\x00\x00\x00",  # an unknown type tag
        b"#bundle\x00" + b"\xff" * 12, b"#bundle\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x10\x00",
        b"/\xff\xfe\x00,s\x00\x00abc\x00", bytes(range(256)) * 200,
    ]
    for data in garbage:
        assert client.exchange(data) == [], data
    assert daemon.alive and daemon.status()["mode"] == "manual"


def test_daemon_survives_an_osc_flood_and_answers_after_it(daemon, client):
    """20,000 datagrams as fast as one socket sends them: replies or busy errors, never a crash."""
    set_tempo = build_message("/rwkv/tempo", [200.0])
    status = build_message("/rwkv/status", [])
    start = time.perf_counter()
    for i in range(20_000):
        client.send(status if i % 2 else set_tempo)
    seconds = time.perf_counter() - start
    time.sleep(0.5)
    replies = client.drain()
    assert replies and {address for address, _ in replies} <= REPLIES
    assert daemon.alive
    after = daemon.status()
    assert after["tempo"] == pytest.approx(200.0)
    print(f"\nOSC flood: 20000 datagrams in {seconds:.2f} s, {len(replies)} replies read back")


def test_daemon_osc_is_bound_to_loopback_by_default(daemon):
    assert daemon.status()["osc"].startswith("127.0.0.1:")


osc_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.text(max_size=64),
    st.booleans(),
    st.none(),
    st.binary(max_size=32),
)
osc_addresses = st.one_of(
    st.sampled_from([f"/rwkv/{a}" for a in ADDRESSES]),
    st.text(max_size=40).map(lambda t: "/rwkv/" + t),
    st.text(max_size=40),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(address=osc_addresses, args=st.lists(osc_values, max_size=3))
def test_fuzzed_osc_messages_get_at_most_one_reply_and_keep_controls_in_range(daemon, client, address, args):
    try:
        data = build_message(address, args)
    except Exception:  # noqa: BLE001 - python-osc cannot encode it: nothing to send
        return
    replies = client.exchange(data)
    assert len(replies) <= 1 and {a for a, _ in replies} <= REPLIES, (address, args, replies)
    status = daemon.status()
    assert_controls_in_range(status)
    if status["mode"] == "off" or status["tempo"] < 60:  # keep the daemon useful for what follows
        client.ask("/rwkv/mode", "manual")
        client.ask("/rwkv/tempo", 240.0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=1500), st.binary(max_size=64).map(lambda b: b"/rwkv/" + b)))
def test_fuzzed_datagrams_never_take_the_daemon_down(daemon, client, data):
    if not data:
        return  # an empty datagram is not delivered as one
    # Answering the marker after it is the proof of life; the daemon's own status at the end.
    replies = client.exchange(data)
    assert {a for a, _ in replies} <= REPLIES, (data, replies)


def test_reload_paths_stay_in_the_checkpoint_folder(daemon, client, tmp_path: Path):
    """A symlink inside the folder that points outside is refused like the outside path."""
    status = daemon.status()
    folder = Path(status["checkpoint"]).parent
    assert (folder / "escape.safetensors").is_symlink()
    reply = client.ask("/rwkv/reload", str(folder / "escape.safetensors"))
    assert reply is not None and reply[0] == "/rwkv/error" and "outside" in reply[1][1]
    assert daemon.status()["model_id"] == status["model_id"]
