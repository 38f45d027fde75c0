"""OSC over UDP: the daemon's live control surface, and a small client for it.

Every well-formed message gets one reply to its sender: `<prefix>/ack <address>` when the
daemon accepted it, `<prefix>/error <address> <reason>` when not, and `<prefix>/status`
followed by key/value pairs for a status request. Malformed datagrams are counted and
dropped without a reply; senders outside the allow-list are counted and ignored. Parsing
and checking live in daemon.controls; this module only moves datagrams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket
from pythonosc.parsing import osc_types

from daemon.controls import (
    Command,
    ControlError,
    NoReplyError,
    Status,
    Style,
    Subscribe,
    Unsubscribe,
    parse_command,
)
from daemon.errors import DaemonError
from model.settings import ConfigError, check_range

log = logging.getLogger(__name__)

Execute = Callable[[Command], Awaitable["dict[str, Any] | None"]]

# Type tags python-osc decodes; anything else it skips with a warning and misaligns the rest,
# so such messages are refused as a whole.
_KNOWN_TAGS = frozenset("ihfdsbrmtTFN[]")
# Characters OSC reserves for address patterns and the type tag; a prefix holding them
# could never match a literal address.
_PATTERN_CHARS = frozenset(" #*,?[]{}")
# A reply names the address it answers, cut to this length: an unknown address can be as long
# as a datagram, and echoing it whole would send 64 KB back for every 64 KB received.
MAX_ECHOED_ADDRESS = 256


@dataclass
class OscConfig:
    """`[osc]` section of config.toml."""

    host: str = "127.0.0.1"  # interface to bind; "0.0.0.0" listens on every interface
    port: int = 9000  # UDP port; 0 picks a free one (tests)
    prefix: str = "/rwkv"  # address prefix of every message, sent and received
    allow: list[str] = field(default_factory=list)  # sender IPs allowed; empty = anyone
    reply_port: int = 0  # send replies to this port of the sender; 0 = its source port

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("osc.host must not be empty")
        check_range("osc.port", self.port, 0, 65535)
        check_range("osc.reply_port", self.reply_port, 0, 65535)
        check_prefix(self.prefix, "osc.prefix")
        for ip in self.allow:
            try:
                ipaddress.ip_address(ip)
            except ValueError as err:
                raise ConfigError(f"osc.allow: {ip!r} is not an IP address") from err


def check_prefix(prefix: str, key: str) -> None:
    """Raise ConfigError unless `prefix` is like "/rwkv": leading slash, no trailing one."""
    if not prefix.startswith("/") or prefix.endswith("/") or _PATTERN_CHARS & set(prefix):
        raise ConfigError(
            f"{key} = {prefix!r}: must start with '/', not end with '/', and hold no spaces or"
            " OSC pattern characters"
        )


@dataclass
class OscStats:
    """Counters since the server started (shown in the daemon's status)."""

    received: int = 0  # messages taken from well-formed datagrams
    acked: int = 0
    errors: int = 0  # error replies sent
    malformed: int = 0  # datagrams that did not parse as OSC
    refused: int = 0  # datagrams from senders outside the allow-list
    dropped: int = 0  # messages refused because the work queue was full


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: OscServer):
        self._server = server

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._server._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # Linux reports ICMP port-unreachable from an earlier reply here; the server goes on.
        log.debug("OSC socket error: %s", exc)


