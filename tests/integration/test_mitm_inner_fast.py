"""Intercepted requests on one kept-alive tunnel: every response framing, the callback path
(SPEC §7.4, §5.5, §5.9, §15, §16).

The inner fast path serves simple exchanges itself and relays anything else with h11; these
tests drive both through one connection: Content-Length, chunked, 1xx, HEAD, 204,
close-delimited, truncated and missing responses, refusals, pipelining, HTTP/1.0, a Host that
does not name the tunnel.

After the first request of a tunnel, simple requests are decided (`decide_now`) and relayed
from the streams' callbacks, handing back to the task for anything needing I/O or h11. The
second section drives that callback path on a kept-alive tunnel: the live policy is applied to
every request, a decider (I/O) still decides each one, pipelined requests with a refusal in the
middle, a large body to a slow reader, an origin that goes silent (504), an idle tunnel timing
out, a busy one outliving its idle timeout, and a shutdown ending an idle tunnel at once.

A scripted TLS origin (trustme) answers byte for byte; the client is a raw TLS socket through
CONNECT, parsed with h11.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import h11
import pytest
import trustme

from netproxy_core import BackgroundProxy
from netproxy_core.config.model import Limits, MitmAction, MitmConfig, MitmHook
from netproxy_core.policy.model import NetworkDecision, NetworkPolicyRequest

StartProxy = Callable[..., AbstractContextManager[BackgroundProxy]]
HOST = "api.example.test"

BIG = 1 << 20
LARGE = 4 << 20  # a patterned body for the slow reader
REPLIES: dict[str, bytes] = {
    "/cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Kind: cl\r\n\r\nhello",
    "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "/hints": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    ),
    "/head": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    "/204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "/conn-close": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    "/hop": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n"
        b"Connection: x-private\r\nX-Private: 1\r\nX-Public: 1\r\n\r\nok"
    ),
    "/big": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"b" * BIG,
    "/large": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % LARGE
    + bytes(range(256)) * (LARGE // 256),
}
CLOSING: dict[str, bytes] = {  # answered, then the origin closes
    "/eof": b"HTTP/1.1 200 OK\r\n\r\nuntil-close",
    "/short": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    "/drop": b"",
}


@dataclass
class ScriptedOrigin:
    port: int = 0
    connections: int = 0
    requests: list[tuple[str, str, bytes, dict[str, str]]] = field(default_factory=list)
    silent: threading.Event = field(default_factory=threading.Event)  # a /silent request came

    @property
    def paths(self) -> list[str]:
        return [path for _, path, _, _ in self.requests]


@contextmanager
def scripted_origin(ca: trustme.CA) -> Iterator[ScriptedOrigin]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))
    origin = ScriptedOrigin(port=listener.getsockname()[1])
    stop = threading.Event()

    def serve(raw: socket.socket) -> None:
        with raw, context.wrap_socket(raw, server_side=True) as tls:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {
                    k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
                }
                length = int(headers.get("content-length", "0"))
                while len(buffer) < length:
                    buffer += tls.recv(65536)
                body, buffer = buffer[:length], buffer[length:]
                origin.requests.append((method, path, body, headers))
                if path == "/silent":
                    origin.silent.set()
                    stop.wait(30)  # answers nothing until the test ends
                    return
                if path in CLOSING:
                    tls.sendall(CLOSING[path])
                    return
                tls.sendall(REPLIES.get(path, REPLIES["/cl"]))
                if path == "/conn-close":
                    return

    def accept() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            origin.connections += 1
            threading.Thread(target=_quietly, args=(serve, raw), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        stop.set()
        with suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()
        thread.join(timeout=5)


def _quietly(fn: Callable[[socket.socket], None], raw: socket.socket) -> None:
    with suppress(OSError, ssl.SSLError):
        fn(raw)


def request_fields(body: bytes, headers: dict[str, str]) -> list[tuple[str, str]]:
    """Host (HOST unless `host=` is given), the extra headers (`x_a` → `x-a`), Content-Length."""
    fields = [("Host", headers.pop("host", HOST))]
    fields += [(k.replace("_", "-"), v) for k, v in headers.items()]
    if body:
        fields.append(("Content-Length", str(len(body))))
    return fields


def raw_request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    fields = request_fields(body, headers)
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields)
    return head.encode() + b"\r\n" + body


class Tunnel:
    """A kept-alive TLS connection through the proxy's CONNECT, responses parsed by h11."""

    def __init__(self, proxy: BackgroundProxy) -> None:
        assert proxy.http_addr is not None and proxy.ca_cert_path is not None
        sock = socket.create_connection(proxy.http_addr, timeout=10)
        sock.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
        context = ssl.create_default_context(cafile=str(proxy.ca_cert_path))
        self.tls = context.wrap_socket(sock, server_hostname=HOST)
        self.conn = h11.Connection(h11.CLIENT)

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.tls.close()

    def send(self, method: str, path: str, body: bytes = b"", **headers: str) -> None:
        self.tls.sendall(raw_request(method, path, body, **headers))
        self.expect(method, path, body, **headers)

    def expect(self, method: str, path: str, body: bytes = b"", **headers: str) -> None:
        """Have h11's client state follow a request sent (h11 cannot pipeline itself)."""
        fields = request_fields(body, headers)
        self.conn.send(h11.Request(method=method, target=path, headers=fields))
        if body:
            self.conn.send(h11.Data(data=body))
        self.conn.send(h11.EndOfMessage())

    def response(self, read_size: int = 65536) -> tuple[list[int], dict[str, str], bytes, bool]:
        """(statuses incl. 1xx, final headers, body, connection closed after)."""
        statuses: list[int] = []
        headers: dict[str, str] = {}
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.tls.recv(read_size))
            elif isinstance(event, (h11.InformationalResponse, h11.Response)):
                statuses.append(event.status_code)
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(event)
        closed = self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE
        if not closed:
            self.conn.start_next_cycle()
        return statuses, headers, bytes(body), closed

    def get(self, path: str, method: str = "GET", body: bytes = b"", **headers: str) -> Any:
        self.send(method, path, body, **headers)
        return self.response()

    def at_eof(self) -> bool:
        try:
            return self.tls.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True


