"""The plain-HTTP fast path keeps the HTTP proxy contract, byte for byte (SPEC §4.6, §5, §10).

Raw-socket clients talk to a live proxy; raw-socket origins (threads on 127.0.0.1:0, reached
under a public-looking name through `routes`) script every answer and record every byte and
connection. Where a case can go either way, the same request is also sent down the h11 path
(a `Proxy-Authorization` header, which is hop-by-hop and unchecked without a token, makes
the fast path hand the connection over before deciding), and both must give the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from netproxy_core import BackgroundProxy, NetworkDecision, NetworkPolicyRequest
from netproxy_core.config.model import Limits

API = "api.example.test"
BLOCKED = "blocked.example.test"
H11_PATH = b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"  # sends a request down the h11 path
TIMEOUT = 10.0


# --- raw origins ------------------------------------------------------------------------------


class OriginConn:
    """One accepted origin connection: reads requests (Content-Length bodies), sends bytes."""

    def __init__(self, sock: socket.socket, release: threading.Event) -> None:
        self.sock = sock
        self.release = release
        self.buf = bytearray()
        self.requests: list[bytes] = []

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except OSError:
            return False
        self.buf += data
        return bool(data)

    def request(self) -> bytes | None:
        """The next whole request as received (head and body); None at EOF."""
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if not self._fill():
                return None
        end += 4
        length = 0
        for line in bytes(self.buf[:end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value.strip())
        while len(self.buf) < end + length:
            if not self._fill():
                return None
        raw = bytes(self.buf[: end + length])
        del self.buf[: end + length]
        self.requests.append(raw)
        return raw

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hang(self) -> None:
        """Say nothing until the test ends."""
        self.release.wait(TIMEOUT * 3)


Script = Callable[[OriginConn], None]


class RawOrigin:
    """A scripted TCP origin: each accepted connection runs `script` in its own thread."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[OriginConn] = []
        self.errors: list[BaseException] = []
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.settimeout(TIMEOUT * 3)
            conn = OriginConn(sock, self.release)
            self.connections.append(conn)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, conn: OriginConn) -> None:
        try:
            self.script(conn)
        except OSError:
            pass
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            conn.sock.close()

    @property
    def requests(self) -> list[bytes]:
        return [r for c in self.connections for r in c.requests]

    def close(self) -> None:
        self.release.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (Linux)
        self.listener.close()
        self.acceptor.join(TIMEOUT)
        for thread in self.threads:
            thread.join(TIMEOUT)
        assert not self.errors, self.errors


def serve_each(respond: Callable[[bytes], bytes | None]) -> Script:
    """Answer every request with `respond(request)`; None closes the connection instead."""

    def script(conn: OriginConn) -> None:
        while (request := conn.request()) is not None:
            answer = respond(request)
            if answer is None:
                return
            conn.send(answer)

    return script


def path_of(request: bytes) -> bytes:
    return request.split(b" ", 2)[1]


def ok(body: bytes, extra: bytes = b"", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


def echo_path(request: bytes) -> bytes:
    return ok(b"path=" + path_of(request))


# --- raw clients ------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    head: bytes  # the final head as received
    body: bytes  # decoded body
    wire: bytes  # every byte of this response as received, 1xx heads included
    interim: list[bytes] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        assert len(values) <= 1, (name, self.headers)
        return values[0] if values else None


class Client:
    """A raw socket to the proxy that reads responses itself (framing checked byte by byte)."""

    def __init__(self, proxy: BackgroundProxy, *, rcvbuf: int | None = None) -> None:
        addr = proxy.http_addr
        assert addr is not None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(addr)
        self.buf = bytearray()
        self.wire = bytearray()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, size: int = 65536) -> bool:
        try:
            data = self.sock.recv(size)
        except ConnectionResetError:
            data = b""
        self.buf += data
        return bool(data)

    def _take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.wire += out
        return out

    def _until(self, marker: bytes) -> bytes:
        while (at := self.buf.find(marker)) < 0:
            assert self._fill(), f"EOF before {marker!r}; have {bytes(self.buf)!r}"
        return self._take(at + len(marker))

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            assert self._fill(), f"EOF with {len(self.buf)} of {n} bytes"
        return self._take(n)

    def response(self, method: bytes = b"GET") -> Response:
        """Read one response: 1xx heads, then the final head and its body."""
        self.wire.clear()
        interim: list[bytes] = []
        while True:
            head = self._until(b"\r\n\r\n")
            line, *lines = head[:-4].split(b"\r\n")
            version, status, reason = [*line.split(b" ", 2), b""][:3]
            assert version == b"HTTP/1.1", line
            headers = [
                (n.strip().lower(), v.strip()) for n, _, v in (x.partition(b":") for x in lines)
            ]
            if 100 <= int(status) < 200:
                interim.append(head)
                continue
            break
        names = {n for n, _ in headers}
        length = [int(v) for n, v in headers if n == b"content-length"]
        if method == b"HEAD" or int(status) in (204, 304):
            body = b""
        elif (b"transfer-encoding", b"chunked") in headers:
            body = self._chunked()
        elif length:
            body = self._exact(length[0])
        else:
            assert b"transfer-encoding" not in names, headers
            body = self.rest()
        return Response(int(status), reason, headers, head, body, bytes(self.wire), interim)

    def _chunked(self) -> bytes:
        body = b""
        while True:
            size = int(self._until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                while self._until(b"\r\n") != b"\r\n":
                    pass
                return body
            body += self._exact(size)
            assert self._exact(2) == b"\r\n"

    def rest(self) -> bytes:
        """Everything until the proxy closes the connection."""
        while self._fill():
            pass
        return self._take(len(self.buf))

    def closed(self) -> bool:
        """The proxy closed the connection with nothing more to say."""
        return self.rest() == b""


# --- the proxy ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_proxy_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.WARNING, logger="netproxy"):
        yield
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


@pytest.fixture
def serve(start_proxy: Any) -> Callable[..., Any]:
    """`with serve(script, **config) as (proxy, origin):` — a proxy allowing API → origin."""

    @contextmanager
    def run(script: Script, **config: Any) -> Iterator[tuple[BackgroundProxy, RawOrigin]]:
        origin = RawOrigin(script)
        try:
            with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}, **config) as proxy:
                yield proxy, origin
        finally:
            origin.close()

    return run


