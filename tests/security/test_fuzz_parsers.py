"""Fuzzing the sans-IO parsers (hypothesis) and the live listeners (seeded random bytes).

Not repeated here: the canonicaliser and pattern properties (tests/core/test_hosts.py,
test_patterns.py), ClientHello parsing on arbitrary bytes (tests/core/test_tls_peek.py) and the
SOCKS5 machine on single-shot random bytes (tests/core/proto/test_socks5_machine.py).
"""

from __future__ import annotations

import logging
import random
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers.origins import Origin
from netproxy_core import BackgroundProxy
from netproxy_core.config.model import Limits
from netproxy_core.hosts import canonicalize_host
from netproxy_core.policy.model import Reason
from netproxy_core.proto.http_head import (
    Connect,
    Forward,
    Reject,
    check_proxy_auth,
    classify,
    oversize_request,
    strip_hop_by_hop,
)
from netproxy_core.proto.socks5 import (
    ConnectRequest,
    NeedData,
    Socks5Error,
    Socks5Server,
    UdpAssociateRequest,
)
from netproxy_core.proto.tls_peek import FirstBytes, classify_first_bytes

API = "api.example.test"

# --- proto/http_head.classify --------------------------------------------------------------------

HOST_ALPHABET = "abcAZ09.-_:[]@%/\\?#;,* \t\x00\u3002\uff0e\u0430"
hosts = st.one_of(
    st.text(HOST_ALPHABET, max_size=40),
    st.sampled_from(
        [API, "127.1", "0x7f000001", "[::1]", "[fe80::1%25eth0]", "a@b", "[x]", "::1", ""]
    ),
    st.ip_addresses().map(lambda ip: f"[{ip}]" if ip.version == 6 else str(ip)),
)
ports = st.one_of(st.none(), st.integers(-1, 70000).map(str), st.text("0123456789x:", max_size=7))


@st.composite
def authorities(draw: st.DrawFn) -> str:
    host, port = draw(hosts), draw(ports)
    return host if port is None else f"{host}:{port}"


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["absolute", "origin", "authority", "raw"]))
    if kind == "absolute":
        scheme = draw(st.sampled_from(["http", "https", "ws", "wss", "HTTP", "ftp", ""]))
        path = draw(st.text("/?#%.a", max_size=10))
        text = f"{scheme}://{draw(authorities())}{path}"
    elif kind == "origin":
        text = "/" + draw(st.text("/?#%.a", max_size=10))
    elif kind == "authority":
        text = draw(authorities())
    else:
        return draw(st.binary(max_size=60))
    return text.encode("utf-8")


header_names = st.sampled_from(
    [b"host", b"connection", b"upgrade", b"proxy-authorization", b"x-a", b"keep-alive", b"te"]
)
headers = st.lists(
    st.tuples(header_names, st.one_of(authorities().map(str.encode), st.binary(max_size=30))),
    max_size=5,
)
methods = st.sampled_from([b"GET", b"CONNECT", b"POST", b"get", b"connect", b"X"])


@given(methods, targets(), headers)
def test_classify_only_returns_forward_connect_or_reject(
    method: bytes, target: bytes, head: list[tuple[bytes, bytes]]
) -> None:
    result = classify(method, target, head)
    assert isinstance(result, (Forward, Connect, Reject))
    if isinstance(result, (Forward, Connect)):
        assert canonicalize_host(result.host) == result.host  # canonical, and stays so
        assert result.port in range(1, 65536)
    if isinstance(result, Connect):
        assert method == b"CONNECT"
    if isinstance(result, Forward):
        assert result.path.startswith((b"/", b"*"))
        assert result.tls == (result.scheme in ("https", "wss"))
    if isinstance(result, Reject):
        assert 400 <= result.status < 500
        assert result.reason in (None, Reason.INVALID_HOST, Reason.HOST_MISMATCH)