@pytest.fixture
def origin(origin_ca: trustme.CA) -> Iterator[ScriptedOrigin]:
    with scripted_origin(origin_ca) as o:
        yield o


def start_mitm(
    start_proxy: StartProxy, origin: ScriptedOrigin, **config: Any
) -> AbstractContextManager[BackgroundProxy]:
    """A proxy routing HOST to the origin; HOST allowed and interception on unless given."""
    config.setdefault("allow", [HOST])
    config.setdefault("mitm", MitmConfig(enabled=True))
    return start_proxy(routes={f"{HOST}:443": f"127.0.0.1:{origin.port}"}, **config)


@pytest.fixture
def proxy(start_proxy: StartProxy, origin: ScriptedOrigin) -> Iterator[BackgroundProxy]:
    with start_mitm(start_proxy, origin) as p:
        yield p


def methods(proxy: BackgroundProxy) -> list[tuple[str, str]]:
    return [(e.method or "", e.reason) for e in proxy.events() if e.protocol == "https"]


# --- every framing on the fast path ---------------------------------------------------------


def test_every_framing_on_one_kept_alive_tunnel(
    proxy: BackgroundProxy, origin: ScriptedOrigin
) -> None:
    with Tunnel(proxy) as t:
        assert t.get("/cl") == ([200], {"content-length": "5", "x-kind": "cl"}, b"hello", False)
        statuses, headers, body, closed = t.get("/chunked")
        assert (statuses, body, closed) == ([200], b"hello", False)
        assert headers["transfer-encoding"] == "chunked"
        assert t.get("/hints")[0::2] == ([103, 200], b"ok")
        assert t.get("/head", method="HEAD")[0::2] == ([200], b"")
        assert t.get("/204")[0::2] == ([204], b"")
        statuses, headers, body, closed = t.get("/hop")
        assert body == b"ok" and headers.get("x-public") == "1"
        assert "x-private" not in headers and "keep-alive" not in headers
        assert t.get("/cl", method="POST", body=b"abc")[2] == b"hello"
        statuses, _, body, closed = t.get("/big")
        assert (statuses, len(body), closed) == ([200], BIG, False)
        assert t.get("/cl")[2:] == (b"hello", False)
    paths = [(m, p, b) for m, p, b, _ in origin.requests]
    assert paths == [
        ("GET", "/cl", b""),
        ("GET", "/chunked", b""),
        ("GET", "/hints", b""),
        ("HEAD", "/head", b""),
        ("GET", "/204", b""),
        ("GET", "/hop", b""),
        ("POST", "/cl", b"abc"),
        ("GET", "/big", b""),
        ("GET", "/cl", b""),
    ]
    assert all(h["host"] == HOST for *_, h in origin.requests)
    assert origin.connections == 1  # one origin connection served the whole tunnel
    assert len(methods(proxy)) == 9