def get(
    path: str = "/", *, host: bool = True, extra: bytes = b"", version: bytes = b"1.1"
) -> bytes:
    line = b"GET http://%s%s HTTP/%s\r\n" % (API.encode(), path.encode(), version)
    return line + (b"Host: %s\r\n" % API.encode() if host else b"") + extra + b"\r\n"


def events(proxy: BackgroundProxy) -> list[tuple[str, str, str]]:
    """(host, method, decision) of every audit event so far, in order."""
    out = []
    for event in proxy.events():
        data = event.to_dict()
        out.append(
            (
                data["server.address"],
                data["http.request.method"],
                data["network.policy.decision"],
            )
        )
    return out


def allowed(*methods: str) -> list[tuple[str, str, str]]:
    return [(API, m, "allow") for m in methods]


# --- what the origin receives -------------------------------------------------------------------

HOP_BY_HOP_REQUEST = (
    b"User-Agent: raw/1\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Connection: keep-alive, X-Hop\r\n"
    b"X-Hop: 1\r\n"
    b"TE: trailers\r\n"
    b"Accept:   */*  \r\n"
    b"X-Empty:\r\n"
)
FORWARDED = (
    b"GET /path?q=1 HTTP/1.1\r\n"
    b"host: api.example.test\r\n"
    b"user-agent: raw/1\r\n"
    b"accept: */*\r\n"
    b"x-empty: \r\n"
    b"\r\n"
)
HOST = b"Host: api.example.test\r\n"
LINE = b"GET http://api.example.test/path?q=1 HTTP/1.1\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(LINE + HOST + HOP_BY_HOP_REQUEST + b"\r\n", id="host-first"),
        pytest.param(LINE + HOP_BY_HOP_REQUEST + HOST + b"\r\n", id="host-last"),
        pytest.param(
            LINE.replace(b"1.1", b"1.0") + HOP_BY_HOP_REQUEST + b"\r\n", id="http10-no-host"
        ),
    ],
)
def test_origin_receives_what_the_h11_path_sends(serve: Any, request_bytes: bytes) -> None:
    """Lower-cased names, OWS trimmed, hop-by-hop fields gone, Host first (h11 writes it first)."""
    with serve(serve_each(echo_path)) as (proxy, origin):
        for via_h11 in (False, True):
            client = Client(proxy)
            sent = request_bytes
            if via_h11:
                sent = request_bytes.replace(b"\r\n", b"\r\n" + H11_PATH, 1)
            client.send(sent)
            assert client.response().body == b"path=/path?q=1"
            client.close()
        fast, slow = origin.requests
        assert slow == FORWARDED  # the h11 path
        assert fast == FORWARDED  # the fast path: the same bytes
        assert events(proxy) == allowed("GET", "GET")


# --- pipelining, split heads, keep-alive --------------------------------------------------------


def test_pipelined_requests_in_one_write_are_answered_in_order(serve: Any) -> None:
    with serve(serve_each(echo_path)) as (proxy, origin):
        client = Client(proxy)
        client.send(get("/1") + get("/2") + get("/3", extra=b"Connection: close\r\n"))
        bodies = [client.response().body for _ in range(3)]
        assert bodies == [b"path=/1", b"path=/2", b"path=/3"]
        assert client.closed()
        assert len(origin.connections) == 1
        assert [path_of(r) for r in origin.requests] == [b"/1", b"/2", b"/3"]
        assert events(proxy) == allowed("GET", "GET", "GET")


def test_pipelined_requests_across_a_refusal_and_a_fallback(serve: Any) -> None:
    """A refusal and a chunked answer hand over to h11 mid-stream; order and bytes hold."""

    def respond(request: bytes) -> bytes:
        if path_of(request) == b"/chunked":
            return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        return echo_path(request)

    with serve(serve_each(respond)) as (proxy, origin):
        client = Client(proxy)
        refused = b"GET http://%s/x HTTP/1.1\r\nHost: %s\r\n\r\n" % ((BLOCKED.encode(),) * 2)
        client.send(get("/1") + refused + get("/2") + get("/chunked") + get("/3"))
        first, denied, second, chunked, third = (client.response() for _ in range(5))
        assert (first.status, first.body) == (200, b"path=/1")
        assert denied.status == 403
        assert json.loads(denied.body)["host"] == BLOCKED
        assert (second.status, second.body) == (200, b"path=/2")
        assert (chunked.status, chunked.body) == (200, b"abc")
        assert (third.status, third.body) == (200, b"path=/3")
        assert [path_of(r) for r in origin.requests] == [b"/1", b"/2", b"/chunked", b"/3"]
        assert events(proxy) == [
            (API, "GET", "allow"),
            (BLOCKED, "GET", "deny"),
            *allowed("GET", "GET", "GET"),
        ]


