"""Hostile input on the HTTP listener (SPEC §5.9, §15): every bad client gets a 4xx or a
closed socket, never a crash or a stuck slot, and the proxy serves a good request afterwards."""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers.origins import Origin
from netproxy_core import BackgroundProxy
from netproxy_core.config.model import Limits

API = "api.example.test"


@pytest.fixture
def proxy(
    start_proxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> Iterator[BackgroundProxy]:
    with (
        caplog.at_level(logging.WARNING, logger="netproxy"),
        start_proxy(
            allow=[API], routes={f"{API}:80": origin.addr}, limits=Limits(handshake_timeout=0.5)
        ) as p,
    ):
        yield p
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def addr_of(p: BackgroundProxy) -> tuple[str, int]:
    addr = p.http_addr
    assert addr is not None
    return addr


def exchange(
    p: BackgroundProxy, data: bytes, *, half_close: bool = True, timeout: float = 10
) -> bytes:
    """Send `data` (then EOF), read until the proxy closes."""
    with socket.create_connection(addr_of(p), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            if not chunk:
                break
            out += chunk
    return out


def status(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:100]
    return int(data[9:12])


def assert_serves(p: BackgroundProxy) -> None:
    data = exchange(
        p,
        f"GET http://{API}/ok HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n".encode(),
        half_close=False,
    )
    assert status(data) == 200, data[:200]


POST_HEAD = b"POST http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n"

MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
    b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n",
    b" GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x00\x01\x02\x03\r\n\r\n",
    b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nBad Header\r\n\r\n",
    b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nX: a\x00b\r\n\r\n",
    b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n folded\r\n\r\n",
    POST_HEAD + b"Content-Length: -1\r\n\r\n",
    POST_HEAD + b"Content-Length: abc\r\n\r\n",
    POST_HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    POST_HEAD + b"Transfer-Encoding: gzip\r\n\r\n",
    POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"GET http://api.example.test/\xff HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    b"GET ftp://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    b"GET http://user@api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    b"GET http:///nohost HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    b"GET http://api.example.test:0/ HTTP/1.1\r\nHost: api.example.test:0\r\n\r\n",
    b"GET http://api.example.test:65536/ HTTP/1.1\r\nHost: api.example.test:65536\r\n\r\n",
    b"GET http://[::1/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    b"CONNECT HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    b"\x16\x03\x01\x00\x05hello",  # TLS on the plain HTTP port
    b"\x05\x01\x00",  # SOCKS5 greeting on the HTTP port
]


@pytest.mark.parametrize("data", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_request_gets_4xx_or_close(
    proxy: BackgroundProxy, origin: Origin, data: bytes
) -> None:
    out = exchange(proxy, data)
    if out:
        assert 400 <= status(out) < 600 and status(out) != 500, out[:200]
    assert_serves(proxy)
    # Bodies are streamed, so a head whose body turns out malformed later may reach the
    # origin; a malformed head never does.
    assert all(r.path == "/ok" or r.method == "POST" for r in origin.requests)


def test_oversize_request_line_is_414(proxy: BackgroundProxy) -> None:
    out = exchange(proxy, b"GET http://api.example.test/" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert status(out) == 414
    assert_serves(proxy)


def test_oversize_headers_are_431(proxy: BackgroundProxy) -> None:
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))
    out = exchange(
        proxy,
        b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n" + headers + b"\r\n",
    )
    assert status(out) == 431
    assert_serves(proxy)


def test_configured_header_limit(start_proxy, origin: Origin) -> None:
    with start_proxy(
        allow=[API], routes={f"{API}:80": origin.addr}, limits=Limits(max_header_bytes=2048)
    ) as p:
        small = (
            b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nX-A: "
            + b"a" * 1000
        )
        assert status(exchange(p, small + b"\r\nConnection: close\r\n\r\n")) == 200
        big = small + b"a" * 2000 + b"\r\n\r\n"
        assert status(exchange(p, big)) == 431
        assert status(exchange(p, b"GET /" + b"a" * 4000 + b" HTTP/1.1\r\n\r\n")) == 414


def test_oversize_response_head_from_origin_is_502(start_proxy) -> None:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"b" * 100_000 + b"\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with start_proxy(
            allow=[API], routes={f"{API}:80": f"127.0.0.1:{server.getsockname()[1]}"}
        ) as p:
            out = exchange(
                p, b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n"
            )
            assert status(out) == 502
    finally:
        thread.join(5)
        server.close()


