"""Faults (SPEC §5.6, §5.9, §4.2 step 5, §4.4, §15): broken upstreams, DNS, deciders.

Each fault gives the client a clear status (502/504 with `x-proxy-error`, 403 with the policy
reason, or a SOCKS error code), is audited, and leaves the proxy serving the next request.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
import trustme

from helpers.origins import Origin
from netproxy_core import BackgroundProxy, NetworkDecision, NetworkPolicyRequest
from netproxy_core.config.model import Limits
from netproxy_core.handlers import decide as decide_module
from netproxy_core.net import resolve as resolve_module

API = "api.example.test"
GOOD = "good.example.test"
TIMEOUT = 10.0
FAST = Limits(connect_timeout=2.0, dns_timeout=0.5, handshake_timeout=2.0, idle_timeout=0.5)

Behaviour = Callable[[socket.socket, threading.Event], None]


@contextmanager
def raw_origin(behaviour: Behaviour) -> Iterator[str]:
    """A TCP server on 127.0.0.1:0 running `behaviour(conn)` per connection; yields ip:port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)  # the acceptor polls `stop`: close() does not wake accept()
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=_run, args=(behaviour, conn, stop), daemon=True)
            t.start()
            threads.append(t)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()
        acceptor.join(5)
        for t in threads:
            t.join(5)


def _run(behaviour: Behaviour, conn: socket.socket, stop: threading.Event) -> None:
    conn.settimeout(0.2)
    try:
        behaviour(conn, stop)
    except OSError:
        pass
    finally:
        conn.close()


def read_head(conn: socket.socket, stop: threading.Event) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and not stop.is_set():
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
    return data


def reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def stall(conn: socket.socket, stop: threading.Event) -> None:
    read_head(conn, stop)
    stop.wait(30)


def reset_before_answer(conn: socket.socket, stop: threading.Event) -> None:
    read_head(conn, stop)
    reset(conn)


def reset_mid_body(conn: socket.socket, stop: threading.Event) -> None:
    read_head(conn, stop)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    reset(conn)


def garbage(conn: socket.socket, stop: threading.Event) -> None:
    read_head(conn, stop)
    conn.sendall(b"\x00\xffSSH-2.0-nonsense\r\n\r\n\r\n")


def close_silently(conn: socket.socket, stop: threading.Event) -> None:
    read_head(conn, stop)


def tls_garbage(conn: socket.socket, stop: threading.Event) -> None:
    conn.recv(4096)  # the ClientHello
    conn.sendall(b"\x16\x03\x03\x00\x05hello" + b"\x00" * 64)


def tls_close_after_hello(conn: socket.socket, stop: threading.Event) -> None:
    conn.recv(4096)


def tls_reset_mid_handshake(conn: socket.socket, stop: threading.Event) -> None:
    conn.recv(4096)
    reset(conn)


# --- client helpers ------------------------------------------------------------------------------


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk


def request(p: BackgroundProxy, host: str, path: str = "/", scheme: str = "http") -> bytes:
    addr = p.http_addr
    assert addr is not None
    with socket.create_connection(addr, timeout=TIMEOUT) as sock:
        head = f"GET {scheme}://{host}{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        sock.sendall(head.encode() + b"\r\n")
        return read_all(sock)


def status(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data.split(b" ", 2)[1])


def header(data: bytes, name: bytes) -> bytes | None:
    head = data.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def assert_still_serving(p: BackgroundProxy, origin: Origin) -> None:
    data = request(p, GOOD, "/still-serving")
    assert status(data) == 200, data[:200]
    assert origin.requests[-1].path == "/still-serving"


@pytest.fixture
def make(start_proxy, origin: Origin) -> Iterator[Callable[..., Any]]:
    """`make(routes={...}, allow=[...], **config)`: a proxy that also routes GOOD to `origin`."""

    @contextmanager
    def factory(
        *, routes: dict[str, str], allow: list[str], **kw: Any
    ) -> Iterator[BackgroundProxy]:
        kw.setdefault("limits", FAST)
        with start_proxy(
            allow=[GOOD, *allow], routes={f"{GOOD}:80": origin.addr, **routes}, **kw
        ) as p:
            yield p

    yield factory


# --- upstream faults over absolute-form HTTP -----------------------------------------------------