@pytest.mark.parametrize(
    "split",
    [
        pytest.param(20, id="in-request-line"),
        pytest.param(len(get("/a")) - 2, id="before-blank-line"),
        pytest.param(len(get("/a")), id="between-requests"),
    ],
)
def test_a_head_split_over_two_writes(serve: Any, split: int) -> None:
    with serve(serve_each(echo_path)) as (proxy, origin):
        client = Client(proxy)
        data = get("/a") + get("/b")
        client.send(data[:split])
        client.send(data[split:])
        assert client.response().body == b"path=/a"
        assert client.response().body == b"path=/b"
        client.send(get("/c"))
        assert client.response().body == b"path=/c"
        assert [path_of(r) for r in origin.requests] == [b"/a", b"/b", b"/c"]
        assert events(proxy) == allowed("GET", "GET", "GET")


def test_keep_alive_reuses_one_origin_connection(serve: Any) -> None:
    with serve(serve_each(echo_path)) as (proxy, origin):
        client = Client(proxy)
        for n in range(3):
            client.send(get(f"/{n}"))
            response = client.response()
            assert (response.status, response.body) == (200, b"path=/%d" % n)
            assert response.header(b"connection") is None
        assert len(origin.connections) == 1
        assert len(origin.requests) == 3


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 2\r\n\r\nok", id="close"
        ),
        pytest.param(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", id="http10-origin"),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
            id="http10-origin-keep-alive",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA", id="bytes-after"),
    ],
)
def test_an_origin_connection_that_must_close_is_not_reused(serve: Any, answer: bytes) -> None:
    """The origin leaves its socket open: only the response says it must not be reused."""
    with serve(serve_each(lambda _: answer)) as (proxy, origin):
        client = Client(proxy)
        for _ in range(2):
            client.send(get("/"))
            response = client.response()
            assert (response.status, response.body) == (200, b"ok")
            assert response.header(b"connection") is None  # hop-by-hop: not relayed
        assert len(origin.connections) == 2
        assert [len(c.requests) for c in origin.connections] == [1, 1]
        assert events(proxy) == allowed("GET", "GET")


# --- response framings the fast path hands to h11 -------------------------------------------------


def test_chunked_response_then_another_request(serve: Any) -> None:
    def respond(request: bytes) -> bytes:
        if path_of(request) == b"/chunked":
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-a: 1\r\n\r\n"
                b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n"
            )
        return echo_path(request)

    with serve(serve_each(respond)) as (proxy, origin):
        client = Client(proxy)
        client.send(get("/chunked"))
        response = client.response()
        assert (response.status, response.body) == (200, b"hello, world")
        assert response.header(b"x-a") == b"1"
        client.send(get("/next"))
        assert client.response().body == b"path=/next"
        assert len(origin.connections) == 1
        assert events(proxy) == allowed("GET", "GET")


@pytest.mark.parametrize("extra", [b"", H11_PATH], ids=["fast-path-first", "h11-path"])
def test_close_delimited_response_then_another_request(serve: Any, extra: bytes) -> None:
    def script(conn: OriginConn) -> None:
        request = conn.request()
        assert request is not None
        if path_of(request) == b"/eof":
            conn.send(b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\nuntil the end")
            return  # closing ends the body
        conn.send(echo_path(request))

    with serve(script) as (proxy, origin):
        client = Client(proxy)
        client.send(get("/eof", extra=extra))
        response = client.response()
        assert (response.status, response.body) == (200, b"until the end")
        assert response.header(b"transfer-encoding") == b"chunked"  # re-framed for keep-alive
        client.send(get("/next", extra=extra))
        assert client.response().body == b"path=/next"
        assert len(origin.connections) == 2
        assert events(proxy) == allowed("GET", "GET")


def test_interim_responses_are_relayed_then_the_connection_is_reused(serve: Any) -> None:
    def respond(request: bytes) -> bytes:
        if request.startswith(b"POST"):
            return b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"posted")
        if path_of(request) == b"/hints":
            return b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + ok(
                b"hinted"
            )
        return echo_path(request)

    with serve(serve_each(respond)) as (proxy, origin):
        client = Client(proxy)
        client.send(get("/hints"))
        response = client.response()
        assert response.interim == [
            b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\n"
        ]
        assert (response.status, response.body) == (200, b"hinted")
        post = b"POST http://%s/p HTTP/1.1\r\nHost: %s\r\nContent-Length: 4\r\n\r\nbody" % (
            API.encode(),
            API.encode(),
        )
        client.send(post)
        response = client.response()
        assert response.interim == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        assert (response.status, response.body) == (200, b"posted")
        client.send(get("/after"))
        response = client.response()
        assert (response.interim, response.body) == ([], b"path=/after")
        assert origin.requests[1].endswith(b"\r\n\r\nbody")
        assert events(proxy) == allowed("GET", "POST", "GET")


# --- upstream failures (SPEC §5.9) --------------------------------------------------------------


