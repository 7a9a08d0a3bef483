"""Tests for `netproxy_core.proto.tls_peek` (SPEC §7.3): real ClientHellos, trickle, fuzz."""

from __future__ import annotations

import contextlib
import ssl
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netproxy_core.proto.tls_peek import (
    MAX_CLIENT_HELLO_BYTES,
    MAX_PEEK_BYTES,
    ClientHello,
    FirstBytes,
    classify_first_bytes,
    parse_client_hello,
)


def real_client_hello(
    server_hostname: str | None = None,
    alpn: list[str] | None = None,
    *,
    tls12_only: bool = False,
) -> bytes:
    """The bytes Python's own TLS client sends first (over memory BIOs, no sockets)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def handshake_message(data: bytes) -> bytes:
    """The handshake message (type + length + body) carried by the records in `data`."""
    out, pos = b"", 0
    while pos < len(data):
        (length,) = struct.unpack("!H", data[pos + 3 : pos + 5])
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return out


def as_records(message: bytes, size: int, version: bytes = b"\x03\x01") -> bytes:
    """Frame a handshake message into records carrying at most `size` bytes each."""
    chunks = [message[i : i + size] for i in range(0, len(message), size)]
    return b"".join(b"\x16" + version + struct.pack("!H", len(c)) + c for c in chunks)


def ext(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


def sni_ext(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(struct.pack("!BH", t, len(n)) + n for t, n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def alpn_ext(*protocols: bytes) -> bytes:
    entries = b"".join(bytes([len(p)]) + p for p in protocols)
    return ext(16, struct.pack("!H", len(entries)) + entries)


def hello_body(extensions: bytes | None, *, version: bytes = b"\x03\x03") -> bytes:
    body = version + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    return body


def hello_message(body: bytes, *, handshake_type: int = 1) -> bytes:
    return bytes([handshake_type]) + len(body).to_bytes(3, "big") + body


def synthetic(extensions: bytes | None, **kw: int) -> bytes:
    return as_records(hello_message(hello_body(extensions), **kw), 2**14)


def parse_all_ways(data: bytes) -> ClientHello:
    """Whole, every proper prefix (must ask for more), and with trailing bytes."""
    whole = parse_client_hello(data)
    assert whole is not None
    for i in range(len(data)):
        assert parse_client_hello(data[:i]) is None, f"decided after {i} of {len(data)} bytes"
    assert parse_client_hello(data + b"\x17\x03\x03\x00\x01x tail") == whole, "trailing bytes"
    return whole


# --- classify_first_bytes -------------------------------------------------------------------

CLASSIFY = [
    pytest.param(b"", FirstBytes.NEED_MORE, id="empty"),
    pytest.param(b"\x16", FirstBytes.NEED_MORE, id="one-byte"),
    pytest.param(b"\x16\x03", FirstBytes.NEED_MORE, id="two-bytes"),
    pytest.param(b"\x16\x03\x00", FirstBytes.TLS, id="ssl3-record"),
    pytest.param(b"\x16\x03\x01", FirstBytes.TLS, id="tls10-record"),
    pytest.param(b"\x16\x03\x03\x02\x00", FirstBytes.TLS, id="tls12-record"),
    pytest.param(b"\x16\x03\x04", FirstBytes.TLS, id="tls13-record"),
    pytest.param(b"\x16\x03\x05", FirstBytes.OTHER, id="minor-too-high"),
    pytest.param(b"\x16\x02", FirstBytes.OTHER, id="major-not-3"),
    pytest.param(b"\x17\x03\x03", FirstBytes.OTHER, id="application-data-record"),
    pytest.param(b"SSH-2.0-OpenSSH\r\n", FirstBytes.OTHER, id="ssh"),
    pytest.param(b"G", FirstBytes.OTHER, id="http-first-byte"),
    pytest.param(b"\x05\x01\x00", FirstBytes.OTHER, id="socks5-greeting"),
]


@pytest.mark.parametrize(("data", "expected"), CLASSIFY)
def test_classify_first_bytes(data: bytes, expected: FirstBytes) -> None:
    assert classify_first_bytes(data) is expected


def test_classify_real_client_hello_every_prefix() -> None:
    data = real_client_hello("example.com")
    assert classify_first_bytes(data) is FirstBytes.TLS
    assert [classify_first_bytes(data[:i]) for i in range(3)] == [FirstBytes.NEED_MORE] * 3


# --- parse_client_hello on real ClientHellos ---------------------------------------------------

REAL = [
    pytest.param("example.com", None, False, ClientHello("example.com", ()), id="sni"),
    pytest.param(
        "api.example.test",
        ["h2", "http/1.1"],
        False,
        ClientHello("api.example.test", ("h2", "http/1.1")),
        id="sni-alpn",
    ),
    pytest.param(None, ["http/1.1"], False, ClientHello(None, ("http/1.1",)), id="no-sni-alpn"),
    pytest.param(None, None, False, ClientHello(None, ()), id="no-sni"),
    pytest.param("127.0.0.1", None, False, ClientHello(None, ()), id="ip-literal-sends-no-sni"),
    pytest.param("Example.COM", None, False, ClientHello("Example.COM", ()), id="sni-as-sent"),
    pytest.param("example.com", ["h2"], True, ClientHello("example.com", ("h2",)), id="tls12"),
]


@pytest.mark.parametrize(("server_hostname", "alpn", "tls12", "expected"), REAL)
def test_real_client_hello_whole_and_trickled(
    server_hostname: str | None, alpn: list[str] | None, tls12: bool, expected: ClientHello
) -> None:
    assert parse_all_ways(real_client_hello(server_hostname, alpn, tls12_only=tls12)) == expected


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 50, 511], ids=lambda s: f"records-of-{s}")
def test_client_hello_spread_over_records(size: int) -> None:
    data = real_client_hello("split.example.com", ["http/1.1"])
    split = as_records(handshake_message(data), size)
    assert parse_all_ways(split) == ClientHello("split.example.com", ("http/1.1",))


def test_hello_without_extensions() -> None:
    assert parse_all_ways(synthetic(None)) == ClientHello(None, ())


def test_unknown_server_name_type_is_skipped() -> None:
    data = synthetic(sni_ext((7, b"opaque"), (0, b"host.example")))
    assert parse_all_ways(data) == ClientHello("host.example", ())


def test_non_ascii_alpn_is_escaped() -> None:
    data = synthetic(alpn_ext(b"h2", b"\xff\x01"))
    assert parse_all_ways(data).alpn == ("h2", "\\xff\x01")


def test_largest_allowed_client_hello() -> None:
    body = hello_body(ext(0xFFFE, b""))
    padding = ext(21, b"\x00" * (MAX_CLIENT_HELLO_BYTES - len(body) - 4))
    message = hello_message(hello_body(ext(0xFFFE, b"") + padding))
    assert len(message) == MAX_CLIENT_HELLO_BYTES + 4
    assert parse_client_hello(as_records(message, 2**14)) == ClientHello(None, ())


# --- refusals ---------------------------------------------------------------------------------

GARBAGE = [
    pytest.param(b"GET / HTTP/1.1\r\n", id="http"),
    pytest.param(b"\x16\x02\x00", id="bad-record-version"),
    pytest.param(b"\x16\x03\x01\x00\x00", id="empty-record"),
    pytest.param(b"\x16\x03\x01\x40\x01", id="record-over-2^14"),
    pytest.param(as_records(hello_message(b"\x03\x03", handshake_type=2), 100), id="server-hello"),
    pytest.param(as_records(hello_message(hello_body(None))[:3], 3) + b"\x17", id="2nd-not-hs"),
    pytest.param(synthetic(sni_ext((0, b"a.example")) + sni_ext((0, b"b.example"))), id="dup-sni"),
    pytest.param(synthetic(sni_ext((0, b"a.example"), (0, b"b.example"))), id="two-names"),
    pytest.param(synthetic(sni_ext((0, b""))), id="empty-sni"),
    pytest.param(synthetic(sni_ext((0, "bücher.example".encode()))), id="non-ascii-sni"),
    pytest.param(synthetic(alpn_ext(b"")), id="empty-alpn-name"),
    pytest.param(synthetic(ext(16, b"\x00\x00")), id="empty-alpn-list"),
    pytest.param(synthetic(ext(0, b"\x00\x05\x00\x00")), id="truncated-sni"),
    pytest.param(
        as_records(hello_message(hello_body(None, version=b"\x02\x00")), 100), id="bad-version"
    ),
    pytest.param(as_records(hello_message(b"\x03\x03" + b"\x00" * 10), 100), id="short-body"),
    pytest.param(as_records(hello_message(hello_body(b"") + b"junk"), 100), id="trailing-junk"),
    pytest.param(b"\x16\x03\x01\x00\x04\x01\x01\x00\x01", id="over-64k"),
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_client_hello(data)


def test_tiny_records_cannot_grow_the_peek_buffer_without_bound() -> None:
    message = hello_message(hello_body(ext(21, b"\x00" * 60_000)))
    data = as_records(message, 1)[:MAX_PEEK_BYTES]
    assert parse_client_hello(data[: MAX_PEEK_BYTES - 1]) is None
    with pytest.raises(ValueError, match="no complete ClientHello"):
        parse_client_hello(data)


# --- fuzz: only ValueError may escape --------------------------------------------------------

SEED = real_client_hello("fuzz.example.com", ["h2", "http/1.1"])


@given(st.binary(max_size=2048))
def test_parse_survives_any_bytes(data: bytes) -> None:
    try:
        result = parse_client_hello(data)
    except ValueError:
        return
    assert result is None or isinstance(result, ClientHello)
    assert classify_first_bytes(data) in (FirstBytes.TLS, FirstBytes.NEED_MORE)


@given(st.binary(max_size=64))
def test_parse_survives_any_bytes_after_a_tls_header(tail: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_client_hello(b"\x16\x03\x01" + tail)


@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), max_size=8))
def test_parse_survives_mutated_real_hello(mutations: list[tuple[int, int]]) -> None:
    data = bytearray(SEED)
    for index, value in mutations:
        data[index] = value
    try:
        result = parse_client_hello(bytes(data))
    except ValueError:
        return
    assert result is None or isinstance(result, ClientHello)