@given(st.sampled_from(["http", "https"]), authorities(), authorities())
def test_absolute_form_forwards_only_when_host_header_names_the_target(
    scheme: str, target_authority: str, host_header: str
) -> None:
    target = f"{scheme}://{target_authority}/".encode()
    result = classify(b"GET", target, [(b"host", host_header.encode())])
    if isinstance(result, Forward):
        alone = classify(b"GET", target, [])
        via_host = classify(b"GET", f"{scheme}://{host_header}/".encode(), [])
        assert isinstance(alone, Forward) and isinstance(via_host, Forward)
        assert (alone.host, alone.port) == (via_host.host, via_host.port)


@given(authorities())
def test_userinfo_never_yields_a_destination(authority: str) -> None:
    """Whatever precedes an ``@`` in the authority, the result is a refusal or the host a URL
    parser sees (the authority ends at the first ``/?#``) — never the name after the ``@``."""
    for target in (f"http://{authority}@{API}/", f"http://{API}@{authority}/"):
        result = classify(b"GET", target.encode(), [])
        if isinstance(result, Forward):
            assert b"@" not in result.authority
        else:
            assert isinstance(result, Reject)
            assert result.reason in (Reason.INVALID_HOST, None)  # None: bytes h11 never passes


@given(headers)
def test_strip_hop_by_hop_leaves_no_hop_header(head: list[tuple[bytes, bytes]]) -> None:
    listed = {t.strip().lower() for n, v in head if n == b"connection" for t in v.split(b",")}
    out = strip_hop_by_hop(head)
    hop = {b"connection", b"keep-alive", b"proxy-authorization", b"te", b"upgrade"} | listed
    assert not [n for n, _ in out if n in hop]
    assert all(pair in head for pair in out)


@given(headers, st.text(min_size=1, max_size=10))
def test_proxy_auth_never_raises(head: list[tuple[bytes, bytes]], token: str) -> None:
    assert check_proxy_auth(head, token) in (True, False)


@given(methods, targets(), headers, st.integers(1, 200))
def test_oversize_request_is_414_431_or_none(
    method: bytes, target: bytes, head: list[tuple[bytes, bytes]], limit: int
) -> None:
    assert oversize_request(method, target, head, limit) in (None, 414, 431)


# --- proto/tls_peek.classify_first_bytes ---------------------------------------------------------


@given(st.binary(max_size=16))
def test_classify_first_bytes_total(data: bytes) -> None:
    kind = classify_first_bytes(data)
    assert isinstance(kind, FirstBytes)
    if len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03 and data[2] <= 0x04:
        assert kind is FirstBytes.TLS
    if data and data[0] != 0x16:
        assert kind is not FirstBytes.TLS


@given(st.binary(min_size=3, max_size=16))
def test_classify_first_bytes_depends_on_the_first_three_bytes_only(data: bytes) -> None:
    assert classify_first_bytes(data) is classify_first_bytes(data[:3])


# --- proto/socks5: chunking never changes the outcome --------------------------------------------


def _drive(chunks: list[bytes]) -> tuple[str, object]:
    server = Socks5Server()
    try:
        for i, chunk in enumerate(chunks):
            server.receive_data(chunk)
            event = server.next_event()
            if not isinstance(event, NeedData):
                assert isinstance(event, (ConnectRequest, UdpAssociateRequest))
                # bytes after the request are the tunnel's: left over now or read later
                tunnel = server.leftover + b"".join(chunks[i + 1 :])
                return "request", (type(event).__name__, event.host, event.port, tunnel)
        server.receive_data(b"")
        event = server.next_event()
    except Socks5Error as exc:
        return "error", exc.reply_code
    return "event", type(event).__name__


@st.composite
def socks_streams(draw: st.DrawFn) -> bytes:
    greeting = b"\x05" + draw(st.sampled_from([b"\x01\x00", b"\x02\x02\x00", b"\x01\x02", b"\x00"]))
    atyp = draw(st.sampled_from([1, 3, 4, 9]))
    if atyp == 3:
        name = draw(st.binary(max_size=20))
        addr = bytes([len(name)]) + name
    else:
        size = 4 if atyp == 1 else 16
        addr = draw(st.binary(min_size=size - 1, max_size=size))
    cmd = draw(st.sampled_from([1, 2, 3, 7]))
    request = bytes([5, cmd, 0, atyp]) + addr + struct.pack("!H", draw(st.integers(0, 65535)))
    tail = draw(st.binary(max_size=8))
    data = greeting + request + tail
    if draw(st.booleans()):  # flip a byte
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1 :]
    return data