def assert_upstream_error(client: Client, status: int, error: bytes) -> None:
    response = client.response()
    assert response.status == status, response.wire
    assert response.header(b"x-proxy-error") == error
    assert response.header(b"connection") == b"close"
    assert client.closed()


@pytest.mark.parametrize("complete", [True, False], ids=["complete-head", "endless-head"])
def test_a_response_head_over_the_limit_is_502(serve: Any, complete: bool) -> None:
    big = b"x-big: " + b"b" * 6000 + b"\r\n"

    def script(conn: OriginConn) -> None:
        assert conn.request() is not None
        if complete:
            conn.send(b"HTTP/1.1 200 OK\r\n" + big + b"content-length: 2\r\n\r\nok")
        else:
            conn.send(b"HTTP/1.1 200 OK\r\n" + big)
        conn.hang()

    with serve(script, limits=Limits(max_header_bytes=4096)) as (proxy, _):
        client = Client(proxy)
        client.send(get("/"))
        assert_upstream_error(client, 502, b"upstream-error")
        assert events(proxy) == allowed("GET")


@pytest.mark.parametrize("read_first", [True, False], ids=["after-request", "at-once"])
def test_an_origin_closing_before_answering_is_502(serve: Any, read_first: bool) -> None:
    def script(conn: OriginConn) -> None:
        if read_first:
            assert conn.request() is not None

    with serve(script) as (proxy, _):
        client = Client(proxy)
        client.send(get("/"))
        assert_upstream_error(client, 502, b"upstream-error")
        assert events(proxy) == allowed("GET")


def test_a_silent_origin_is_504(serve: Any) -> None:
    def script(conn: OriginConn) -> None:
        assert conn.request() is not None
        conn.hang()

    with serve(script, limits=Limits(idle_timeout=0.5)) as (proxy, _):
        client = Client(proxy)
        client.send(get("/"))
        assert_upstream_error(client, 504, b"upstream-timeout")
        assert events(proxy) == allowed("GET")


@pytest.mark.parametrize("sent", [0, 40], ids=["head-only", "part-of-body"])
def test_a_truncated_body_closes_the_client_connection(serve: Any, sent: int) -> None:
    def script(conn: OriginConn) -> None:
        assert conn.request() is not None
        conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"z" * sent)

    with serve(script) as (proxy, _):
        client = Client(proxy)
        client.send(get("/"))
        head_and_rest = client.rest()
        head, _, body = head_and_rest.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"content-length: 100" in head.split(b"\r\n")
        assert body == b"z" * sent  # fewer bytes than announced, then the close
        assert events(proxy) == allowed("GET")


# --- refusals, bodies, bodiless responses -------------------------------------------------------


def test_a_refused_request_then_an_allowed_one_on_one_connection(serve: Any) -> None:
    with serve(serve_each(echo_path)) as (proxy, origin):
        client = Client(proxy)
        refused = b"POST http://%s/upload HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\n\r\nhello"
        client.send(refused % (BLOCKED.encode(), BLOCKED.encode()))
        response = client.response()
        assert response.status == 403
        assert response.header(b"x-proxy-error") == b"blocked-by-allowlist"
        assert response.header(b"content-type") == b"application/json"
        assert response.header(b"connection") is None  # a 403 does not close (SPEC §5.1)
        body = json.loads(response.body)
        message = body.pop("message")
        assert BLOCKED in message
        assert body == {
            "status": "blocked",
            "host": BLOCKED,
            "reason": "not_allowed",
            "decision": "deny",
            "source": "baseline_policy",
            "protocol": "http",
            "port": 80,
        }
        client.send(get("/ok"))
        response = client.response()
        assert (response.status, response.body) == (200, b"path=/ok")
        assert [path_of(r) for r in origin.requests] == [b"/ok"]
        assert events(proxy) == [(BLOCKED, "POST", "deny"), (API, "GET", "allow")]


def test_a_small_post_body_is_forwarded_exactly(serve: Any) -> None:
    body = bytes(range(256)) * 4 + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"

    def respond(request: bytes) -> bytes:
        if request.startswith(b"POST"):
            return ok(hashlib.sha256(request.partition(b"\r\n\r\n")[2]).hexdigest().encode())
        return echo_path(request)

    with serve(serve_each(respond)) as (proxy, origin):
        client = Client(proxy)
        head = b"POST http://%s/upload HTTP/1.1\r\nHost: %s\r\nContent-Type: x/y\r\n" % (
            API.encode(),
            API.encode(),
        )
        client.send(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert client.response().body == hashlib.sha256(body).hexdigest().encode()
        client.send(get("/after"))
        assert client.response().body == b"path=/after"
        assert origin.requests[0] == (
            b"POST /upload HTTP/1.1\r\nhost: api.example.test\r\ncontent-type: x/y\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body
        )
        assert len(origin.connections) == 1
        assert events(proxy) == allowed("POST", "GET")


def test_bodiless_responses_leave_the_connection_reusable(serve: Any) -> None:
    """HEAD, 204 and 304 carry no body bytes whatever their Content-Length says."""

    def respond(request: bytes) -> bytes:
        path = path_of(request)
        if request.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
        if path == b"/204":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if path == b"/304":
            return b'HTTP/1.1 304 Not Modified\r\ncontent-length: 50\r\netag: "e"\r\n\r\n'
        return echo_path(request)

    with serve(serve_each(respond)) as (proxy, origin):
        client = Client(proxy)
        head = get("/h").replace(b"GET", b"HEAD", 1)
        client.send(head + get("/204") + get("/304") + get("/end"))
        first = client.response(b"HEAD")
        assert first.wire == b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
        second = client.response()
        assert second.wire == b"HTTP/1.1 204 No Content\r\n\r\n"
        third = client.response()
        assert third.wire == b'HTTP/1.1 304 Not Modified\r\ncontent-length: 50\r\netag: "e"\r\n\r\n'
        assert client.response().wire == echo_path(b"GET /end HTTP/1.1")
        assert len(origin.connections) == 1
        assert events(proxy) == allowed("HEAD", "GET", "GET", "GET")


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(get("/x", host=False, version=b"1.0"), id="http10"),
        pytest.param(
            get("/x", extra=b"Connection: keep-alive\r\n", version=b"1.0"), id="http10-ka"
        ),
        pytest.param(get("/x", extra=b"Connection: close\r\n"), id="http11-close"),
    ],
)
def test_a_client_that_cannot_keep_alive_gets_connection_close(
    serve: Any, request_bytes: bytes
) -> None:
    with serve(serve_each(echo_path)) as (proxy, _):
        client = Client(proxy)
        client.send(request_bytes)
        response = client.response()
        assert (response.status, response.body) == (200, b"path=/x")
        assert [v for n, v in response.headers if n == b"connection"] == [b"close"]
        assert client.closed()
        assert events(proxy) == allowed("GET")