def closed_addr() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("behaviour", "expected", "proxy_error"),
    [
        (None, 502, b"upstream-error"),  # refused: nothing listens
        (reset_before_answer, 502, b"upstream-error"),
        (garbage, 502, b"upstream-error"),
        (close_silently, 502, b"upstream-error"),
        (stall, 504, b"upstream-timeout"),
    ],
    ids=["refused", "reset", "garbage", "closed", "stall"],
)
def test_http_upstream_faults(
    make: Any, origin: Origin, behaviour: Behaviour | None, expected: int, proxy_error: bytes
) -> None:
    @contextmanager
    def upstream() -> Iterator[str]:
        if behaviour is None:
            yield closed_addr()
        else:
            with raw_origin(behaviour) as addr:
                yield addr

    with upstream() as addr, make(routes={f"{API}:80": addr}, allow=[API]) as p:
        n = len(p.events())
        data = request(p, API)
        assert status(data) == expected, data[:200]
        assert header(data, b"x-proxy-error") == proxy_error
        event = p.events()[n]
        assert (event.host, event.decision, event.reason) == (API, "allow", "allow")
        assert_still_serving(p, origin)


def test_http_upstream_reset_mid_body_closes_the_client(make: Any, origin: Origin) -> None:
    with raw_origin(reset_mid_body) as addr, make(routes={f"{API}:80": addr}, allow=[API]) as p:
        data = request(p, API)  # returns: the proxy closes the client instead of hanging
        assert status(data) == 200
        assert len(data.partition(b"\r\n\r\n")[2]) < 100000
        assert_still_serving(p, origin)


@pytest.mark.parametrize(
    "behaviour", [None, tls_garbage, tls_reset_mid_handshake, tls_close_after_hello, "untrusted"]
)
def test_https_absolute_form_bad_tls_is_502(
    make: Any, origin: Origin, behaviour: Behaviour | str | None
) -> None:
    @contextmanager
    def upstream() -> Iterator[str]:
        if behaviour is None:
            yield closed_addr()
        elif behaviour == "untrusted":  # a certificate from a CA the proxy does not trust
            from helpers.origins import run_origin

            with run_origin(trustme.CA()) as o:
                yield o.addr
        else:
            assert callable(behaviour)
            with raw_origin(behaviour) as addr:
                yield addr

    with upstream() as addr, make(routes={f"{API}:443": addr}, allow=[API]) as p:
        data = request(p, API, scheme="https")
        assert status(data) == 502, data[:200]
        assert header(data, b"x-proxy-error") == b"upstream-error"
        assert p.events()[-1].reason == "allow"
        assert_still_serving(p, origin)