class OscServer:
    """UDP OSC server that turns messages into Commands for `execute` and replies to senders.

    `execute(command)` is the daemon's handler: it returns a dict for `Status` (the values
    to report) and None otherwise, and raises `DaemonError` to refuse a command (its text
    becomes the error reason). Messages are handled one at a time, in arrival order, by a
    task of the server's own; at most `queue_size` wait, more are refused with an error.
    """

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        execute: Execute,
        allow: Iterable[str] | None = None,
        *,
        reply_port: int = 0,
        queue_size: int = 256,
    ):
        check_prefix(prefix, "prefix")
        self.host = host
        self.port = port
        self.prefix = prefix
        self.allow = frozenset(allow or ())
        self.reply_port = reply_port
        self.stats = OscStats()
        self._execute = execute
        self._queue: asyncio.Queue[tuple[str, tuple[Any, ...], tuple[str, int]]] = asyncio.Queue(queue_size)
        self._transport: asyncio.DatagramTransport | None = None
        self._worker: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: OscConfig, execute: Execute) -> OscServer:
        """A server with the `[osc]` section's settings."""
        return cls(
            config.host, config.port, config.prefix, execute, config.allow, reply_port=config.reply_port
        )

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; the port differs from `port` when that was 0."""
        if self._transport is None:
            raise DaemonError("OSC server is not running")
        sockname = self._transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    async def __aenter__(self) -> OscServer:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(self.host, self.port)
            )
        except OSError as err:
            raise DaemonError(f"cannot listen for OSC on {self.host}:{self.port}: {err}") from err
        self._transport = transport  # type: ignore[assignment]
        self._worker = asyncio.create_task(self._serve(), name="osc-server")
        log.info("OSC listening on %s:%d, prefix %s", *self.address, self.prefix)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _on_datagram(self, data: bytes, sender: tuple[str, int]) -> None:
        if self.allow and sender[0] not in self.allow:
            self.stats.refused += 1
            log.debug("OSC datagram from %s refused (not in allow-list)", sender[0])
            return
        try:
            if data[:1] == b"/":
                _check_type_tags(data)  # before python-osc logs a warning for each unknown tag
            messages = [timed.message for timed in OscPacket(data).messages]
        except Exception as err:  # noqa: BLE001 - python-osc raises several types on bad bytes
            self._count_malformed(sender, err)
            return
        for message in messages:
            self.stats.received += 1
            try:
                _check_type_tags(message.dgram)
            except (ValueError, osc_types.ParseError) as err:
                self._count_malformed(sender, err)
                continue
            try:
                self._queue.put_nowait((message.address, tuple(message.params), sender))
            except asyncio.QueueFull:
                self.stats.dropped += 1
                self._reply_error(message.address, "busy: too many pending messages", sender)

    def _count_malformed(self, sender: tuple[str, int], err: BaseException) -> None:
        self.stats.malformed += 1
        # Debug level: a noisy or hostile sender must not flood the log.
        log.debug("malformed OSC datagram from %s:%d: %s", sender[0], sender[1], err)

    async def _serve(self) -> None:
        while True:
            address, args, sender = await self._queue.get()
            try:
                await self._handle(address, args, sender)
            except Exception:  # a bug must cost one reply, not the whole control surface
                log.exception("OSC message %s not handled", address)

    async def _handle(self, address: str, args: tuple[Any, ...], sender: tuple[str, int]) -> None:
        head = self.prefix + "/"
        if not address.startswith(head):
            self._reply_error(address, "unknown address", sender)
            return
        try:
            command = parse_command(address[len(head) :], args)
        except ControlError as err:
            self._reply_error(address, err.reason, sender)
            return
        if isinstance(command, (Subscribe, Unsubscribe)):
            command = dataclasses.replace(command, host=sender[0])  # events go back to the sender
        try:
            result = await self._execute(command)
        except DaemonError as err:
            self._reply_error(address, str(err), sender)
            return
        except Exception as err:  # noqa: BLE001 - a handler bug must not stop the server
            log.exception("OSC handler failed on %s", address)
            self._reply_error(address, f"internal error: {type(err).__name__}", sender)
            return
        if isinstance(command, Status):
            self._send(f"{self.prefix}/status", status_arguments(result or {}), sender)
        elif isinstance(command, Style) and command.name is None:
            self._send(f"{self.prefix}/styles", list((result or {}).get("styles", [])), sender)
        else:
            self._send(f"{self.prefix}/ack", [address], sender)
        self.stats.acked += 1

    def _reply_error(self, address: str, reason: str, sender: tuple[str, int]) -> None:
        self.stats.errors += 1
        address = _echoed(address)
        log.debug("OSC %s refused: %s", address, reason)
        self._send(f"{self.prefix}/error", [address, reason], sender)

    def send_to(self, address: str, args: Sequence[Any], target: tuple[str, int]) -> None:
        """Send one OSC message from the server's socket to `target` (subscribers); never blocks:
        a datagram the kernel cannot take now is dropped."""
        self._send(address, args, target, exact=True)

    def _send(self, address: str, args: Sequence[Any], sender: tuple[str, int], *, exact: bool = False) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        target = sender if exact else (sender[0], self.reply_port or sender[1])
        try:
            datagram = build_message(address, args)
        except Exception as err:  # noqa: BLE001 - e.g. a status int beyond 64 bits
            log.error("OSC reply %s not encodable: %s", address, err)
            datagram = build_message(f"{self.prefix}/error", [address, "reply not encodable as OSC"])
        self._transport.sendto(datagram, target)


def _echoed(address: str) -> str:
    """`address` as a reply names it: whole, or cut to MAX_ECHOED_ADDRESS characters."""
    if len(address) <= MAX_ECHOED_ADDRESS:
        return address
    return address[: MAX_ECHOED_ADDRESS - 3] + "..."


def _check_type_tags(dgram: bytes) -> None:
    """Raise ValueError for a message holding type tags python-osc would skip and misread."""
    _, index = osc_types.get_string(dgram, 0)
    if index < len(dgram):
        tags, _ = osc_types.get_string(dgram, index)
        unknown = set(tags[1:]) - _KNOWN_TAGS
        if unknown:
            raise ValueError(f"unsupported OSC type tags {''.join(sorted(unknown))!r}")


def status_arguments(values: Mapping[str, Any]) -> list[Any]:
    """Status dict -> flat OSC arguments: key, value, key, value, ...

    Numbers, strings, booleans and None go as OSC values (i/h, f, s, T/F, N); anything
    else (nested dicts, lists) goes as a JSON string so every client can read it.
    """
    args: list[Any] = []
    for key, value in values.items():
        if value is None or isinstance(value, (bool, int, float, str)):
            args += [str(key), value]
        else:
            args += [str(key), json.dumps(value, default=str, separators=(",", ":"))]
    return args


def status_values(args: Sequence[Any]) -> dict[str, Any]:
    """Inverse of `status_arguments` for a reply's arguments (JSON strings stay strings, floats
    are read back to the 7 significant digits a 32-bit OSC float holds)."""
    if len(args) % 2:
        raise ValueError("status reply has an odd number of arguments")
    return {str(args[i]): _as_sent(args[i + 1]) for i in range(0, len(args), 2)}


def _as_sent(value: Any) -> Any:
    """A float as the daemon had it: OSC `f` is 32-bit, 7 significant digits (0.7, not 0.699999988)."""
    return float(f"{value:.7g}") if isinstance(value, float) else value


def build_message(address: str, args: Sequence[Any]) -> bytes:
    """One OSC message as bytes; Python types pick the tags (int i/h, float f, str s, bool T/F)."""
    builder = OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


def send_and_wait(
    host: str, port: int, address: str, args: Sequence[Any] = (), timeout: float = 2.0
) -> tuple[str, tuple[Any, ...]]:
    """Send one OSC message and return the first reply as (address, arguments).

    Blocking; for the command line and tests. Raises NoReplyError after `timeout` seconds
    and ControlError when the arguments cannot be encoded as OSC.
    """
    try:
        datagram = build_message(address, args)
    except Exception as err:  # noqa: BLE001 - python-osc raises BuildError or ValueError
        raise ControlError(f"cannot encode {address} {list(args)!r} as OSC: {err}") from err
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            # A connected socket takes datagrams from that peer only, and learns at once
            # (ICMP port unreachable) when nothing listens there.
            sock.connect((host, port))
            sock.send(datagram)
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                data = sock.recv(65536)
                try:
                    reply = OscPacket(data).messages[0].message
                except Exception:  # noqa: BLE001 - skip stray non-OSC datagrams
                    continue
                return reply.address, tuple(reply.params)
        except TimeoutError:
            pass
        except ConnectionRefusedError as err:
            raise DaemonError(f"nothing listens for OSC on {host}:{port}") from err
        except OSError as err:
            raise DaemonError(f"cannot send OSC to {host}:{port}: {err}") from err
    raise NoReplyError(host, port, address, timeout)
