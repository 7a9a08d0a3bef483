"""Tests for `netproxy_core.proto.socks5` (SPEC §6): conversation tables fed whole, a byte at a
time and with trailing bytes; replies; UDP framing; fuzzing; interop with socksio's client."""

from __future__ import annotations

import ipaddress
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from socksio import socks5 as socksio5

from netproxy_core.errors import ClientProtocolError
from netproxy_core.proto.socks5 import (
    AddressType,
    ConnectRequest,
    NeedData,
    ReplyCode,
    Socks5Error,
    Socks5Server,
    UdpAssociateRequest,
    UdpDatagram,
    build_reply,
    build_udp_datagram,
    parse_udp_datagram,
)

TOKEN = "s3cret-token-value"

# -- byte builders (client side) ------------------------------------------------------------

NO_AUTH = b"\x05\x01\x00"
USER_PASS = b"\x05\x01\x02"
CHOSE_NO_AUTH = b"\x05\x00"
CHOSE_USER_PASS = b"\x05\x02"
NO_ACCEPTABLE = b"\x05\xff"
AUTH_OK = b"\x01\x00"
AUTH_FAILED = b"\x01\x01"


def auth(user: bytes, password: bytes) -> bytes:
    return b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password


def ipv4(host: str, port: int) -> bytes:
    return b"\x01" + ipaddress.IPv4Address(host).packed + port.to_bytes(2, "big")


def ipv6(host: str, port: int) -> bytes:
    return b"\x04" + ipaddress.IPv6Address(host).packed + port.to_bytes(2, "big")


def domain(name: bytes, port: int) -> bytes:
    return b"\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")


def request(command: int, address: bytes, rsv: int = 0) -> bytes:
    return bytes([5, command, rsv]) + address


def reply(code: int) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


# -- the conversation helper (STYLE habit 7) ------------------------------------------------

Request = ConnectRequest | UdpAssociateRequest


@dataclass(frozen=True)
class Outcome:
    """Everything a driver can observe at the end of a conversation."""

    event: Request | None  # None: still NeedData, or failed
    sent: bytes  # every byte the machine queued for the client
    error: tuple[str, ReplyCode | None] | None
    leftover: bytes


def drain(sm: Socks5Server, chunks: Sequence[bytes], *, eof: bool = False) -> Outcome:
    """Drive ``sm`` like the real driver: feed, next_event, data_to_send, until an event."""
    sent = b""
    event: Request | None = None
    try:
        for chunk in [*chunks, b""] if eof else chunks:
            sm.receive_data(chunk)
            step = sm.next_event()
            sent += sm.data_to_send()
            if not isinstance(step, NeedData):
                event = step
                break
    except Socks5Error as exc:
        sent += sm.data_to_send()
        return Outcome(None, sent, (str(exc), exc.reply_code), sm.leftover)
    return Outcome(event, sent, None, sm.leftover)


def converse(make: Callable[[], Socks5Server], data: bytes, *, eof: bool = False) -> Outcome:
    """Run ``data`` whole, byte by byte and with trailing bytes; insist on one outcome."""
    whole = drain(make(), [data], eof=eof)
    trickle = drain(make(), [data[i : i + 1] for i in range(len(data))], eof=eof)
    assert trickle == whole, f"result depends on segmentation: {whole} vs {trickle}"
    if not eof and (whole.event is not None or whole.error is not None):
        tail = b"\x16\x03\x01tail"  # looks like the start of a ClientHello
        expected = replace(whole, leftover=tail) if whole.event is not None else whole
        with_tail = drain(make(), [data + tail])
        assert with_tail == expected, f"trailing bytes changed the result: {with_tail}"
        trickle_tail = [data[i : i + 1] for i in range(len(data) - 1)] + [data[-1:] + tail]
        assert drain(make(), trickle_tail) == expected, "trailing bytes lost when trickled"
    return whole


def test_converse_catches_lost_trailing_bytes() -> None:
    """The helper itself fails when a machine drops the bytes after the request."""

    class Lossy(Socks5Server):
        __slots__ = ()

        @property
        def leftover(self) -> bytes:
            return b""

    with pytest.raises(AssertionError, match="trailing bytes"):
        converse(Lossy, NO_AUTH + request(1, ipv4("10.0.0.1", 80)))


# -- the conversation table ------------------------------------------------------------------

OK = "ok"  # marker: no error expected

