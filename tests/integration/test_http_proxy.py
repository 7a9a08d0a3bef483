"""HTTP proxy listener with real clients (SPEC §4.6, §5.1–§5.5, §5.9, §5.10).

Origins run on 127.0.0.1 and are reached under public-looking names through `routes`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import requests
import trustme

from helpers.origins import Origin, run_origin
from netproxy_core import BackgroundProxy, NetworkDecision, NetworkPolicyRequest, ProxyConfig
from netproxy_core.config.model import MitmConfig

CURL = "/usr/bin/curl"
API = "api.example.test"


# --- helpers ------------------------------------------------------------------------------


def connect(proxy: BackgroundProxy) -> socket.socket:
    addr = proxy.http_addr
    assert addr is not None
    sock = socket.create_connection(addr, timeout=10)
    return sock


class RawClient:
    """A raw socket to the proxy with an h11 parser for the responses (bytes under control)."""

    def __init__(self, proxy: BackgroundProxy) -> None:
        self.sock = connect(proxy)
        self.conn = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, *, head: bool = False) -> tuple[h11.Response, bytes]:
        """Read one whole response (status, body)."""
        response: h11.Response | None = None
        body = b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response, body
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before a response")

    def request(self, raw: bytes, *, method: bytes = b"GET") -> tuple[h11.Response, bytes]:
        # Keep our h11 client state in step with the raw bytes we write.
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        self.conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
        self.conn.send(h11.EndOfMessage())
        self.send(raw)
        return self.response()

    def closed(self) -> bool:
        """True when the proxy closed the connection (EOF)."""
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def raw_exchange(proxy: BackgroundProxy, data: bytes) -> bytes:
    """Send `data`, read until the proxy closes, return everything."""
    with connect(proxy) as sock:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


def status_of(data: bytes) -> int:
    assert data.startswith(b"HTTP/1."), data[:200]
    return int(data.split(b" ", 2)[1])


def header(response: h11.Response, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return value
    return None


def last_event(proxy: BackgroundProxy) -> dict[str, Any]:
    events = proxy.events()
    assert events, "no audit event"
    return events[-1].to_dict()


@contextmanager
def raw_origin(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server on 127.0.0.1:0 calling `handle(conn)` per connection in a thread."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_run, args=(conn,), daemon=True).start()

    def _run(conn: socket.socket) -> None:
        with conn, suppress(OSError):
            handle(conn)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        server.close()
        thread.join(5)


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def h11_origin(respond: Callable[[h11.Request, int], list[h11.Event]]) -> Any:
    """An origin speaking h11 that consumes request bodies in chunks (no buffering) and
    answers with the events `respond(request, body_length)` returns."""

    def handle(sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request: h11.Request | None = None
            length = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(262144))
                    continue
                if isinstance(event, h11.Request):
                    request = event
                    if any(k == b"expect" for k, _ in event.headers):
                        sock.sendall(
                            conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                        )
                elif isinstance(event, h11.Data):
                    length += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            for out in respond(request, length):
                sock.sendall(conn.send(out) or b"")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    return raw_origin(handle)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss() -> Iterator[list[int]]:
    """Sample this process's RSS while the block runs; yields [baseline, peak]."""
    result = [rss_bytes(), rss_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            result[1] = max(result[1], rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


def curl(
    proxy: BackgroundProxy, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        [CURL, "-sS", "--proxy", proxy.http_url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


# --- request forms ------------------------------------------------------------------------


def test_absolute_form_http_with_httpx_requests_and_curl(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        with httpx.Client(proxy=p.http_url) as client:
            assert client.get(f"http://{API}/a?q=1").json()["path"] == "/a?q=1"
        r = requests.get(f"http://{API}/b", proxies={"http": p.http_url}, timeout=10)
        assert r.status_code == 200 and r.json()["path"] == "/b"
        out = curl(p, f"http://{API}/c")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["path"] == "/c"
    assert [r.headers["host"] for r in origin.requests] == [API] * 3


def test_absolute_form_https_proxy_originates_verified_tls(start_proxy, tls_origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:443": tls_origin.addr}) as p:
        raw = raw_exchange(
            p,
            f"GET https://{API}/secure HTTP/1.1\r\nHost: {API}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status_of(raw) == 200
        body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
        assert body["tls"] is True and body["path"] == "/secure"
        event = last_event(p)
        assert event["network.transport.protocol"] == "http"
        assert event["server.port"] == 443 and event["network.policy.decision"] == "allow"


def test_absolute_form_https_untrusted_origin_is_502(start_proxy) -> None:
    stranger = trustme.CA()  # not in upstream_ca_files
    with (
        run_origin(stranger) as bad,
        start_proxy(allow=[API], routes={f"{API}:443": bad.addr}) as p,
    ):
        raw = raw_exchange(p, f"GET https://{API}/ HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert status_of(raw) == 502
        assert b"x-proxy-error: upstream-error" in raw.lower()
        assert bad.requests == []


def test_origin_form_uses_host_header(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        raw = raw_exchange(
            p, f"GET /plain HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n".encode()
        )
        assert status_of(raw) == 200
    assert origin.requests[0].path == "/plain"
    assert origin.requests[0].headers["host"] == API


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n", b"GET /x HTTP/1.1\r\nHost:\r\n\r\n"],
    ids=["http11-no-host", "http10-no-host", "empty-host"],
)
def test_no_host_is_400(start_proxy, data: bytes) -> None:
    with start_proxy(allow=[API]) as p:
        assert status_of(raw_exchange(p, data)) == 400


BAD_HOSTS = ["a..example.com", "example.com..", "x" * 64 + ".com", "%41.example", "a\\b.example"]


@pytest.mark.parametrize("form", ["absolute", "origin", "connect"])
@pytest.mark.parametrize("host", BAD_HOSTS)
def test_invalid_host_in_every_form_is_400_and_audited(start_proxy, form: str, host: str) -> None:
    if form == "absolute":
        data = f"GET http://{host}/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n"
    elif form == "origin":
        data = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"
    else:
        data = f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n"
    with start_proxy(allow=["**.example.com", "**.example", API]) as p:
        raw = raw_exchange(p, data.encode())
        assert status_of(raw) == 400
        event = last_event(p)
        assert event["network.policy.reason"] == "invalid_host"
        assert event["network.policy.decision"] == "deny"


@pytest.mark.parametrize(
    "host_header", ["other.example.test", f"{API}:8080", "a..b"], ids=["name", "port", "invalid"]
)
def test_host_mismatch_is_400_and_audited(start_proxy, origin: Origin, host_header: str) -> None:
    with start_proxy(allow=[API, "other.example.test"], routes={f"{API}:80": origin.addr}) as p:
        raw = raw_exchange(p, f"GET http://{API}/ HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode())
        assert status_of(raw) == 400
        assert b"Host header does not match request target" in raw
        assert last_event(p)["network.policy.reason"] == "host_mismatch"
    assert origin.requests == []


def test_matching_host_with_explicit_default_port_is_fine(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        raw = raw_exchange(
            p,
            f"GET http://{API}/ HTTP/1.1\r\nHost: {API.upper()}:80\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status_of(raw) == 200


def test_transfer_encoding_with_content_length_is_400(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        raw = raw_exchange(
            p,
            f"POST http://{API}/ HTTP/1.1\r\nHost: {API}\r\nContent-Length: 5\r\n"
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode(),
        )
        assert status_of(raw) == 400
    assert origin.requests == []


# --- hop-by-hop ---------------------------------------------------------------------------


def test_hop_by_hop_request_headers_are_stripped(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        raw = raw_exchange(
            p,
            (
                f"GET http://{API}/h HTTP/1.1\r\nHost: {API}\r\n"
                "Proxy-Authorization: Basic dTpw\r\nConnection: close, X-Listed-Hop\r\n"
                "X-Listed-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
                "Proxy-Connection: keep-alive\r\nTrailer: X-T\r\nX-End-To-End: kept\r\n\r\n"
            ).encode(),
        )
        assert status_of(raw) == 200
    seen = origin.requests[0].headers
    assert seen["host"] == API and seen["x-end-to-end"] == "kept"
    for name in (
        "proxy-authorization",
        "x-listed-hop",
        "keep-alive",
        "te",
        "proxy-connection",
        "trailer",
    ):
        assert name not in seen, name
    assert "x-listed-hop" not in seen.get("connection", "").lower()


def test_hop_by_hop_response_headers_are_stripped(start_proxy) -> None:
    def respond(request: h11.Request, length: int) -> list[h11.Event]:
        headers = [
            (b"content-length", b"2"),
            (b"connection", b"X-Resp-Hop"),
            (b"x-resp-hop", b"1"),
            (b"keep-alive", b"timeout=9"),
            (b"proxy-authenticate", b"Basic"),
            (b"x-resp-end", b"kept"),
        ]
        return [
            h11.Response(status_code=200, headers=headers),
            h11.Data(data=b"ok"),
            h11.EndOfMessage(),
        ]

    with (
        h11_origin(respond) as port,
        start_proxy(allow=[API], routes={f"{API}:80": f"127.0.0.1:{port}"}) as p,
    ):
        client = RawClient(p)
        try:
            response, body = client.request(
                f"GET http://{API}/ HTTP/1.1\r\nHost: {API}\r\n\r\n".encode()
            )
        finally:
            client.close()
    names = {k for k, _ in response.headers}
    assert body == b"ok" and header(response, b"x-resp-end") == b"kept"
    assert not names & {b"x-resp-hop", b"keep-alive", b"proxy-authenticate"}


# --- keep-alive ---------------------------------------------------------------------------


def test_keep_alive_each_request_is_evaluated(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        client = RawClient(p)
        try:
            ok, _ = client.request(f"GET http://{API}/1 HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
            blocked, body = client.request(
                b"GET http://blocked.example.test/ HTTP/1.1\r\nHost: blocked.example.test\r\n\r\n"
            )
            again, _ = client.request(
                f"GET http://{API}/2 HTTP/1.1\r\nHost: {API}\r\n\r\n".encode()
            )
        finally:
            client.close()
        assert (ok.status_code, blocked.status_code, again.status_code) == (200, 403, 200)
        assert header(blocked, b"x-proxy-error") == b"blocked-by-allowlist"
        assert json.loads(body)["host"] == "blocked.example.test"
        decisions = [(e.host, e.decision) for e in p.events()]
        assert decisions == [(API, "allow"), ("blocked.example.test", "deny"), (API, "allow")]
    assert [r.path for r in origin.requests] == ["/1", "/2"]


def test_blocked_post_with_body_keeps_connection(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        client = RawClient(p)
        try:
            client.conn.send(
                h11.Request(
                    method=b"POST",
                    target=b"/",
                    headers=[(b"host", b"x"), (b"content-length", b"5")],
                )
            )
            client.conn.send(h11.Data(data=b"hello"))
            client.conn.send(h11.EndOfMessage())
            client.send(
                b"POST http://nope.example.test/ HTTP/1.1\r\nHost: nope.example.test\r\n"
                b"Content-Length: 5\r\n\r\nhello"
            )
            blocked, _ = client.response()
            ok, _ = client.request(
                f"GET http://{API}/after HTTP/1.1\r\nHost: {API}\r\n\r\n".encode()
            )
        finally:
            client.close()
    assert (blocked.status_code, ok.status_code) == (403, 200)


# --- bodies -------------------------------------------------------------------------------

BIG = 50 * 1024 * 1024


def test_streaming_download_50mib_is_not_buffered(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        with peak_rss() as rss:
            out = curl(
                p,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                f"http://{API}/bytes/{BIG}",
            )
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"200 {BIG}"
    assert rss[1] - rss[0] < 24 * 1024 * 1024, f"RSS grew by {(rss[1] - rss[0]) >> 20} MiB"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_streaming_upload_50mib_is_not_buffered(start_proxy, tmp_path: Path, chunked: bool) -> None:
    def respond(request: h11.Request, length: int) -> list[h11.Event]:
        te = dict(request.headers).get(b"transfer-encoding", b"")
        body = f"{length} {te.decode()}".encode()
        return [
            h11.Response(status_code=200, headers=[(b"content-length", str(len(body)).encode())]),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ]

    payload = tmp_path / "payload"
    with open(payload, "wb") as f:
        f.truncate(BIG)
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    with (
        h11_origin(respond) as port,
        start_proxy(allow=[API], routes={f"{API}:80": f"127.0.0.1:{port}"}) as p,
    ):
        with peak_rss() as rss:
            out = curl(p, "--data-binary", f"@{payload}", *extra, f"http://{API}/upload")
        assert out.returncode == 0, out.stderr
    length, _, te = out.stdout.partition(" ")
    assert int(length) == BIG
    assert te == ("chunked" if chunked else "")
    assert rss[1] - rss[0] < 24 * 1024 * 1024, f"RSS grew by {(rss[1] - rss[0]) >> 20} MiB"


def test_chunked_request_body_reaches_origin(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        raw = raw_exchange(
            p,
            f"POST http://{API}/c HTTP/1.1\r\nHost: {API}\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".encode(),
        )
        assert status_of(raw) == 200
    assert origin.requests[0].body == b"hello world"


def test_chunked_response_is_relayed(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:  # noqa: SIM117
        with httpx.Client(proxy=p.http_url) as client:
            response = client.get(f"http://{API}/chunked/123456")
    assert response.status_code == 200 and response.content == b"y" * 123456


def test_expect_100_continue_with_curl(start_proxy, tmp_path: Path, origin: Origin) -> None:
    payload = tmp_path / "post"
    payload.write_bytes(b"z" * (3 * 1024 * 1024))
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        out = curl(
            p,
            "-v",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            f"@{payload}",
            f"http://{API}/upload",
        )
    assert out.returncode == 0, out.stderr
    assert "HTTP/1.1 100 Continue" in out.stderr
    assert json.loads(out.stdout)["body_len"] == 3 * 1024 * 1024


def test_head_response_has_no_body_and_connection_stays_usable(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        client = RawClient(p)
        try:
            client.conn.send(h11.Request(method=b"HEAD", target=b"/", headers=[(b"host", b"x")]))
            client.conn.send(h11.EndOfMessage())
            client.send(f"HEAD http://{API}/bytes/1000 HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
            head, body = client.response()
            after, after_body = client.request(
                f"GET http://{API}/bytes/3 HTTP/1.1\r\nHost: {API}\r\n\r\n".encode()
            )
        finally:
            client.close()
    assert head.status_code == 200 and header(head, b"content-length") == b"1000" and body == b""
    assert after.status_code == 200 and after_body == b"xxx"


# --- websocket ----------------------------------------------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@contextmanager
def ws_echo_origin() -> Iterator[tuple[int, list[bytes]]]:
    heads: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        head = read_head(conn)
        heads.append(head)
        key = b""
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"sec-websocket-key:"):
                key = line.split(b":", 1)[1].strip()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            conn.sendall(rest)
        while data := conn.recv(65536):
            conn.sendall(data)

    with raw_origin(handle) as port:
        yield port, heads


def ws_request(target: str) -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: {API}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("scheme", ["ws", "http"])
def test_websocket_upgrade_is_relayed(start_proxy, scheme: str) -> None:
    with (
        ws_echo_origin() as (port, heads),
        start_proxy(allow=[API], routes={f"{API}:80": f"127.0.0.1:{port}"}) as p,
        connect(p) as sock,
    ):
        sock.sendall(ws_request(f"{scheme}://{API}/chat"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        assert b"s3pplmbitxaq9kygzzhzrbk+xoo=" in head.lower()
        for message in (b"\x81\x05hello", b"binary\x00\xff" * 1000):
            sock.sendall(message)
            echoed = b""
            while len(echoed) < len(message):
                echoed += sock.recv(65536)
            assert echoed == message
    origin_head = heads[0].lower()
    assert b"upgrade: websocket" in origin_head and b"connection: upgrade" in origin_head
    assert origin_head.startswith(b"get /chat http/1.1")


def test_limited_mode_refuses_upgrade(start_proxy) -> None:
    with (
        ws_echo_origin() as (port, heads),
        start_proxy(
            allow=[API],
            routes={f"{API}:80": f"127.0.0.1:{port}"},
            mode="limited",
            mitm=MitmConfig(enabled=False),
        ) as p,
    ):
        client = RawClient(p)
        try:
            response, _ = client.request(ws_request(f"ws://{API}/chat"))
        finally:
            client.close()
        assert response.status_code == 403
        assert header(response, b"x-proxy-error") == b"blocked-by-method-policy"
        event = last_event(p)
        assert (event["network.policy.reason"], event["network.policy.source"]) == (
            "method_not_allowed",
            "mode_guard",
        )
    assert heads == []


# --- blocked responses (§4.6) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "method", "host", "reason", "proxy_error"),
    [
        ({"allow": [API]}, "GET", "other.example.test", "not_allowed", "blocked-by-allowlist"),
        ({"allow": [API]}, "GET", "127.0.0.1", "not_allowed_local", "blocked-by-allowlist"),
        ({"allow": [API]}, "GET", "0x7f.1", "not_allowed_local", "blocked-by-allowlist"),
        ({"allow": ["*.example.test"], "deny": [API]}, "GET", API, "denied", "blocked-by-denylist"),
        (
            {"allow": [API], "mode": "limited", "mitm": MitmConfig(enabled=False)},
            "POST",
            API,
            "method_not_allowed",
            "blocked-by-method-policy",
        ),
        (
            {"mode": "limited", "mitm": MitmConfig(enabled=False)},
            "POST",
            "other.example.test",
            "not_allowed",
            "blocked-by-allowlist",
        ),
    ],
    ids=[
        "not_allowed",
        "not_allowed_local",
        "local-inet_aton",
        "denied",
        "method",
        "host-before-method",
    ],
)
def test_blocked_forwarded_request_json_body(
    start_proxy, config: dict[str, Any], method: str, host: str, reason: str, proxy_error: str
) -> None:
    with start_proxy(**config) as p:
        client = RawClient(p)
        try:
            client.conn.send(
                h11.Request(
                    method=method.encode(),
                    target=b"/",
                    headers=[(b"host", b"x"), (b"content-length", b"0")],
                )
            )
            client.conn.send(h11.EndOfMessage())
            client.send(
                f"{method} http://{host}/p?secret=1 HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )
            response, body = client.response()
        finally:
            client.close()
        assert response.status_code == 403
        assert header(response, b"x-proxy-error") == proxy_error.encode()
        assert header(
            response,
            b"content-type",
        ).startswith(b"application/json")  # type: ignore[union-attr]
        data = json.loads(body)
        assert set(data) == {
            "status",
            "host",
            "reason",
            "decision",
            "source",
            "protocol",
            "port",
            "message",
        }
        assert data["status"] == "blocked" and data["reason"] == reason
        assert data["decision"] == "deny" and data["protocol"] == "http" and data["port"] == 80
        assert data["message"] and "secret" not in body.decode()
        event = last_event(p)
        assert event["network.policy.reason"] == reason
        assert "secret" not in json.dumps(event)
        blocked = p.blocked()[-1]
        assert blocked.reason == reason and blocked.method == method


def test_proxy_disabled_at_runtime_is_503_without_proxy_error(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        assert p.proxy is not None
        p.proxy.state.set_enabled(False)
        client = RawClient(p)
        try:
            response, _ = client.request(
                f"GET http://{API}/ HTTP/1.1\r\nHost: {API}\r\n\r\n".encode()
            )
        finally:
            client.close()
        assert response.status_code == 503
        assert header(response, b"x-proxy-error") is None
        assert last_event(p)["network.policy.reason"] == "proxy_disabled"
        p.proxy.state.set_enabled(True)
        with httpx.Client(proxy=p.http_url) as client:
            assert client.get(f"http://{API}/").status_code == 200
    assert len(origin.requests) == 1


# --- decider ------------------------------------------------------------------------------


def test_decider_allow_overrides_and_deny_keeps_reason(start_proxy, origin: Origin) -> None:
    seen: list[NetworkPolicyRequest] = []

    async def decider(request: NetworkPolicyRequest) -> NetworkDecision:
        seen.append(request)
        if request.host == API:
            return NetworkDecision.allow()
        if request.host == "nope.example.test":
            return NetworkDecision.deny("")
        return NetworkDecision.deny("no_thanks")

    routes = {f"{API}:80": origin.addr, "nope.example.test:80": origin.addr}
    with start_proxy(decider=decider, routes=routes, deny=["denied.example.test"]) as p:  # noqa: SIM117
        with httpx.Client(proxy=p.http_url) as client:
            assert client.get(f"http://{API}/").status_code == 200
            allow = last_event(p)
            assert (allow["network.policy.source"], allow["network.policy.override"]) == (
                "decider",
                True,
            )
            r = client.get("http://nope.example.test/")
            assert r.status_code == 403 and r.json()["reason"] == "policy_denied"
            assert r.headers["x-proxy-error"] == "blocked-by-policy"
            assert last_event(p)["network.policy.source"] == "decider"
            r = client.get("http://other.example.test/")
            assert r.status_code == 403 and r.json()["reason"] == "no_thanks"
            r = client.get("http://denied.example.test/")
            assert r.json()["reason"] == "denied"  # deny wins: decider never asked
            r = client.get("http://127.0.0.1:9/")
            assert r.json()["reason"] == "not_allowed_local"
    assert {s.host for s in seen} == {API, "nope.example.test", "other.example.test"}
    assert seen[0].protocol == "http" and seen[0].method == "GET" and seen[0].port == 80


def test_decider_that_raises_is_policy_denied(start_proxy, origin: Origin) -> None:
    async def decider(request: NetworkPolicyRequest) -> NetworkDecision:
        raise RuntimeError("boom")

    with start_proxy(decider=decider, routes={f"{API}:80": origin.addr}) as p:  # noqa: SIM117
        with httpx.Client(proxy=p.http_url) as client:
            r = client.get(f"http://{API}/")
            assert r.status_code == 403 and r.json()["reason"] == "policy_denied"
            assert client.get(f"http://{API}/again").status_code == 403
    assert origin.requests == []


def test_decider_allow_cannot_open_local_addresses(start_proxy, origin: Origin) -> None:
    async def decider(request: NetworkPolicyRequest) -> NetworkDecision:
        return NetworkDecision.allow()

    with start_proxy(decider=decider, hosts=((API, ("127.0.0.1",)),)) as p:  # noqa: SIM117
        with httpx.Client(proxy=p.http_url) as client:
            r = client.get(f"http://{API}:{origin.port}/")
    assert r.status_code == 403 and r.json()["reason"] == "not_allowed_local"
    assert origin.requests == []


# --- DNS / hosts / routes -----------------------------------------------------------------


def test_dns_failure_fails_closed(start_proxy) -> None:
    with start_proxy(allow=["does-not-resolve.invalid"]) as p:
        with httpx.Client(proxy=p.http_url) as client:
            r = client.get("http://does-not-resolve.invalid/")
        assert r.status_code == 403 and r.json()["reason"] == "not_allowed_local"


def test_static_hosts_entry_to_loopback_is_checked(start_proxy, origin: Origin) -> None:
    hosts = ((API, ("127.0.0.1",)),)
    with start_proxy(allow=[API], hosts=hosts) as p, httpx.Client(proxy=p.http_url) as client:
        r = client.get(f"http://{API}:{origin.port}/")
        assert r.status_code == 403 and r.json()["reason"] == "not_allowed_local"
    assert origin.requests == []
    with start_proxy(allow=[API], hosts=hosts, allow_local_binding=True) as p:  # noqa: SIM117
        with httpx.Client(proxy=p.http_url) as client:
            assert client.get(f"http://{API}:{origin.port}/ok").status_code == 200
    assert origin.requests[0].path == "/ok"


def test_route_with_port_and_exact_loopback_allow(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API, "127.0.0.1"], routes={f"{API}:8080": origin.addr}) as p:  # noqa: SIM117
        with httpx.Client(proxy=p.http_url) as client:
            assert client.get(f"http://{API}:8080/routed").status_code == 200
            assert client.get(f"http://127.0.0.1:{origin.port}/direct").status_code == 200
            # the route is for port 8080 only: port 80 is resolved normally (and fails closed)
            assert client.get(f"http://{API}/").status_code in (403, 502)
    assert [r.path for r in origin.requests] == ["/routed", "/direct"]
    assert origin.requests[0].headers["host"] == f"{API}:8080"


def test_upstream_error_and_timeout_on_forwarded_requests(start_proxy) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    hold: list[socket.socket] = []

    def silent(conn: socket.socket) -> None:
        hold.append(conn)
        read_head(conn)
        conn.recv(1)  # never answers; returns when the proxy gives up

    with (
        raw_origin(silent) as silent_port,
        start_proxy(
            allow=[API, "silent.example.test"],
            routes={
                f"{API}:80": f"127.0.0.1:{dead_port}",
                "silent.example.test:80": f"127.0.0.1:{silent_port}",
            },
            limits=_limits(idle_timeout=0.5),
        ) as p,
    ):
        raw = raw_exchange(p, f"GET http://{API}/ HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert status_of(raw) == 502 and b"x-proxy-error: upstream-error" in raw.lower()
        raw = raw_exchange(
            p, b"GET http://silent.example.test/ HTTP/1.1\r\nHost: silent.example.test\r\n\r\n"
        )
        assert status_of(raw) == 504 and b"x-proxy-error: upstream-timeout" in raw.lower()


def test_origin_closing_without_answer_is_502(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as p:
        raw = raw_exchange(p, f"GET http://{API}/drop HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert status_of(raw) == 502 and b"x-proxy-error: upstream-error" in raw.lower()


def _limits(**kw: Any) -> Any:
    from netproxy_core.config.model import Limits

    return Limits(**kw)


# --- proxy auth ---------------------------------------------------------------------------


def test_proxy_auth_407_and_curl_proxy_user(start_proxy, origin: Origin) -> None:
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}, proxy_auth_token="t0k3n") as p:
        raw = raw_exchange(
            p, f"GET http://{API}/ HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n".encode()
        )
        assert status_of(raw) == 407
        assert b'proxy-authenticate: basic realm="netproxy"' in raw.lower()
        wrong = curl(
            p, "-o", "/dev/null", "-w", "%{http_code}", "--proxy-user", "u:nope", f"http://{API}/"
        )
        assert wrong.stdout == "407"
        good = curl(p, "--proxy-user", "anyone:t0k3n", f"http://{API}/auth")
        assert good.returncode == 0, good.stderr
        assert json.loads(good.stdout)["path"] == "/auth"
        connect_out = curl(p, "-o", "/dev/null", "-w", "%{http_code}", "-p", f"https://{API}/")
        assert "407" in connect_out.stdout + connect_out.stderr
    assert len(origin.requests) == 1
    assert "proxy-authorization" not in origin.requests[0].headers


# --- listener address ---------------------------------------------------------------------


def test_non_loopback_listener_is_clamped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = ProxyConfig(proxy_url="0.0.0.0:0", socks_url="0.0.0.0:0")
    with caplog.at_level(logging.WARNING, logger="netproxy"):  # noqa: SIM117
        with BackgroundProxy(config, home=tmp_path, upstream_env={}) as p:
            assert p.http_addr is not None and p.http_addr[0] == "127.0.0.1"
            assert p.socks_addr is not None and p.socks_addr[0] == "127.0.0.1"
    assert any("not loopback" in r.getMessage() for r in caplog.records)