def test_origin_closing_reconnects_and_close_delimited_bodies_end_the_tunnel(
    proxy: BackgroundProxy, origin: ScriptedOrigin
) -> None:
    with Tunnel(proxy) as t:
        assert t.get("/conn-close")[2:] == (b"ok", False)
        assert t.get("/cl")[2:] == (b"hello", False)  # on a new origin connection
        statuses, _, body, _ = t.get("/eof")
        assert (statuses, body) == ([200], b"until-close")
    assert origin.connections == 2


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [("/drop", 502, "upstream-error"), ("/short", 200, None)],
)
def test_origin_failures(proxy: BackgroundProxy, path: str, status: int, error: str | None) -> None:
    with Tunnel(proxy) as t:
        assert t.get("/cl")[2] == b"hello"
        t.send("GET", path)
        if error is None:  # the response began: the client sees it cut short, then EOF
            data = b""
            while chunk := t.tls.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"abc")
            return
        statuses, headers, _, closed = t.response()
        assert statuses == [status] and closed
        assert headers["x-proxy-error"] == error
        assert t.at_eof()


def read_hooks(prefix: str) -> MitmConfig:
    """Only GETs under `prefix` pass; they lose any `x-strip-me` request header."""
    return MitmConfig(
        hooks=(
            MitmHook(
                name="reads", host=HOST, methods=("GET",), path_prefixes=(prefix,), action=("tag",)
            ),
        ),
        actions=(("tag", MitmAction(strip_request_headers=("x-strip-me",))),),
    )


def test_refusals_answer_and_keep_the_tunnel(
    start_proxy: StartProxy, origin: ScriptedOrigin
) -> None:
    with start_mitm(start_proxy, origin, mitm=read_hooks("/cl")) as p:
        with Tunnel(p) as t:
            assert t.get("/cl", x_strip_me="1", x_keep="1")[2] == b"hello"
            statuses, _, body, closed = t.get("/other")
            assert statuses == [403] and not closed
            assert json.loads(body)["reason"] == "mitm_hook_denied"
            assert json.loads(body)["protocol"] == "https"
            assert t.get("/cl", method="POST", body=b"x")[0] == [403]
            assert t.get("/cl")[2:] == (b"hello", False)
            statuses, _, _, closed = t.get("/cl", host="other.example.test")
            assert statuses == [400] and closed
        assert methods(p) == [
            ("GET", "allow"),
            ("GET", "mitm_hook_denied"),
            ("POST", "mitm_hook_denied"),
            ("GET", "allow"),
            ("GET", "host_mismatch"),
        ]
    assert origin.paths == ["/cl", "/cl"]
    first = origin.requests[0][3]
    assert "x-strip-me" not in first and first["x-keep"] == "1"