CASES = [
    pytest.param(
        {},
        NO_AUTH + request(1, ipv4("93.184.216.34", 443)),
        False,
        ConnectRequest("93.184.216.34", 443, AddressType.IPV4),
        CHOSE_NO_AUTH,
        OK,
        None,
        id="connect-ipv4",
    ),
    pytest.param(
        {},
        NO_AUTH + request(1, domain(b"example.com", 443)),
        False,
        ConnectRequest("example.com", 443, AddressType.DOMAIN),
        CHOSE_NO_AUTH,
        OK,
        None,
        id="connect-domain",
    ),
    pytest.param(
        {},
        NO_AUTH + request(1, ipv6("2001:0db8:0000::0001", 8080)),
        False,
        ConnectRequest("2001:db8::1", 8080, AddressType.IPV6),
        CHOSE_NO_AUTH,
        OK,
        None,
        id="connect-ipv6-compressed",
    ),
    pytest.param(
        {},
        NO_AUTH + request(1, domain("bücher.de".encode(), 80)),
        False,
        ConnectRequest("bücher.de", 80, AddressType.DOMAIN),
        CHOSE_NO_AUTH,
        OK,
        None,
        id="connect-utf8-domain-verbatim",
    ),
    pytest.param(
        {},
        NO_AUTH + request(1, domain(b"a" * 255, 1)),
        False,
        ConnectRequest("a" * 255, 1, AddressType.DOMAIN),
        CHOSE_NO_AUTH,
        OK,
        None,
        id="connect-domain-255-bytes",
    ),
    pytest.param(
        {},
        b"\x05\x03\x02\x80\x00" + request(1, ipv4("10.1.2.3", 22)),
        False,
        ConnectRequest("10.1.2.3", 22, AddressType.IPV4),
        CHOSE_NO_AUTH,
        OK,
        None,
        id="no-auth-chosen-among-several",
    ),
    pytest.param(
        {},
        NO_AUTH + request(1, ipv4("10.1.2.3", 22), rsv=0x7F),
        False,
        ConnectRequest("10.1.2.3", 22, AddressType.IPV4),
        CHOSE_NO_AUTH,
        OK,
        None,
        id="nonzero-rsv-tolerated",
    ),
    pytest.param(
        {},
        NO_AUTH + request(3, ipv4("0.0.0.0", 0)),
        False,
        UdpAssociateRequest("0.0.0.0", 0, AddressType.IPV4),
        CHOSE_NO_AUTH,
        OK,
        None,
        id="udp-associate",
    ),
    pytest.param(
        {"udp_enabled": False},
        NO_AUTH + request(3, ipv4("0.0.0.0", 0)),
        False,
        None,
        CHOSE_NO_AUTH + reply(7),
        "UDP ASSOCIATE is disabled",
        ReplyCode.COMMAND_NOT_SUPPORTED,
        id="udp-disabled-0x07",
    ),
    pytest.param(
        {},
        NO_AUTH + request(2, ipv4("0.0.0.0", 0)),
        False,
        None,
        CHOSE_NO_AUTH + reply(7),
        "BIND is not supported",
        ReplyCode.COMMAND_NOT_SUPPORTED,
        id="bind-0x07",
    ),
    pytest.param(
        {},
        NO_AUTH + request(9, ipv4("0.0.0.0", 0)),
        False,
        None,
        CHOSE_NO_AUTH + reply(7),
        "unknown command 0x09",
        ReplyCode.COMMAND_NOT_SUPPORTED,
        id="unknown-command-0x07",
    ),
    pytest.param(
        {},
        NO_AUTH + b"\x05\x01\x00\x02\x00\x00",
        False,
        None,
        CHOSE_NO_AUTH + reply(8),
        "unsupported address type 0x02",
        ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED,
        id="bad-address-type-0x08",
    ),
    pytest.param(
        {},
        NO_AUTH + b"\x05\x01\x00\x03\x00\x01\xbb",
        False,
        None,
        CHOSE_NO_AUTH + reply(1),
        "empty domain name",
        ReplyCode.GENERAL_FAILURE,
        id="empty-domain-0x01",
    ),
    pytest.param(
        {},
        NO_AUTH + request(1, domain(b"\xff\xfe.example", 443)),
        False,
        None,
        CHOSE_NO_AUTH + reply(1),
        "not UTF-8",
        ReplyCode.GENERAL_FAILURE,
        id="non-utf8-domain-0x01",
    ),
    pytest.param(
        {},
        b"\x04\x01\x00\x50\x01\x02\x03\x04\x00",
        False,
        None,
        b"",
        "SOCKS4 is not supported",
        None,
        id="socks4-closed",
    ),
    pytest.param(
        {},
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        False,
        None,
        b"",
        "not SOCKS5: version byte 0x47 in the greeting",
        None,
        id="http-garbage-closed",
    ),
    pytest.param(
        {},
        NO_AUTH + b"\x04\x01",
        False,
        None,
        CHOSE_NO_AUTH,
        "SOCKS4 is not supported",
        None,
        id="wrong-request-version-closed",
    ),
    pytest.param(
        {},
        b"\x05\x00",
        False,
        None,
        NO_ACCEPTABLE,
        "offered: none",
        None,
        id="zero-methods-0xff",
    ),
    pytest.param(
        {},
        USER_PASS,
        False,
        None,
        NO_ACCEPTABLE,
        "requires 0x00",
        None,
        id="only-user-pass-offered-without-token-0xff",
    ),
    pytest.param(
        {"auth_token": TOKEN},
        USER_PASS + auth(b"anyone", TOKEN.encode()) + request(1, domain(b"example.com", 443)),
        False,
        ConnectRequest("example.com", 443, AddressType.DOMAIN),
        CHOSE_USER_PASS + AUTH_OK,
        OK,
        None,
        id="auth-success",
    ),
    pytest.param(
        {"auth_token": TOKEN},
        USER_PASS + auth(b"", TOKEN.encode()) + request(1, ipv4("10.0.0.1", 80)),
        False,
        ConnectRequest("10.0.0.1", 80, AddressType.IPV4),
        CHOSE_USER_PASS + AUTH_OK,
        OK,
        None,
        id="auth-empty-user-accepted",
    ),
    pytest.param(
        {"auth_token": TOKEN},
        USER_PASS + auth(b"anyone", b"wrong-password") + request(1, ipv4("10.0.0.1", 80)),
        False,
        None,
        CHOSE_USER_PASS + AUTH_FAILED,
        "authentication failed",
        None,
        id="auth-wrong-password",
    ),
    pytest.param(
        {"auth_token": TOKEN},
        USER_PASS + auth(b"anyone", TOKEN.encode()[:-1]),
        False,
        None,
        CHOSE_USER_PASS + AUTH_FAILED,
        "authentication failed",
        None,
        id="auth-password-prefix",
    ),
    pytest.param(
        {"auth_token": TOKEN},
        NO_AUTH,
        False,
        None,
        NO_ACCEPTABLE,
        "requires 0x02",
        None,
        id="auth-required-but-not-offered-0xff",
    ),
    pytest.param(
        {"auth_token": TOKEN},
        USER_PASS + b"\x05\x01\x00",
        False,
        None,
        CHOSE_USER_PASS,
        "sub-negotiation version 0x05",
        None,
        id="auth-bad-subnegotiation-version",
    ),
    pytest.param(
        {},
        b"",
        True,
        None,
        b"",
        "client closed the connection during the greeting",
        None,
        id="eof-before-anything",
    ),
    pytest.param(
        {},
        b"\x05\x02\x00",
        True,
        None,
        b"",
        "client closed the connection during the greeting",
        None,
        id="eof-in-greeting",
    ),
    pytest.param(
        {"auth_token": TOKEN},
        USER_PASS + b"\x01\x04us",
        True,
        None,
        CHOSE_USER_PASS,
        "during the authentication",
        None,
        id="eof-in-auth",
    ),
    pytest.param(
        {},
        NO_AUTH + request(1, domain(b"example.com", 443))[:-1],
        True,
        None,
        CHOSE_NO_AUTH,
        "during the request",
        None,
        id="eof-in-request",
    ),
    pytest.param(
        {},
        NO_AUTH + request(1, domain(b"example.com", 443))[:-1],
        False,
        None,
        CHOSE_NO_AUTH,
        OK,
        None,
        id="incomplete-request-needs-data",
    ),
    pytest.param(
        {"max_buffer": 19},
        NO_AUTH + request(1, domain(b"short.test", 443)),
        False,
        None,
        CHOSE_NO_AUTH,
        "longer than 19 bytes",
        None,
        id="handshake-one-over-max-buffer",
    ),
    pytest.param(
        {"max_buffer": 20},
        NO_AUTH + request(1, domain(b"short.test", 443)),
        False,
        ConnectRequest("short.test", 443, AddressType.DOMAIN),
        CHOSE_NO_AUTH,
        OK,
        None,
        id="handshake-exactly-max-buffer",
    ),
    pytest.param(
        {"max_buffer": 4},
        b"\x05\xff" + bytes(range(255)),
        False,
        None,
        b"",
        "longer than 4 bytes",
        None,
        id="greeting-over-max-buffer",
    ),
]