def test_intercepted_request_to_bad_tls_origin_is_502(make: Any, origin: Origin) -> None:
    with (
        raw_origin(tls_garbage) as addr,
        make(routes={f"{API}:443": addr}, allow=[API], mode="limited") as p,
    ):
        addr_ = p.http_addr
        assert addr_ is not None and p.ca_cert_path is not None
        with socket.create_connection(addr_, timeout=TIMEOUT) as sock:
            sock.sendall(f"CONNECT {API}:443 HTTP/1.1\r\nHost: {API}:443\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            context = ssl.create_default_context(cafile=str(p.ca_cert_path))
            with context.wrap_socket(sock, server_hostname=API) as tls:
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n".encode())
                data = read_all(tls)  # type: ignore[arg-type]
        assert status(data) == 502
        assert [e.protocol for e in p.events()][-1] == "https"
        assert_still_serving(p, origin)


# --- tunnels -------------------------------------------------------------------------------------


def socks_connect(p: BackgroundProxy, host: str, port: int) -> int:
    addr = p.socks_addr
    assert addr is not None
    with socket.create_connection(addr, timeout=TIMEOUT) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        name = host.encode()
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", port))
        reply = sock.recv(4)
        return reply[1]


def test_connect_and_socks_to_refusing_upstream(make: Any, origin: Origin) -> None:
    addr = closed_addr()
    with make(routes={f"{API}:443": addr}, allow=[API]) as p:
        http_addr = p.http_addr
        assert http_addr is not None
        with socket.create_connection(http_addr, timeout=TIMEOUT) as sock:
            sock.sendall(f"CONNECT {API}:443 HTTP/1.1\r\nHost: {API}:443\r\n\r\n".encode())
            data = read_all(sock)
        assert status(data) == 502 and header(data, b"x-proxy-error") == b"upstream-error"
        assert socks_connect(p, API, 443) == 0x05
        assert [(e.protocol, e.reason) for e in p.events()[-2:]] == [
            ("https_connect", "allow"),
            ("socks5_tcp", "allow"),
        ]
        assert_still_serving(p, origin)


def test_tunnel_upstream_reset_closes_the_client(make: Any, origin: Origin) -> None:
    def accept_then_reset(conn: socket.socket, stop: threading.Event) -> None:
        with suppress(TimeoutError):
            conn.recv(10)
        reset(conn)

    with raw_origin(accept_then_reset) as addr, make(routes={f"{API}:22": addr}, allow=[API]) as p:
        http_addr = p.http_addr
        assert http_addr is not None
        with socket.create_connection(http_addr, timeout=TIMEOUT) as sock:
            sock.sendall(f"CONNECT {API}:22 HTTP/1.1\r\nHost: {API}:22\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock.sendall(b"SSH-2.0-client\r\n")
            read_all(sock)  # returns once the proxy closes our side
        assert_still_serving(p, origin)


# --- DNS -----------------------------------------------------------------------------------------


def test_dns_failure_fails_closed(make: Any, origin: Origin) -> None:
    name = "no-such-name.invalid"
    with make(routes={}, allow=[name]) as p:
        n = len(p.events())
        data = request(p, name)
        assert status(data) == 403 and header(data, b"x-proxy-error") == b"blocked-by-allowlist"
        event = p.events()[n]
        assert (event.host, event.reason) == (name, "not_allowed_local")
        assert_still_serving(p, origin)


def test_dns_stall_times_out_and_fails_closed(
    make: Any, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def hang(*args: Any, **kwargs: Any) -> Any:
        await anyio.sleep(3600)

    # Only the resolver's view of getaddrinfo stalls; its real deadline must fire.
    monkeypatch.setattr(
        resolve_module, "anyio", SimpleNamespace(fail_after=anyio.fail_after, getaddrinfo=hang)
    )
    name = "slow-dns.example.test"
    with make(routes={}, allow=[name]) as p:
        n = len(p.events())
        for get in (lambda: request(p, name), lambda: request(p, name, scheme="https")):
            data = get()
            assert status(data) == 403
        assert socks_connect(p, name, 443) == 0x02
        assert [(e.host, e.reason) for e in p.events()[n:]] == [(name, "not_allowed_local")] * 3
        assert_still_serving(p, origin)


# --- deciders ------------------------------------------------------------------------------------


async def raising_decider(request: NetworkPolicyRequest) -> NetworkDecision:
    raise RuntimeError("decider bug")


async def hanging_decider(request: NetworkPolicyRequest) -> NetworkDecision:
    await anyio.sleep(3600)
    raise AssertionError("unreachable")


async def wrong_type_decider(request: NetworkPolicyRequest) -> NetworkDecision:
    return "allow"  # type: ignore[return-value]


@pytest.mark.parametrize("decider", [raising_decider, hanging_decider, wrong_type_decider])
def test_broken_decider_denies_policy_denied(
    make: Any, origin: Origin, monkeypatch: pytest.MonkeyPatch, decider: Any
) -> None:
    monkeypatch.setattr(decide_module, "DECIDER_TIMEOUT", 0.3)
    with make(routes={}, allow=[], decider=decider) as p:
        n = len(p.events())
        data = request(p, "unlisted.example.test")
        assert status(data) == 403 and header(data, b"x-proxy-error") == b"blocked-by-policy"
        assert socks_connect(p, "unlisted.example.test", 443) == 0x02
        assert [(e.reason, e.source) for e in p.events()[n:]] == [("policy_denied", "decider")] * 2
        assert_still_serving(p, origin)  # allowlisted hosts never reach the decider


def test_decider_is_never_asked_for_local_targets(make: Any, origin: Origin) -> None:
    asked: list[str] = []

    async def allow_all(request: NetworkPolicyRequest) -> NetworkDecision:
        asked.append(request.host)
        return NetworkDecision.allow()

    with make(routes={}, allow=[], decider=allow_all) as p:
        data = request(p, "2130706433")
        assert status(data) == 403
        assert p.events()[-1].reason == "not_allowed_local"
        assert asked == []


def test_audit_log_of_faults_is_on_disk(make: Any, origin: Origin, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    with make(routes={f"{API}:80": closed_addr()}, allow=[API], audit_log=str(log)) as p:
        assert status(request(p, API)) == 502
        assert_still_serving(p, origin)
    lines = log.read_text().splitlines()
    decisions = [json.loads(line)["network.policy.decision"] for line in lines]
    assert decisions == ["allow", "allow"]