def test_pipelined_requests_and_http_1_0(proxy: BackgroundProxy, origin: ScriptedOrigin) -> None:
    with Tunnel(proxy) as t:
        t.tls.sendall(raw_request("GET", "/cl") * 3)
        for _ in range(3):
            t.expect("GET", "/cl")
            assert t.response()[2:] == (b"hello", False)
        t.tls.sendall(f"GET /cl HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
        data = b""
        while chunk := t.tls.recv(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
        assert body == b"hello"
    assert len(origin.requests) == 4


# --- kept-alive requests served from the TLS callbacks (§5.9, §15, §16) ---------------------


def test_live_policy_and_mode_apply_to_every_kept_alive_request(
    start_proxy: StartProxy, origin: ScriptedOrigin
) -> None:
    with start_mitm(start_proxy, origin) as p:
        with Tunnel(p) as t:
            for _ in range(3):
                assert t.get("/a")[::2] == ([200], b"hello")
            p.set_mode("limited")
            statuses, _, body, closed = t.get("/a", method="POST", body=b"x")
            assert (statuses, closed) == ([403], False)
            assert json.loads(body)["reason"] == "method_not_allowed"
            assert t.get("/a")[::2] == ([200], b"hello")
            p.deny(HOST)
            statuses, _, body, _ = t.get("/a")
            assert statuses == [403] and json.loads(body)["reason"] == "denied"
        assert methods(p) == [
            *[("GET", "allow")] * 3,
            ("POST", "method_not_allowed"),
            ("GET", "allow"),
            ("GET", "denied"),
        ]
    assert origin.paths == ["/a"] * 4


def test_a_decider_still_decides_every_request(
    start_proxy: StartProxy, origin: ScriptedOrigin
) -> None:
    asked: list[str] = []

    async def decider(request: NetworkPolicyRequest) -> NetworkDecision:
        asked.append(request.method or "")
        return NetworkDecision.allow()

    with start_mitm(start_proxy, origin, allow=(), decider=decider) as p:
        with Tunnel(p) as t:
            for _ in range(4):
                assert t.get("/a")[::2] == ([200], b"hello")
        https = [e for e in p.events() if e.protocol == "https"]
        assert len(https) == 4 and all(e.allowed for e in https)
    assert asked.count("GET") == 4
    assert origin.paths == ["/a"] * 4


def test_pipelined_requests_around_a_refusal(
    start_proxy: StartProxy, origin: ScriptedOrigin
) -> None:
    with start_mitm(start_proxy, origin, mitm=read_hooks("/ok")) as p:
        with Tunnel(p) as t:
            assert t.get("/ok/0")[::2] == ([200], b"hello")
            paths = ["/ok/1", "/no", "/ok/2", "/ok/3"]
            t.tls.sendall(b"".join(raw_request("GET", path) for path in paths))
            answers = []
            for path in paths:
                t.expect("GET", path)
                answers.append(t.response())
            assert [a[0] for a in answers] == [[200], [403], [200], [200]]
            assert json.loads(answers[1][2])["reason"] == "mitm_hook_denied"
            assert all(a[2] == b"hello" for a in answers[::2]) and not answers[3][3]
        assert [r for _, r in methods(p)] == [
            "allow",
            "allow",
            "mitm_hook_denied",
            "allow",
            "allow",
        ]
    assert origin.paths == ["/ok/0", "/ok/1", "/ok/2", "/ok/3"]


def test_a_large_body_reaches_a_slow_reader_whole(
    start_proxy: StartProxy, origin: ScriptedOrigin
) -> None:
    with start_mitm(start_proxy, origin) as p, Tunnel(p) as t:
        assert t.get("/a")[::2] == ([200], b"hello")
        t.send("GET", "/large")
        statuses, _, body, closed = t.response(read_size=997)  # slower than the proxy
        assert (statuses, closed) == ([200], False)
        assert body == bytes(range(256)) * (LARGE // 256)
        assert t.get("/a")[::2] == ([200], b"hello")
    assert origin.connections == 1


def test_a_silent_origin_answers_504_and_an_idle_tunnel_times_out(
    start_proxy: StartProxy, origin: ScriptedOrigin
) -> None:
    with start_mitm(start_proxy, origin, limits=Limits(idle_timeout=0.5)) as p:
        with Tunnel(p) as t:
            assert t.get("/a")[::2] == ([200], b"hello")
            statuses, headers, _, closed = t.get("/silent")
            assert statuses == [504] and headers["x-proxy-error"] == "upstream-timeout"
            assert closed and t.at_eof()
        with Tunnel(p) as t:
            assert t.get("/a")[::2] == ([200], b"hello")
            started = time.monotonic()
            assert t.at_eof()  # the idle timeout closes the tunnel
            assert time.monotonic() - started < 5
    assert origin.silent.is_set()


def test_shutdown_ends_an_idle_tunnel_at_once(
    start_proxy: StartProxy, origin: ScriptedOrigin
) -> None:
    with start_mitm(start_proxy, origin, limits=Limits(shutdown_grace=20.0)) as p, Tunnel(p) as t:
        assert t.get("/a")[::2] == ([200], b"hello")
        assert t.get("/a")[::2] == ([200], b"hello")
        started = time.monotonic()
        p.close()  # waits for open connections up to shutdown_grace
        assert time.monotonic() - started < 5
        assert t.at_eof()


def test_a_busy_tunnel_outlives_its_idle_timeout(
    start_proxy: StartProxy, origin: ScriptedOrigin
) -> None:
    with start_mitm(start_proxy, origin, limits=Limits(idle_timeout=0.3)) as p:
        with Tunnel(p) as t:
            started, served = time.monotonic(), 0
            while time.monotonic() - started < 1.0:  # each request moves the deadline on
                assert t.get("/a")[1:] == ({"content-length": "5", "x-kind": "cl"}, b"hello", False)
                served += 1
            assert t.at_eof()  # then the idle timeout ends it
        assert len(methods(p)) == served
    assert origin.connections == 1