@pytest.mark.parametrize(("kwargs", "data", "eof", "event", "sent", "error", "reply_code"), CASES)
def test_conversation(
    kwargs: dict[str, Any],
    data: bytes,
    eof: bool,
    event: Request | None,
    sent: bytes,
    error: str,
    reply_code: ReplyCode | None,
) -> None:
    outcome = converse(lambda: Socks5Server(**kwargs), data, eof=eof)
    assert outcome.sent == sent
    assert outcome.event == event
    if error == OK:
        assert outcome.error is None
    else:
        assert outcome.error is not None, f"expected an error containing {error!r}"
        message, code = outcome.error
        assert error in message
        assert code is reply_code
        assert sent.endswith(reply(code)) if code is not None else True


def test_pipelined_greeting_and_request_then_reply() -> None:
    sm = Socks5Server()
    sm.receive_data(NO_AUTH + request(1, domain(b"example.com", 443)) + b"early")
    assert sm.next_event() == ConnectRequest("example.com", 443, AddressType.DOMAIN)
    assert sm.request == ConnectRequest("example.com", 443, AddressType.DOMAIN)
    assert sm.leftover == b"early"
    sm.send_reply(ReplyCode.SUCCEEDED, "192.0.2.7", 40000)
    assert sm.data_to_send() == CHOSE_NO_AUTH + b"\x05\x00\x00\x01\xc0\x00\x02\x07\x9c\x40"
    assert sm.data_to_send() == b""


