"""SOCKS5 server state machine (SPEC §6): RFC 1928 + RFC 1929 handshake, UDP framing; no I/O.

The driver feeds client bytes with `Socks5Server.receive_data` (``b""`` = EOF), calls
`Socks5Server.next_event` after every feed and sends `Socks5Server.data_to_send` after every
call. `next_event` returns `NeedData` until the request is complete, then a `ConnectRequest` or
`UdpAssociateRequest`; the driver decides, dials, and answers with `Socks5Server.send_reply`.
Bytes the client sent after its request are in `Socks5Server.leftover`: they belong to the tunnel.

Not here: sockets, deadlines and policy (``handlers/socks.py``); host canonicalisation
(``hosts.py``): a domain is handed over exactly as the client spelled it.

Choices where the RFCs and SPEC leave room:

- A non-zero RSV byte (request, UDP header) is tolerated, as curl, Dante and mitmproxy do.
- An empty or non-UTF-8 domain name gets GENERAL_FAILURE (0x01): the address type is supported
  (so not 0x08), the value is unusable. An unknown ATYP gets ADDRESS_TYPE_NOT_SUPPORTED (0x08).
- BIND and unknown commands get COMMAND_NOT_SUPPORTED (0x07), as does UDP ASSOCIATE when
  disabled. A wrong version byte, a wrong RFC 1929 sub-negotiation version, a greeting without
  an acceptable method (after ``05 FF``) and failed authentication (after ``01 01``) raise
  `Socks5Error` without a reply code: the driver sends what is queued and closes.
- Any user name is accepted; only the password is compared with the token (constant time).
- ``max_buffer`` bounds the handshake (greeting + authentication + request), checked as soon as
  a message's length is known, so the outcome never depends on how TCP split the bytes and
  tunnel bytes after the request never count. The longest legal handshake is 1032 bytes (255
  methods, 255-byte user and password, 255-byte domain); real clients stay under 300.
- Once the request is returned the machine is done: calling `next_event` or `receive_data`
  again is a driver bug and raises `RuntimeError`; so does any use after a `Socks5Error`.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from netproxy_core.errors import ClientProtocolError

__all__ = [
    "AddressType",
    "Command",
    "ConnectRequest",
    "NeedData",
    "ReplyCode",
    "Socks5Error",
    "Socks5Event",
    "Socks5Server",
    "UdpAssociateRequest",
    "UdpDatagram",
    "build_reply",
    "build_udp_datagram",
    "parse_udp_datagram",
]

_VERSION: Final = 5
_AUTH_VERSION: Final = 1  # RFC 1929 §2


class AddressType(enum.IntEnum):
    """ATYP (RFC 1928 §4)."""

    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class Command(enum.IntEnum):
    """CMD (RFC 1928 §4)."""

    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class ReplyCode(enum.IntEnum):
    """REP (RFC 1928 §6); SPEC §6 maps proxy outcomes onto these."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class _Method(enum.IntEnum):
    NO_AUTH = 0x00
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class _State(enum.Enum):
    GREETING = "greeting"
    AUTH = "authentication"
    REQUEST = "request"
    REQUEST_RECEIVED = "request received"
    REPLIED = "replied"
    FAILED = "failed"