def test_a_half_closed_client_still_gets_its_response(serve: Any) -> None:
    with serve(serve_each(echo_path)) as (proxy, _):
        client = Client(proxy)
        client.send(get("/a") + get("/b"))
        client.sock.shutdown(socket.SHUT_WR)
        assert client.response().body == b"path=/a"
        assert client.response().body == b"path=/b"
        assert client.closed()


# --- the same bytes whichever path served ---------------------------------------------------------

SAME_BYTES = [
    pytest.param(get("/"), b"GET", ok(b"hello", b"X-Up: 1\r\n"), id="get"),
    pytest.param(get("/", version=b"1.0", host=False), b"GET", ok(b"hello"), id="http10-client"),
    pytest.param(get("/", extra=b"Connection: close\r\n"), b"GET", ok(b"hello"), id="client-close"),
    pytest.param(
        get("/").replace(b"GET", b"HEAD", 1),
        b"HEAD",
        b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
        id="head-with-length",
    ),
    pytest.param(
        get("/").replace(b"GET", b"HEAD", 1),
        b"HEAD",
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\n",
        id="head-without-length",
    ),
    pytest.param(
        get("/"),
        b"GET",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n"
        b"Proxy-Authenticate: Basic\r\nX-End: 2\r\ncontent-length: 0\r\n\r\n",
        id="hop-by-hop-response",
    ),
]


@pytest.mark.parametrize(("request_bytes", "method", "answer"), SAME_BYTES)
def test_the_client_gets_the_same_bytes_from_both_paths(
    serve: Any, request_bytes: bytes, method: bytes, answer: bytes
) -> None:
    with serve(serve_each(lambda _: answer)) as (proxy, _):
        wires = []
        for via_h11 in (False, True):
            client = Client(proxy)
            sent = request_bytes
            if via_h11:
                sent = request_bytes.replace(b"\r\n", b"\r\n" + H11_PATH, 1)
            client.send(sent)
            wires.append(client.response(method).wire)
            client.close()
        fast, slow = wires
        assert fast == slow


# --- a large response, a slow reader --------------------------------------------------------------

LARGE = random.Random(5).randbytes(4 << 20)
# Past what the kernel buffers between proxy and client hold (tcp_wmem max is 4 MiB), so a
# stalled reader stalls the exchange itself, not just the next request's keep-alive wait.
HUGE = random.Random(6).randbytes(16 << 20)


@pytest.mark.parametrize(
    ("body", "stall"),
    [(LARGE, False), (HUGE, True)],
    ids=["4MiB-slow-reader", "16MiB-stall-past-idle-timeout"],
)
def test_a_large_response_to_a_slow_reader(serve: Any, body: bytes, stall: bool) -> None:
    """Backpressure, not buffering; a stalled client is not an idle origin (no 504, no cut)."""

    def respond(request: bytes) -> bytes:
        if path_of(request) == b"/large":
            return ok(body)
        return echo_path(request)

    with serve(serve_each(respond), limits=Limits(idle_timeout=1.0)) as (proxy, origin):
        client = Client(proxy, rcvbuf=32768)
        client.send(get("/large"))
        head = client._until(b"\r\n\r\n")
        assert b"content-length: %d" % len(body) in head.split(b"\r\n")
        digest = hashlib.sha256()
        got = 0
        while got < len(body):
            chunk = client._exact(min(16384, len(body) - got))
            digest.update(chunk)
            got += len(chunk)
            if stall and got == 65536:
                time.sleep(1.5)  # the scenario: a reader stalled longer than idle_timeout
            elif got % (256 << 10) == 0:
                time.sleep(0.01)  # pace the reader so the proxy's writer pauses
        assert digest.hexdigest() == hashlib.sha256(body).hexdigest()
        client.send(get("/after"))
        assert client.response().body == b"path=/after"
        assert len(origin.connections) == 1
        assert events(proxy) == allowed("GET", "GET")


# --- more of the contract through the fast path's door -------------------------------------------