@pytest.mark.parametrize("code", list(ReplyCode), ids=lambda c: c.name.lower())
def test_send_reply_every_code(code: ReplyCode) -> None:
    sm = Socks5Server()
    drain(sm, [NO_AUTH + request(1, ipv4("10.0.0.1", 80))])
    sm.send_reply(code)
    assert sm.data_to_send() == reply(code)


REPLIES = [
    pytest.param("0.0.0.0", 0, b"\x01\x00\x00\x00\x00\x00\x00", id="ipv4-default"),
    pytest.param("10.0.0.2", 1080, b"\x01\x0a\x00\x00\x02\x04\x38", id="ipv4"),
    pytest.param("::1", 443, b"\x04" + b"\x00" * 15 + b"\x01\x01\xbb", id="ipv6"),
    pytest.param("relay.test", 53, b"\x03\x0arelay.test\x00\x35", id="domain"),
]


@pytest.mark.parametrize(("host", "port", "encoded"), REPLIES)
def test_build_reply_address_encoding(host: str, port: int, encoded: bytes) -> None:
    assert build_reply(ReplyCode.HOST_UNREACHABLE, host, port) == b"\x05\x04\x00" + encoded


@pytest.mark.parametrize(
    ("host", "port"),
    [
        pytest.param("10.0.0.1", -1, id="negative-port"),
        pytest.param("10.0.0.1", 65536, id="port-too-big"),
        pytest.param("", 1, id="empty-name"),
        pytest.param("a" * 256, 1, id="name-too-long"),
    ],
)
def test_build_rejects_unencodable_addresses(host: str, port: int) -> None:
    with pytest.raises(ValueError):
        build_reply(ReplyCode.SUCCEEDED, host, port)
    with pytest.raises(ValueError):
        build_udp_datagram(host, port, b"")


def test_driver_misuse_raises_runtime_error() -> None:
    sm = Socks5Server()
    with pytest.raises(RuntimeError, match="no request to answer"):
        sm.send_reply(ReplyCode.SUCCEEDED)
    drain(sm, [NO_AUTH + request(1, ipv4("10.0.0.1", 80))])
    with pytest.raises(RuntimeError, match="handshake is over"):
        sm.next_event()
    with pytest.raises(RuntimeError, match="handshake is over"):
        sm.receive_data(b"more")
    sm.send_reply(ReplyCode.SUCCEEDED)
    with pytest.raises(RuntimeError, match="no request to answer"):
        sm.send_reply(ReplyCode.SUCCEEDED)