@given(socks_streams(), st.lists(st.integers(1, 40), max_size=10))
def test_socks5_outcome_is_independent_of_chunking(data: bytes, cuts: list[int]) -> None:
    chunks, rest = [], data
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    chunks = [c for c in chunks if c]
    assert _drive(chunks) == _drive([data] if data else [])


# --- live listeners: seeded random bytes ---------------------------------------------------------


@pytest.fixture
def live(
    start_proxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> Iterator[BackgroundProxy]:
    with (
        caplog.at_level(logging.WARNING, logger="netproxy"),
        start_proxy(
            allow=[API], routes={f"{API}:80": origin.addr}, limits=Limits(handshake_timeout=0.5)
        ) as p,
    ):
        yield p
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]


def _blast(addr: tuple[str, int], data: bytes) -> bytes:
    """Send `data`, half-close, read until the proxy closes (bounded)."""
    with socket.create_connection(addr, timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def _socks_cases(rng: random.Random, n: int) -> list[bytes]:
    seeds = [
        b"\x05\x01\x00\x05\x01\x00\x03\x10api.example.test\x00\x50GET / HTTP/1.1\r\n\r\n",
        b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        b"\x05\x01\x00\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",
        b"\x05\x02\x00\x02\x01\x04user\x04pass\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x00\x50",
        b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00",
    ]
    cases = []
    for i in range(n):
        if i % 3 == 0:
            cases.append(rng.randbytes(rng.randrange(1, 300)))
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 5)):
                pos = rng.randrange(len(data))
                if rng.random() < 0.5:
                    data[pos] = rng.randrange(256)
                else:
                    del data[pos : pos + rng.randrange(1, 4)]
            cases.append(bytes(data))
    return cases


def _http_cases(rng: random.Random, n: int) -> list[bytes]:
    """Byte soups that look like other protocols arriving at the HTTP port."""
    seeds = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello to the HTTP port
        b"\x05\x01\x00",  # SOCKS to the HTTP port
        b"SSH-2.0-OpenSSH_9.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"CONNECT [::1%25x]:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n"
        b"Content-Length: -1\r\n\r\n",
    ]
    cases = []
    for _ in range(n):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(0, 4)):
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = rng.randbytes(rng.randrange(1, 6))
        cases.append(bytes(data))
    return cases


def _good_http(p: BackgroundProxy) -> None:
    assert p.http_addr is not None
    out = _blast(p.http_addr, f"GET http://{API}/ok HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 200"), out[:100]


def _good_socks(p: BackgroundProxy) -> None:
    assert p.socks_addr is not None
    with socket.create_connection(p.socks_addr, timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x03\x10" + API.encode() + b"\x00\x50")
        assert sock.recv(4)[:2] == b"\x05\x00"


def test_seeded_random_bytes_against_live_listeners(live: BackgroundProxy) -> None:
    rng = random.Random(0x5EC0)
    socks_cases, http_cases = _socks_cases(rng, 300), _http_cases(rng, 200)
    assert live.socks_addr is not None and live.http_addr is not None
    for i, data in enumerate(socks_cases):
        out = _blast(live.socks_addr, data)
        assert not out or out.startswith(b"\x05"), (i, data, out[:80])
        if i % 50 == 0:
            _good_socks(live)
    for i, data in enumerate(http_cases):
        out = _blast(live.http_addr, data)
        if out:
            assert out.startswith(b"HTTP/1.1 "), (i, data, out[:80])
            assert not out.startswith(b"HTTP/1.1 500"), (i, data, out[:80])
        if i % 50 == 0:
            _good_http(live)
    _good_socks(live)
    _good_http(live)
    print(f"\nlive fuzz: {len(socks_cases)} SOCKS + {len(http_cases)} HTTP payloads survived")