def test_a_response_written_byte_by_byte(serve: Any) -> None:
    answer = ok(b"slowly but surely", b"X-A: 1\r\n")

    def script(conn: OriginConn) -> None:
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while conn.request() is not None:
            for i in range(len(answer)):
                conn.send(answer[i : i + 1])

    with serve(script) as (proxy, origin):
        client = Client(proxy)
        for _ in range(2):
            client.send(get("/"))
            assert client.response().wire == answer.replace(b"X-A", b"x-a")
        assert len(origin.connections) == 1
        assert events(proxy) == allowed("GET", "GET")


@pytest.mark.parametrize("size", [10, 100_000], ids=["body-in-second-write", "body-over-64KiB"])
def test_a_request_body_the_fast_path_cannot_hold_is_forwarded_exactly(
    serve: Any, size: int
) -> None:
    body = random.Random(size).randbytes(size)

    def respond(request: bytes) -> bytes:
        return ok(hashlib.sha256(request.partition(b"\r\n\r\n")[2]).hexdigest().encode())

    with serve(serve_each(respond)) as (proxy, origin):
        client = Client(proxy)
        head = b"PUT http://%s/u HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (
            API.encode(),
            API.encode(),
            size,
        )
        client.send(head)
        client.send(body)
        assert client.response().body == hashlib.sha256(body).hexdigest().encode()
        assert origin.requests[0] == (
            b"PUT /u HTTP/1.1\r\nhost: api.example.test\r\ncontent-length: %d\r\n\r\n" % size + body
        )
        assert events(proxy) == allowed("PUT")


def test_a_host_mismatch_is_400_with_one_event(serve: Any) -> None:
    with serve(serve_each(echo_path)) as (proxy, origin):
        client = Client(proxy)
        client.send(b"GET http://%s/ HTTP/1.1\r\nHost: other.example.test\r\n\r\n" % API.encode())
        response = client.response()
        assert response.status == 400
        assert b"Host header does not match request target" in response.body
        assert client.closed()
        assert origin.requests == []
        [event] = proxy.events()
        assert (event.to_dict()["network.policy.reason"], event.host) == ("host_mismatch", API)


def test_limited_mode_refuses_a_post_then_serves_a_get(serve: Any) -> None:
    with serve(serve_each(echo_path), mode="limited") as (proxy, origin):
        client = Client(proxy)
        post = b"POST http://%s/p HTTP/1.1\r\nHost: %s\r\nContent-Length: 2\r\n\r\nhi"
        client.send(post % (API.encode(), API.encode()) + get("/g"))
        refused = client.response()
        assert refused.status == 403
        assert refused.header(b"x-proxy-error") == b"blocked-by-method-policy"
        assert json.loads(refused.body)["reason"] == "method_not_allowed"
        assert client.response().body == b"path=/g"
        assert [path_of(r) for r in origin.requests] == [b"/g"]
        assert events(proxy) == [(API, "POST", "deny"), (API, "GET", "allow")]


def test_proxy_authentication_still_applies(serve: Any) -> None:
    with serve(serve_each(echo_path), proxy_auth_token="s3cret") as (proxy, origin):
        client = Client(proxy)
        client.send(get("/a"))
        assert client.response().status == 407
        auth = b"Proxy-Authorization: Basic dTpzM2NyZXQ=\r\n"  # u:s3cret
        client.send(get("/b", extra=auth))
        assert client.response().body == b"path=/b"
        assert origin.requests == [b"GET /b HTTP/1.1\r\nhost: api.example.test\r\n\r\n"]


def test_a_client_leaving_mid_response_closes_the_origin_connection(serve: Any) -> None:
    """CLIENT_GONE: the origin connection is closed, not kept (SPEC §15: error paths close)."""

    closed: list[bool] = []

    def script(conn: OriginConn) -> None:
        assert conn.request() is not None
        with contextlib.suppress(OSError):
            conn.send(ok(HUGE))
        conn.sock.settimeout(TIMEOUT)
        try:
            closed.append(conn.sock.recv(1) == b"")
        except TimeoutError:
            closed.append(False)
        except OSError:
            closed.append(True)  # reset: closed too

    with serve(script) as (proxy, origin):
        client = Client(proxy, rcvbuf=32768)
        client.send(get("/huge"))
        client._exact(100_000)
        client.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        client.close()  # a reset, mid-body
        origin.threads[0].join(TIMEOUT)
        assert closed == [True]
        assert events(proxy) == allowed("GET")


# --- idle origin connections serve the next client (handlers/origin_pool.py) --------------------
# Every request is still decided on its own; only the TCP connection to the origin is kept.


def one_request(proxy: Any, path: str = "/", extra: bytes = b"") -> Any:
    client = Client(proxy)
    try:
        client.send(get(path, extra=extra))
        return client.response()
    finally:
        client.close()


def answer_all(conn: OriginConn) -> None:
    while (request := conn.request()) is not None:
        conn.send(ok(b"ok " + request.split(b" ", 2)[1]))


def test_the_next_client_reuses_an_idle_origin_connection(serve: Any) -> None:
    with serve(answer_all) as (proxy, origin):
        first = one_request(proxy, "/one")
        second = one_request(proxy, "/two", extra=b"Connection: close\r\n")
        assert (first.status, first.body) == (200, b"ok /one")
        assert (second.status, second.body) == (200, b"ok /two")
        assert len(origin.connections) == 1
        assert len(origin.requests) == 2
        assert events(proxy) == allowed("GET", "GET")  # each request decided on its own