class Socks5Error(ClientProtocolError):
    """The SOCKS5 client sent bytes we refuse; send what is queued, then close.

    Attributes:
        reply_code: the REP the machine has already queued, or None when the connection is
            simply closed (wrong version, no acceptable method, failed authentication, EOF).
    """

    def __init__(self, message: str, *, reply_code: ReplyCode | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


@dataclass(frozen=True, slots=True)
class NeedData:
    """The machine needs more client bytes before it can say anything new."""


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """CONNECT to ``host:port``; ``host`` is an IP literal or the name as the client sent it."""

    host: str
    port: int
    address_type: AddressType


@dataclass(frozen=True, slots=True)
class UdpAssociateRequest:
    """UDP ASSOCIATE; ``host:port`` is where the client says it will send from (often 0.0.0.0:0)."""

    host: str
    port: int
    address_type: AddressType


Socks5Event = NeedData | ConnectRequest | UdpAssociateRequest


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One client datagram to the UDP relay (RFC 1928 §7); drop it when ``frag`` is not 0."""

    frag: int
    host: str
    port: int
    address_type: AddressType
    payload: bytes


class _Incomplete(Exception):
    """Internal: the current message needs bytes that have not arrived yet."""


class _AddressError(Exception):
    def __init__(self, message: str, reply_code: ReplyCode) -> None:
        super().__init__(message)
        self.reply_code = reply_code


def _read_address(
    buf: bytes | bytearray, offset: int, require: Callable[[int], None]
) -> tuple[AddressType, str, int, int]:
    """Decode ATYP, DST.ADDR, DST.PORT at ``offset``; return (type, host, port, end offset).

    ``require(n)`` must raise unless ``buf`` holds ``n`` bytes; it is called in field order, so
    the first failure is the same however the bytes were split.
    """
    require(offset + 1)
    atyp = buf[offset]
    start = offset + 1
    if atyp == AddressType.IPV4:
        end = start + 4
        require(end + 2)
        host = str(ipaddress.IPv4Address(bytes(buf[start:end])))
    elif atyp == AddressType.IPV6:
        end = start + 16
        require(end + 2)
        host = ipaddress.IPv6Address(bytes(buf[start:end])).compressed
    elif atyp == AddressType.DOMAIN:
        require(start + 1)
        length = buf[start]
        if length == 0:
            raise _AddressError("empty domain name", ReplyCode.GENERAL_FAILURE)
        start += 1
        end = start + length
        require(end + 2)
        try:
            host = bytes(buf[start:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise _AddressError("domain name is not UTF-8", ReplyCode.GENERAL_FAILURE) from None
    else:
        raise _AddressError(
            f"unsupported address type 0x{atyp:02x}", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
        )
    port = int.from_bytes(buf[end : end + 2], "big")
    return AddressType(atyp), host, port, end + 2


def _encode_address(host: str, port: int) -> bytes:
    """ATYP + ADDR + PORT: IP literals by their family, anything else as a domain (UTF-8)."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is outside 0-65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("utf-8")
        if not 1 <= len(name) <= 255:
            raise ValueError(f"domain name must be 1-255 bytes, got {len(name)}") from None
        addr = bytes([AddressType.DOMAIN, len(name)]) + name
    else:
        atyp = AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
        addr = bytes([atyp]) + ip.packed
    return addr + port.to_bytes(2, "big")


def build_reply(code: ReplyCode, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    """The reply to a request (RFC 1928 §6).

    Args:
        code: REP.
        bind_host: BND.ADDR; an IPv4 or IPv6 literal (encoded by its family) or a name.
        bind_port: BND.PORT.

    Raises:
        ValueError: the port is outside 0-65535 or the name is empty or over 255 bytes.
    """
    return bytes([_VERSION, ReplyCode(code), 0]) + _encode_address(bind_host, bind_port)


def build_udp_datagram(host: str, port: int, payload: bytes) -> bytes:
    """A relay-to-client datagram (RFC 1928 §7, FRAG 0) from ``host:port`` carrying ``payload``.

    Raises:
        ValueError: as for `build_reply`.
    """
    return b"\x00\x00\x00" + _encode_address(host, port) + payload


def parse_udp_datagram(data: bytes) -> UdpDatagram:
    """Parse a client-to-relay datagram (RFC 1928 §7).

    Raises:
        Socks5Error: truncated header, unknown address type, empty or non-UTF-8 domain
            (``reply_code`` is None: there is nothing to answer, drop the datagram).
    """

    def require(n: int) -> None:
        if len(data) < n:
            raise Socks5Error(f"truncated UDP datagram: {len(data)} bytes, header needs {n}")

    require(3)  # RSV (2, tolerated when non-zero) + FRAG
    try:
        atyp, host, port, end = _read_address(data, 3, require)
    except _AddressError as exc:
        raise Socks5Error(f"bad UDP datagram: {exc}") from None
    return UdpDatagram(frag=data[2], host=host, port=port, address_type=atyp, payload=data[end:])


class Socks5Server:
    """Server side of one SOCKS5 handshake, from greeting to request (sans-IO).

    Args:
        auth_token: when set, require RFC 1929 username/password with this password (any
            user); when None, require the no-auth method.
        udp_enabled: accept UDP ASSOCIATE (SPEC ``enable_socks5_udp``); otherwise reply 0x07.
        max_buffer: the most handshake bytes (greeting + auth + request) accepted.

    Raises:
        ValueError: ``auth_token`` is empty or ``max_buffer`` is not positive.
    """

    __slots__ = (
        "_buffer",
        "_eof",
        "_handshake_bytes",
        "_leftover",
        "_max_buffer",
        "_outbound",
        "_request",
        "_state",
        "_token",
        "_udp_enabled",
    )

    def __init__(
        self, *, auth_token: str | None = None, udp_enabled: bool = True, max_buffer: int = 1024
    ) -> None:
        if auth_token == "":
            raise ValueError("auth_token must be None (no authentication) or non-empty")
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be positive, got {max_buffer}")
        self._token = None if auth_token is None else auth_token.encode("utf-8")
        self._udp_enabled = udp_enabled
        self._max_buffer = max_buffer
        self._state = _State.GREETING
        self._buffer = bytearray()
        self._outbound = bytearray()
        self._eof = False
        self._handshake_bytes = 0  # bytes of handshake messages already consumed
        self._request: ConnectRequest | UdpAssociateRequest | None = None
        self._leftover = b""

    def __repr__(self) -> str:
        parts = [
            f"state={self._state.name}",
            "auth=" + ("username/password" if self._token is not None else "none"),
            "udp=" + ("on" if self._udp_enabled else "off"),
            f"buffered={len(self._buffer)}",
            f"outbound={len(self._outbound)}",
        ]
        if self._request is not None:
            kind = type(self._request).__name__
            parts.append(f"request={kind}({self._request.host!r}, {self._request.port})")
        if self._leftover:
            parts.append(f"leftover={len(self._leftover)}")
        return f"<Socks5Server {' '.join(parts)}>"

    @property
    def leftover(self) -> bytes:
        """Bytes received after the request; they are the first bytes of the tunnel."""
        return self._leftover

    @property
    def request(self) -> ConnectRequest | UdpAssociateRequest | None:
        """The request once `next_event` has returned it, else None."""
        return self._request

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means the client closed (EOF)."""
        if self._state not in (_State.GREETING, _State.AUTH, _State.REQUEST):
            raise RuntimeError(f"receive_data() in state {self._state.value}: handshake is over")
        if self._eof:
            raise RuntimeError("receive_data() after EOF")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """Drain the bytes queued for the client (method selection, auth status, replies)."""
        out = bytes(self._outbound)
        self._outbound.clear()
        return out

    def next_event(self) -> Socks5Event:
        """Parse what has arrived; may queue method-selection and authentication replies.

        Returns:
            `NeedData`, or the `ConnectRequest` / `UdpAssociateRequest` (exactly once).

        Raises:
            Socks5Error: the client broke the protocol or closed early; when ``reply_code`` is
                set, the matching failure reply is already queued in `data_to_send`.
            RuntimeError: called again after the request or after an error (a driver bug).
        """
        if self._state not in (_State.GREETING, _State.AUTH, _State.REQUEST):
            raise RuntimeError(f"next_event() in state {self._state.value}: handshake is over")
        try:
            while self._state is _State.GREETING or self._state is _State.AUTH:
                if self._state is _State.GREETING:
                    self._read_greeting()
                else:
                    self._read_auth()
            return self._read_request()
        except _Incomplete:
            if self._eof:
                raise self._fail(
                    f"client closed the connection during the {self._state.value}"
                ) from None
            return NeedData()

    def send_reply(self, code: ReplyCode, bind_host: str = "0.0.0.0", bind_port: int = 0) -> None:
        """Queue the reply to the request (once); see `build_reply` for the arguments."""
        if self._state is not _State.REQUEST_RECEIVED:
            raise RuntimeError(f"send_reply() in state {self._state.value}: no request to answer")
        self._outbound += build_reply(code, bind_host, bind_port)
        self._state = _State.REPLIED

    def _fail(self, message: str, reply_code: ReplyCode | None = None) -> Socks5Error:
        self._state = _State.FAILED
        if reply_code is not None:
            self._outbound += build_reply(reply_code)
        return Socks5Error(message, reply_code=reply_code)

    def _require(self, n: int) -> None:
        """Raise unless the current message's first ``n`` bytes are buffered and within limits."""
        if self._handshake_bytes + n > self._max_buffer:
            raise self._fail(f"SOCKS5 handshake longer than {self._max_buffer} bytes")
        if len(self._buffer) < n:
            raise _Incomplete

    def _consume(self, n: int) -> None:
        del self._buffer[:n]
        self._handshake_bytes += n

    def _check_version(self) -> None:
        self._require(1)
        version = self._buffer[0]
        if version == 4:
            raise self._fail("SOCKS4 is not supported; use SOCKS5")
        if version != _VERSION:
            raise self._fail(f"not SOCKS5: version byte 0x{version:02x} in the {self._state.value}")

    def _read_greeting(self) -> None:
        self._check_version()
        self._require(2)
        end = 2 + self._buffer[1]
        self._require(end)
        offered = set(self._buffer[2:end])
        self._consume(end)
        wanted = _Method.NO_AUTH if self._token is None else _Method.USERNAME_PASSWORD
        if wanted not in offered:
            self._outbound += bytes([_VERSION, _Method.NO_ACCEPTABLE])
            listed = ", ".join(f"0x{m:02x}" for m in sorted(offered)) or "none"
            raise self._fail(
                f"client offers no acceptable authentication method "
                f"(offered: {listed}; this proxy requires 0x{wanted:02x})"
            )
        self._outbound += bytes([_VERSION, wanted])
        self._state = _State.REQUEST if self._token is None else _State.AUTH

    def _read_auth(self) -> None:
        assert self._token is not None  # only reached when a token is configured
        self._require(1)
        if (version := self._buffer[0]) != _AUTH_VERSION:
            raise self._fail(f"username/password sub-negotiation version 0x{version:02x}, not 0x01")
        self._require(2)
        password_at = 3 + self._buffer[1]
        self._require(password_at)
        end = password_at + self._buffer[password_at - 1]
        self._require(end)
        password = bytes(self._buffer[password_at:end])
        self._consume(end)
        if not hmac.compare_digest(password, self._token):
            self._outbound += bytes([_AUTH_VERSION, 1])
            raise self._fail("SOCKS5 username/password authentication failed")
        self._outbound += bytes([_AUTH_VERSION, 0])
        self._state = _State.REQUEST

    def _read_request(self) -> ConnectRequest | UdpAssociateRequest:
        self._check_version()
        self._require(2)
        command = self._buffer[1]
        if command == Command.BIND:
            raise self._fail("BIND is not supported", ReplyCode.COMMAND_NOT_SUPPORTED)
        if command == Command.UDP_ASSOCIATE and not self._udp_enabled:
            raise self._fail(
                "UDP ASSOCIATE is disabled (enable_socks5_udp = false)",
                ReplyCode.COMMAND_NOT_SUPPORTED,
            )
        if command not in (Command.CONNECT, Command.UDP_ASSOCIATE):
            raise self._fail(f"unknown command 0x{command:02x}", ReplyCode.COMMAND_NOT_SUPPORTED)
        try:  # byte 2 is RSV: tolerated when non-zero (module docstring)
            atyp, host, port, end = _read_address(self._buffer, 3, self._require)
        except _AddressError as exc:
            raise self._fail(str(exc), exc.reply_code) from None
        self._consume(end)
        self._leftover = bytes(self._buffer)
        self._buffer.clear()
        self._state = _State.REQUEST_RECEIVED
        kind = ConnectRequest if command == Command.CONNECT else UdpAssociateRequest
        self._request = kind(host=host, port=port, address_type=atyp)
        return self._request