def test_use_after_error_raises_runtime_error() -> None:
    sm = Socks5Server()
    sm.receive_data(b"\x00")
    with pytest.raises(Socks5Error):
        sm.next_event()
    with pytest.raises(RuntimeError, match="state failed"):
        sm.next_event()


def test_receive_after_eof_raises_runtime_error() -> None:
    sm = Socks5Server()
    sm.receive_data(b"")
    with pytest.raises(RuntimeError, match="after EOF"):
        sm.receive_data(b"\x05")


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"auth_token": ""}, id="empty-token"),
        pytest.param({"max_buffer": 0}, id="zero-max-buffer"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Socks5Server(**kwargs)


def test_repr_shows_state_and_hides_token() -> None:
    sm = Socks5Server(auth_token=TOKEN)
    assert repr(sm) == (
        "<Socks5Server state=GREETING auth=username/password udp=on buffered=0 outbound=0>"
    )
    drain(sm, [USER_PASS + auth(b"me", TOKEN.encode()) + request(1, ipv4("10.0.0.1", 80)) + b"x"])
    text = repr(sm)
    assert "state=REQUEST_RECEIVED" in text
    assert "request=ConnectRequest('10.0.0.1', 80)" in text
    assert "leftover=1" in text
    assert TOKEN not in text


def test_failed_auth_leaks_neither_token_nor_password() -> None:
    sm = Socks5Server(auth_token=TOKEN, udp_enabled=False)
    half = auth(b"me", b"guessed-password")
    sm.receive_data(USER_PASS + half[:8])  # a partial password sits in the buffer
    assert isinstance(sm.next_event(), NeedData)
    assert "guessed" not in repr(sm) and TOKEN not in repr(sm)
    sm.receive_data(half[8:])
    with pytest.raises(Socks5Error) as info:
        sm.next_event()
    for text in (str(info.value), repr(info.value), repr(sm)):
        assert TOKEN not in text and "guessed-password" not in text


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(Socks5Error("bad address", reply_code=ReplyCode.GENERAL_FAILURE), id="code"),
        pytest.param(Socks5Error("client closed"), id="no-code"),
    ],
)
def test_socks5_error_pickles(error: Socks5Error) -> None:
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is Socks5Error
    assert isinstance(clone, ClientProtocolError)
    assert clone.args == error.args == (str(error),)
    assert clone.reply_code is error.reply_code


# -- interop with a real client implementation (socksio, sans-IO) ---------------------------


@pytest.mark.parametrize(
    ("address", "host", "atyp"),
    [
        pytest.param(("192.0.2.1", 443), "192.0.2.1", AddressType.IPV4, id="ipv4"),
        pytest.param(("2001:db8::2", 443), "2001:db8::2", AddressType.IPV6, id="ipv6"),
        pytest.param(("example.com", 443), "example.com", AddressType.DOMAIN, id="domain"),
    ],
)
def test_interop_with_socksio_client(
    address: tuple[str, int], host: str, atyp: AddressType
) -> None:
    client = socksio5.SOCKS5Connection()
    sm = Socks5Server(auth_token=TOKEN)

    def exchange() -> tuple[object, object]:
        sm.receive_data(client.data_to_send())
        event = sm.next_event()
        return event, client.receive_data(sm.data_to_send())

    client.send(socksio5.SOCKS5AuthMethodsRequest([socksio5.SOCKS5AuthMethod.USERNAME_PASSWORD]))
    event, answer = exchange()
    assert isinstance(event, NeedData)
    assert isinstance(answer, socksio5.SOCKS5AuthReply)
    assert answer.method == socksio5.SOCKS5AuthMethod.USERNAME_PASSWORD
    client.send(socksio5.SOCKS5UsernamePasswordRequest(b"user", TOKEN.encode()))
    event, answer = exchange()
    assert isinstance(event, NeedData)
    assert isinstance(answer, socksio5.SOCKS5UsernamePasswordReply) and answer.success
    client.send(socksio5.SOCKS5CommandRequest.from_address(socksio5.SOCKS5Command.CONNECT, address))
    sm.receive_data(client.data_to_send())
    assert sm.next_event() == ConnectRequest(host, 443, atyp)
    sm.send_reply(ReplyCode.CONNECTION_REFUSED, "2001:db8::9", 1234)
    answer = client.receive_data(sm.data_to_send())
    assert isinstance(answer, socksio5.SOCKS5Reply)
    assert answer.reply_code == socksio5.SOCKS5ReplyCode.CONNECTION_REFUSED
    assert (answer.addr, answer.port) == ("2001:db8::9", 1234)