def test_a_reused_connection_closed_unanswered_is_retried_for_a_get(serve: Any) -> None:
    accepted: list[OriginConn] = []

    def script(conn: OriginConn) -> None:
        accepted.append(conn)
        if len(accepted) > 1:
            answer_all(conn)
            return
        assert conn.request() is not None
        conn.send(ok(b"first"))
        conn.request()  # the next request arrives on the kept connection: closed unanswered

    with serve(script) as (proxy, origin):
        assert one_request(proxy, "/a").body == b"first"
        again = one_request(proxy, "/b")
        assert (again.status, again.body) == (200, b"ok /b")
        assert len(origin.connections) == 2
        assert [r.split(b" ", 2)[1] for r in origin.requests] == [b"/a", b"/b", b"/b"]
        assert events(proxy) == allowed("GET", "GET")  # one decision, however many attempts


def test_a_post_is_not_repeated_on_a_new_connection(serve: Any) -> None:
    seen = threading.Event()

    def script(conn: OriginConn) -> None:
        while (request := conn.request()) is not None:
            if request.startswith(b"POST"):
                seen.set()
                return  # closed unanswered
            conn.send(ok(b"first"))

    with serve(script) as (proxy, origin):
        assert one_request(proxy, "/a").status == 200
        client = Client(proxy)
        try:
            body = b"x=1"
            client.send(
                b"POST http://%s/p HTTP/1.1\r\nHost: %s\r\ncontent-length: %d\r\n\r\n%s"
                % (API.encode(), API.encode(), len(body), body)
            )
            answer = client.response()
        finally:
            client.close()
        assert seen.wait(TIMEOUT)
        assert answer.status == 502
        assert sum(r.startswith(b"POST") for r in origin.requests) == 1


def test_a_rule_change_retires_idle_origin_connections(serve: Any) -> None:
    with serve(answer_all) as (proxy, origin):
        assert one_request(proxy, "/a").status == 200
        proxy.allow("other.example.test")  # new compiled rules: nothing opened before is reused
        assert one_request(proxy, "/b").status == 200
        assert len(origin.connections) == 2


def test_an_origin_closing_an_idle_connection_is_noticed(serve: Any) -> None:
    closed = threading.Event()

    def script(conn: OriginConn) -> None:
        request = conn.request()
        if request is None:
            return
        conn.send(ok(b"once", b"x-n: %d\r\n" % len(origin_conns)))
        origin_conns.append(conn)
        if len(origin_conns) == 1:
            closed.set()
            return  # closes while parked
        answer_all(conn)

    origin_conns: list[OriginConn] = []
    with serve(script) as (proxy, origin):
        assert one_request(proxy, "/a").status == 200
        assert closed.wait(TIMEOUT)
        for _ in range(3):  # whether or not the close was seen yet, the GET is answered
            assert one_request(proxy, "/b").status == 200
        assert len(origin.connections) >= 2


# --- later requests on a kept-alive connection (served from protocol callbacks) ---------------
# After the first response the callbacks serve what follows while it needs no I/O; anything
# else (a decider call, a dial, a refusal, a timeout) goes back to the connection's task.


def test_a_silent_origin_on_a_later_request_is_504(serve: Any) -> None:
    def script(conn: OriginConn) -> None:
        assert conn.request() is not None
        conn.send(ok(b"first"))
        assert conn.request() is not None
        conn.hang()

    with serve(script, limits=Limits(idle_timeout=0.5)) as (proxy, _):
        client = Client(proxy)
        client.send(get("/a"))
        assert client.response().body == b"first"
        client.send(get("/b"))
        assert_upstream_error(client, 504, b"upstream-timeout")
        assert events(proxy) == allowed("GET", "GET")


def test_a_rule_change_applies_to_the_next_request_on_the_connection(serve: Any) -> None:
    with serve(serve_each(echo_path)) as (proxy, origin):
        client = Client(proxy)
        client.send(get("/a"))
        assert client.response().body == b"path=/a"
        proxy.deny(API)
        client.send(get("/b"))
        refused = client.response()
        assert refused.status == 403
        assert refused.header(b"x-proxy-error") == b"blocked-by-denylist"
        assert [path_of(r) for r in origin.requests] == [b"/a"]
        assert events(proxy) == [(API, "GET", "allow"), (API, "GET", "deny")]


def test_a_later_request_that_needs_the_decider_gets_it(start_proxy: Any) -> None:
    other = "other.example.test"
    asked: list[str] = []

    async def decider(request: NetworkPolicyRequest) -> NetworkDecision:
        asked.append(request.host)
        return NetworkDecision.allow()

    origin = RawOrigin(serve_each(echo_path))
    routes = {f"{API}:80": origin.addr, f"{other}:80": origin.addr}
    try:
        with start_proxy(allow=[API], routes=routes, decider=decider) as proxy:
            client = Client(proxy)
            client.send(get("/a"))
            assert client.response().body == b"path=/a"
            client.send(b"GET http://%s/b HTTP/1.1\r\nHost: %s\r\n\r\n" % ((other.encode(),) * 2))
            assert client.response().body == b"path=/b"
            client.send(get("/c"))  # back on the first origin connection's host
            assert client.response().body == b"path=/c"
            assert asked == [other]
            decisions = [(e.host, e.decision, e.reason) for e in proxy.events()]
            assert decisions == [
                (API, "allow", "allow"),
                (other, "allow", "not_allowed"),  # a decider's override (SPEC §4.4)
                (API, "allow", "allow"),
            ]
    finally:
        origin.close()


