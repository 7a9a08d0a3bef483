"""CONNECT set-up on the cheap path, end to end (SPEC §5.6, §15, §16): each accepted connection
runs in a task the proxy starts from the accept callback, the origin is dialled straight into
the relay. Bytes sent with and right after the CONNECT head reach the origin in order, many
set-ups in a row each get their audited decision, and a shutdown still cuts a tunnel that
outlasts `shutdown_grace`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress

import pytest

from netproxy_core import BackgroundProxy
from netproxy_core.config.model import Limits

StartProxy = Callable[..., AbstractContextManager[BackgroundProxy]]
HOST = "echo.example.test"


@contextmanager
def echo_origin(greeting: bytes = b"") -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 (one thread per connection) that first sends `greeting`
    (a server-first protocol, as SSH is); yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                conn.sendall(greeting)
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_exactly(sock: socket.socket, n: int, got: bytes = b"") -> bytes:
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, got
        got += chunk
    return got


def open_tunnel(p: BackgroundProxy, port: int, early: bytes = b"") -> tuple[socket.socket, bytes]:
    addr = p.http_addr
    assert addr is not None
    sock = socket.create_connection(addr, timeout=10)
    target = f"{HOST}:{port}"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + early)
    head, rest = read_head(sock)
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 Connection established", head
    return sock, rest


@pytest.fixture
def origin_port() -> Iterator[int]:
    with echo_origin() as port:
        yield port


def test_bytes_with_and_after_the_head_arrive_in_order(
    start_proxy: StartProxy, origin_port: int
) -> None:
    with start_proxy(
        allow=[HOST], routes={f"{HOST}:{origin_port}": f"127.0.0.1:{origin_port}"}
    ) as p:
        sock, rest = open_tunnel(p, origin_port, early=b"first-")
        with sock:
            sock.sendall(b"second")
            assert read_exactly(sock, 12, rest) == b"first-second"
            sock.shutdown(socket.SHUT_WR)  # half-close travels on; the echo then closes
            assert sock.recv(10) == b""
        assert [e.reason for e in p.events()] == ["allow"]


def test_many_set_ups_in_a_row_each_audited(start_proxy: StartProxy, origin_port: int) -> None:
    with start_proxy(
        allow=[HOST], routes={f"{HOST}:{origin_port}": f"127.0.0.1:{origin_port}"}
    ) as p:
        for i in range(40):
            sock, rest = open_tunnel(p, origin_port)
            with sock:
                sock.sendall(b"%d" % i)
                assert read_exactly(sock, len(b"%d" % i), rest) == b"%d" % i
        events = p.events()
        assert len(events) == 40
        assert {(e.host, e.port, e.reason) for e in events} == {(HOST, origin_port, "allow")}


def test_shutdown_cuts_a_tunnel_outlasting_the_grace(
    start_proxy: StartProxy, origin_port: int
) -> None:
    limits = Limits(shutdown_grace=0.3)
    routes = {f"{HOST}:{origin_port}": f"127.0.0.1:{origin_port}"}
    with start_proxy(allow=[HOST], routes=routes, limits=limits) as p:
        sock, rest = open_tunnel(p, origin_port)
        with sock:
            sock.sendall(b"ping")
            assert read_exactly(sock, 4, rest) == b"ping"
            started = time.monotonic()
            p.close()  # the tunnel stays busy-open: cut once the grace is over
            took = time.monotonic() - started
            assert 0.25 <= took < 5, took
            sock.settimeout(5)
            with suppress(ConnectionResetError):  # closed, at once or by a reset
                assert sock.recv(10) == b""


def test_the_200_comes_once_and_before_a_server_first_greeting(start_proxy: StartProxy) -> None:
    """The fast path writes the `200` from the origin's connect callback: a greeting the
    origin sends at once must still follow it, and nothing is answered twice."""
    greeting = b"SSH-2.0-test\r\n"
    with echo_origin(greeting) as port:
        routes = {f"{HOST}:{port}": f"127.0.0.1:{port}"}
        with start_proxy(allow=[HOST], routes=routes) as p:
            for _ in range(5):
                sock, rest = open_tunnel(p, port, early=b"hello")
                with sock:
                    expected = greeting + b"hello"
                    assert read_exactly(sock, len(expected), rest) == expected
                    assert b"HTTP/1.1" not in rest
                    sock.shutdown(socket.SHUT_WR)
                    assert sock.recv(10) == b""
            assert [e.reason for e in p.events()] == ["allow"] * 5


def test_a_client_gone_before_the_dial_completes_leaves_the_proxy_serving(
    start_proxy: StartProxy, origin_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    routes = {f"{HOST}:{origin_port}": f"127.0.0.1:{origin_port}"}
    with start_proxy(allow=[HOST], routes=routes) as p:
        addr = p.http_addr
        assert addr is not None
        target = f"{HOST}:{origin_port}"
        for _ in range(20):  # CONNECT, then a reset at once: the 200 has nowhere to go
            sock = socket.create_connection(addr, timeout=10)
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.close()
        sock, rest = open_tunnel(p, origin_port, early=b"still here")
        with sock:
            assert read_exactly(sock, 10, rest) == b"still here"
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