# -- fuzzing (STYLE habit 8) -----------------------------------------------------------------


def run_to_end(sm: Socks5Server, data: bytes) -> None:
    """Feed ``data`` then EOF; only `Socks5Error` may escape."""
    try:
        sm.receive_data(data)
        if isinstance(sm.next_event(), NeedData):
            sm.receive_data(b"")
            sm.next_event()
    except Socks5Error as exc:
        sm.data_to_send()
        if exc.reply_code is not None:
            assert isinstance(exc.reply_code, ReplyCode)


@given(st.binary(max_size=1024))
def test_fuzz_no_auth(data: bytes) -> None:
    run_to_end(Socks5Server(), data)
    run_to_end(Socks5Server(), NO_AUTH + data)


@given(st.binary(max_size=1024))
def test_fuzz_with_auth(data: bytes) -> None:
    run_to_end(Socks5Server(auth_token=TOKEN, udp_enabled=False), data)
    run_to_end(Socks5Server(auth_token=TOKEN), USER_PASS + auth(b"u", TOKEN.encode()) + data)


@given(st.binary(max_size=1024))
def test_fuzz_udp_datagram(data: bytes) -> None:
    try:
        parsed = parse_udp_datagram(data)
    except Socks5Error as exc:
        assert exc.reply_code is None
    else:
        assert parsed.payload == data[len(data) - len(parsed.payload) :]


# -- UDP framing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "atyp"),
    [
        pytest.param("198.51.100.4", AddressType.IPV4, id="ipv4"),
        pytest.param("2001:db8::53", AddressType.IPV6, id="ipv6"),
        pytest.param("dns.example", AddressType.DOMAIN, id="domain"),
    ],
)
def test_udp_round_trip(host: str, atyp: AddressType) -> None:
    wire = build_udp_datagram(host, 53, b"\x12\x34query")
    assert wire[:3] == b"\x00\x00\x00"
    assert parse_udp_datagram(wire) == UdpDatagram(0, host, 53, atyp, b"\x12\x34query")


@given(st.ip_addresses(), st.integers(0, 65535), st.binary(max_size=64))
def test_udp_round_trip_any_ip(ip: Any, port: int, payload: bytes) -> None:
    parsed = parse_udp_datagram(build_udp_datagram(str(ip), port, payload))
    assert ipaddress.ip_address(parsed.host) == ip
    assert (parsed.port, parsed.payload, parsed.frag) == (port, payload, 0)


def test_udp_fragment_and_rsv_are_reported_not_rejected() -> None:
    parsed = parse_udp_datagram(b"\xab\xcd\x02" + ipv4("10.0.0.1", 9) + b"x")
    assert parsed == UdpDatagram(2, "10.0.0.1", 9, AddressType.IPV4, b"x")


def test_udp_empty_payload() -> None:
    assert parse_udp_datagram(b"\x00\x00\x00" + ipv6("::", 0)).payload == b""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "truncated UDP datagram: 0 bytes", id="empty"),
        pytest.param(b"\x00\x00\x00", "truncated", id="no-address-type"),
        pytest.param(b"\x00\x00\x00\x01\x0a\x00", "truncated", id="short-ipv4"),
        pytest.param(b"\x00\x00\x00" + ipv4("10.0.0.1", 53)[:-1], "truncated", id="short-port"),
        pytest.param(b"\x00\x00\x00\x04" + b"\x00" * 10, "truncated", id="short-ipv6"),
        pytest.param(b"\x00\x00\x00\x03\x05abc", "truncated", id="short-domain"),
        pytest.param(b"\x00\x00\x00\x05\x00\x00", "unsupported address type 0x05", id="bad-atyp"),
        pytest.param(b"\x00\x00\x00\x03\x00\x00\x35", "empty domain name", id="empty-domain"),
        pytest.param(b"\x00\x00\x00" + domain(b"\xc3", 53), "not UTF-8", id="non-utf8-domain"),
    ],
)
def test_malformed_udp_datagram(data: bytes, message: str) -> None:
    with pytest.raises(Socks5Error, match=message) as info:
        parse_udp_datagram(data)
    assert info.value.reply_code is None