def test_a_kept_origin_connection_closed_between_requests_is_replaced(serve: Any) -> None:
    closed = threading.Event()

    def script(conn: OriginConn) -> None:
        if closed.is_set():
            answer_all(conn)
            return
        assert conn.request() is not None
        conn.send(ok(b"first"))
        closed.set()  # and close the connection

    with serve(script) as (proxy, origin):
        client = Client(proxy)
        client.send(get("/a"))
        assert client.response().body == b"first"
        assert closed.wait(TIMEOUT)
        for path in ("/b", "/c"):  # whether or not the close was seen yet
            client.send(get(path))
            assert client.response().body == b"ok " + path.encode()
        assert len(origin.connections) == 2
        assert events(proxy) == allowed("GET", "GET", "GET")


def test_shutdown_closes_an_idle_kept_alive_connection_at_once(serve: Any) -> None:
    with serve(serve_each(echo_path), limits=Limits(idle_timeout=60)) as (proxy, _):
        client = Client(proxy)
        client.send(get("/a"))
        assert client.response().body == b"path=/a"
        started = time.monotonic()
    assert client.closed()
    assert time.monotonic() - started < 5  # not the 60 s idle timeout


def test_random_request_sequences_on_kept_connections(serve: Any) -> None:
    """Seeded mixes of simple requests, refusals, bodies and h11 fallbacks, one at a time or
    pipelined: every response in order and right, one audit event per request."""

    def respond(request: bytes) -> bytes:
        path = path_of(request)
        if path.startswith(b"/chunked"):
            return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        body = request.partition(b"\r\n\r\n")[2]
        answer = ok(b"path=" + path + (b" body=" + body if body else b""))
        if request.startswith(b"HEAD"):  # the head alone, with the length a GET would get
            return answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        return answer

    refused = b"GET http://%s/x HTTP/1.1\r\nHost: %s\r\n\r\n" % ((BLOCKED.encode(),) * 2)
    post = b"POST http://%s/p%%d HTTP/1.1\r\nHost: %s\r\ncontent-length: 3\r\n\r\nxyz" % (
        (API.encode(),) * 2
    )
    rng = random.Random(9)
    with serve(serve_each(respond)) as (proxy, _):
        expected_events: list[tuple[str, str, str]] = []
        for sequence in range(40):
            kinds = [
                rng.choice(["get", "get", "get", "head", "post", "refused", "chunked"])
                for _ in range(rng.randint(1, 8))
            ]
            client = Client(proxy)
            i = 0
            while i < len(kinds):
                batch = kinds[i : i + rng.randint(1, 3)]
                wire = b""
                for n, kind in enumerate(batch, start=i):
                    if kind == "refused":
                        wire += refused
                    elif kind == "post":
                        wire += post % n
                    elif kind == "head":
                        wire += get(f"/h{n}").replace(b"GET", b"HEAD", 1)
                    else:
                        wire += get(f"/{'chunked' if kind == 'chunked' else 'g'}{n}")
                client.send(wire)
                for n, kind in enumerate(batch, start=i):
                    method = b"HEAD" if kind == "head" else b"GET"
                    response = client.response(method)
                    context = (sequence, kinds, n)
                    if kind == "refused":
                        assert response.status == 403, context
                        expected_events.append((BLOCKED, "GET", "deny"))
                        continue
                    assert response.status == 200, context
                    if kind == "chunked":
                        assert response.body == b"abc", context
                    elif kind == "post":
                        assert response.body == b"path=/p%d body=xyz" % n, context
                    elif kind == "head":
                        assert response.body == b"", context
                    else:
                        assert response.body == b"path=/g%d" % n, context
                    method_name = {"head": "HEAD", "post": "POST"}.get(kind, "GET")
                    expected_events.append((API, method_name, "allow"))
                i += len(batch)
            client.close()
        assert events(proxy) == expected_events


def test_identical_connect_heads_are_each_decided_for_their_own_client(serve: Any) -> None:
    """The fast path parses a repeated CONNECT head once; each tunnel is still decided against
    the rules in force and audited with its own client."""
    head = b"CONNECT %s:80 HTTP/1.1\r\nHost: %s:80\r\n\r\n" % (API.encode(), API.encode())
    with serve(answer_all) as (proxy, _origin):
        clients = []
        for path in (b"/one", b"/two"):
            client = Client(proxy)
            clients.append(client)
            client.send(head)
            assert client._until(b"\r\n\r\n") == (b"HTTP/1.1 200 Connection established\r\n\r\n")
            client.send(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, API.encode()))
            response = client.response()
            assert (response.status, response.body) == (200, b"ok " + path)
        proxy.deny(API)
        refused = Client(proxy)
        clients.append(refused)
        refused.send(head)
        assert refused.response().status == 403
        names = [c.sock.getsockname() for c in clients]
        for client in clients:
            client.close()
        seen = [(e.decision, e.method, e.client) for e in proxy.events()]
        assert seen == [
            (decision, "CONNECT", f"{host}:{port}")
            for decision, (host, port) in zip(("allow", "allow", "deny"), names, strict=True)
        ]