def test_slowloris_is_cut_off_at_handshake_timeout(proxy: BackgroundProxy) -> None:
    """Bytes trickled forever do not keep the head read alive past handshake_timeout (0.5 s)."""
    with socket.create_connection(addr_of(proxy), timeout=10) as sock:
        stop = threading.Event()

        def trickle() -> None:
            sock.sendall(b"GET http://api.example.test/ HTTP/1.1\r\n")
            while not stop.wait(0.05):
                try:
                    sock.sendall(b"X")
                except OSError:
                    return

        thread = threading.Thread(target=trickle, daemon=True)
        started = time.monotonic()
        thread.start()
        try:
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        finally:
            stop.set()
            thread.join(5)
        elapsed = time.monotonic() - started
    assert elapsed < 8, f"slowloris held the connection for {elapsed:.1f}s"
    if data:
        assert status(data) == 408
    assert_serves(proxy)


def test_silent_client_is_closed_after_handshake_timeout(proxy: BackgroundProxy) -> None:
    with socket.create_connection(addr_of(proxy), timeout=10) as sock:
        assert sock.recv(1) == b""  # closed by the proxy, no response for zero bytes
    assert_serves(proxy)


def test_idle_keep_alive_uses_idle_timeout(start_proxy, origin: Origin) -> None:
    with (
        start_proxy(
            allow=[API],
            routes={f"{API}:80": origin.addr},
            limits=Limits(handshake_timeout=5, idle_timeout=0.3),
        ) as p,
        socket.create_connection(addr_of(p), timeout=10) as sock,
    ):
        sock.sendall(b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
        data = b""
        while b"}" not in data:
            data += sock.recv(65536)
        assert status(data) == 200
        started = time.monotonic()
        assert sock.recv(1) == b""  # idle keep-alive closed after idle_timeout
        assert time.monotonic() - started < 4


@pytest.mark.parametrize(
    "partial",
    [
        b"",
        b"GET http://api.exa",
        b"POST http://api.example.test/ HTTP/1.1\r\n"
        b"Host: api.example.test\r\nContent-Length: 100\r\n\r\nshort",
    ],
)
def test_half_open_clients(proxy: BackgroundProxy, partial: bytes) -> None:
    """A client that sends part of a request and half-closes gets a 400 or a close, quickly."""
    out = exchange(proxy, partial)
    if out:
        assert 400 <= status(out) < 600
    assert_serves(proxy)


def test_request_then_half_close_is_still_answered(proxy: BackgroundProxy) -> None:
    out = exchange(
        proxy, b"GET http://api.example.test/half HTTP/1.1\r\nHost: api.example.test\r\n\r\n"
    )
    assert status(out) == 200


def test_client_reset_mid_download(proxy: BackgroundProxy) -> None:
    for _ in range(5):
        sock = socket.create_connection(addr_of(proxy), timeout=10)
        sock.sendall(
            b"GET http://api.example.test/bytes/50000000 HTTP/1.1\r\nHost: api.example.test\r\n\r\n"
        )
        assert sock.recv(65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
    assert_serves(proxy)


def test_client_reset_mid_upload(proxy: BackgroundProxy) -> None:
    sock = socket.create_connection(addr_of(proxy), timeout=10)
    sock.sendall(POST_HEAD + b"Content-Length: 100000000\r\n\r\n" + b"u" * 100_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert_serves(proxy)


def test_many_idle_connections_do_not_block_others(proxy: BackgroundProxy) -> None:
    socks = [socket.create_connection(addr_of(proxy), timeout=10) for _ in range(100)]
    try:
        socks[0].sendall(b"GET http://api.exa")  # one half-written head among them
        assert_serves(proxy)
    finally:
        for s in socks:
            s.close()


def _fuzz_cases(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    base = [
        b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
        POST_HEAD + b"Content-Length: 3\r\n\r\nabc",
        b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: api.example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
    ]
    alphabet = b"\r\n :/\x00\xff%@[]HTTP1.GETCONNECT0123456789abc\t"
    cases = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            cases.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
        elif kind == 1:
            data = bytearray(rng.choice(base))
            for _ in range(rng.randrange(1, 6)):
                pos = rng.randrange(len(data))
                op = rng.randrange(3)
                if op == 0:
                    data[pos] = rng.randrange(256)
                elif op == 1:
                    data[pos:pos] = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 8)))
                else:
                    del data[pos : pos + rng.randrange(1, 8)]
            cases.append(bytes(data))
        else:
            cases.append(bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 300))))
    return cases


def test_500_seeded_random_inputs(proxy: BackgroundProxy) -> None:
    failures: list[Any] = []
    for i, data in enumerate(_fuzz_cases(20240501, 500)):
        out = exchange(proxy, data, timeout=10)
        if (out and not out.startswith(b"HTTP/1.1 ")) or (out and status(out) == 500):
            failures.append((i, data[:60], out[:60]))
        assert_serves(proxy)
    assert not failures, failures[:5]
