"""Spec audit of the listeners (SPEC §5, §6, §7.3, §8, §15): gaps found and fixed, one test each.

Raw sockets against real proxies on 127.0.0.1:0; origins from `helpers.origins`.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from contextlib import ExitStack, suppress

import pytest

from conftest import ProxyFactory
from helpers.origins import Origin
from netproxy_core import BackgroundProxy
from netproxy_core.config.model import Limits, MitmConfig

HOST = "api.example.test"


def exchange(addr: tuple[str, int] | None, data: bytes) -> bytes:
    """Send `data`, read until the proxy closes (or 5 s pass)."""
    assert addr is not None
    with socket.create_connection(addr, timeout=5) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def head_of(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def events_of(proxy: BackgroundProxy) -> list[tuple[str, str, str]]:
    return [
        (
            d["network.policy.decision"],
            d["network.policy.reason"],
            d["network.transport.protocol"],
        )
        for d in (e.to_dict() for e in proxy.events())
    ]


def socks_connect(addr: tuple[str, int] | None, host: str, port: int) -> int:
    """SOCKS5 CONNECT by domain name; returns REP."""
    assert addr is not None
    with socket.create_connection(addr, timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        name = host.encode()
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", port))
        reply = sock.recv(262)
        assert reply[:1] == b"\x05"
        return reply[1]


# --- §5.2: HTTP/1.1 proxy requests name their host in the target; Host is optional ---------


def test_connect_without_host_header_is_served(start_proxy: ProxyFactory, origin: Origin) -> None:
    with start_proxy(allow=[HOST], routes={HOST: origin.addr}) as p:
        assert p.http_addr is not None
        with socket.create_connection(p.http_addr, timeout=5) as sock:
            sock.sendall(f"CONNECT {HOST}:80 HTTP/1.1\r\n\r\n".encode())
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 200"), reply
            sock.sendall(
                f"GET /tunnelled HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert origin.requests[-1].path == "/tunnelled"


def test_connect_without_host_header_is_refused_by_policy(start_proxy: ProxyFactory) -> None:
    with start_proxy(allow=[HOST]) as p:
        status, headers, _ = head_of(
            exchange(p.http_addr, b"CONNECT other.example.test:443 HTTP/1.1\r\n\r\n")
        )
        assert status == 403
        assert headers["x-proxy-error"] == "blocked-by-allowlist"
        assert events_of(p) == [("deny", "not_allowed", "https_connect")]


def test_absolute_form_http11_without_host_is_forwarded(
    start_proxy: ProxyFactory, origin: Origin
) -> None:
    with start_proxy(allow=[HOST], routes={HOST: origin.addr}) as p:
        response = exchange(
            p.http_addr, f"GET http://{HOST}/x?q=1 HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
        )
        status, _, body = head_of(response)
        assert status == 200, response
        echoed = json.loads(body)
        assert echoed["path"] == "/x?q=1"
        assert echoed["headers"]["host"] == HOST


def test_invalid_host_without_host_header_is_audited(start_proxy: ProxyFactory) -> None:
    with start_proxy(allow=[HOST]) as p:
        for request in (
            b"GET http://bad_host!/ HTTP/1.1\r\n\r\n",
            b"CONNECT bad_host!:443 HTTP/1.1\r\n\r\n",
        ):
            status, _, _ = head_of(exchange(p.http_addr, request))
            assert status == 400
        assert [r for _, r, _ in events_of(p)] == ["invalid_host", "invalid_host"]


def test_origin_form_http11_without_host_is_400(start_proxy: ProxyFactory) -> None:
    with start_proxy(allow=[HOST]) as p:
        status, _, _ = head_of(exchange(p.http_addr, b"GET /x HTTP/1.1\r\n\r\n"))
        assert status == 400
        assert p.events() == []


# --- §5.1: Transfer-Encoding with Content-Length is 400 whatever the coding ----------------


@pytest.mark.parametrize("coding", [b"chunked", b"gzip", b"xchunked", b"chunked, identity"])
def test_te_and_cl_is_400(start_proxy: ProxyFactory, origin: Origin, coding: bytes) -> None:
    with start_proxy(allow=[HOST], routes={HOST: origin.addr}) as p:
        request = (
            b"POST http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n"
            b"Transfer-Encoding: " + coding + b"\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
        )
        status, _, _ = head_of(exchange(p.http_addr, request))
        assert status == 400
        assert origin.requests == []


# --- §4.2 one event per connection/request; §4.5 limited-mode refusals ---------------------


def test_limited_socks_non_443_is_one_method_not_allowed_event(
    start_proxy: ProxyFactory, origin: Origin
) -> None:
    with start_proxy(allow=[HOST], routes={HOST: origin.addr}, mode="limited") as p:
        assert socks_connect(p.socks_addr, HOST, 80) == 0x02
        assert events_of(p) == [("deny", "method_not_allowed", "socks5_tcp")]
        event = p.events()[0].to_dict()
        assert event["network.policy.source"] == "mode_guard"
        assert event["network.policy.scope"] == "non_domain"


def test_limited_socks_non_443_unlisted_host_reports_not_allowed(
    start_proxy: ProxyFactory,
) -> None:
    with start_proxy(allow=[HOST], mode="limited") as p:
        assert socks_connect(p.socks_addr, "other.example.test", 80) == 0x02
        assert events_of(p) == [("deny", "not_allowed", "socks5_tcp")]


def test_limited_upgrade_is_one_method_not_allowed_event(
    start_proxy: ProxyFactory, origin: Origin
) -> None:
    with start_proxy(allow=[HOST], routes={HOST: origin.addr}, mode="limited") as p:
        request = (
            b"GET http://api.example.test/ws HTTP/1.1\r\nHost: api.example.test\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        status, headers, _ = head_of(exchange(p.http_addr, request))
        assert status == 403
        assert headers["x-proxy-error"] == "blocked-by-method-policy"
        assert events_of(p) == [("deny", "method_not_allowed", "http")]
        assert origin.requests == []


def test_mitm_required_but_disabled_is_one_event(start_proxy: ProxyFactory) -> None:
    with start_proxy(
        allow=[HOST], routes={HOST: "127.0.0.1:9"}, mode="limited", mitm=MitmConfig(enabled=False)
    ) as p:
        status, headers, _ = head_of(
            exchange(
                p.http_addr, f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode()
            )
        )
        assert status == 403
        assert headers["x-proxy-error"] == "blocked-by-mitm-required"
        assert socks_connect(p.socks_addr, HOST, 443) == 0x02
        assert events_of(p) == [
            ("deny", "mitm_required", "https_connect"),
            ("deny", "mitm_required", "socks5_tcp"),
        ]


# --- §5.6 / §6 / §15: connect timeout → 504 upstream-timeout / SOCKS 0x06 -------------------


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A listener whose accept queue is full: new SYNs are dropped, so connecting times out."""
    with ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for _ in range(4):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with suppress(BlockingIOError):
                filler.connect(listener.getsockname())
        probe = stack.enter_context(socket.socket())
        probe.settimeout(0.3)
        try:
            probe.connect(listener.getsockname())
        except TimeoutError:
            yield listener.getsockname()[1]
            return
        pytest.fail("this kernel answers connections beyond the backlog; cannot test timeouts")


def test_connect_timeout_is_504_and_socks_0x06(
    start_proxy: ProxyFactory, unanswered_port: int
) -> None:
    limits = Limits(connect_timeout=0.5)
    route = {HOST: f"127.0.0.1:{unanswered_port}"}
    with start_proxy(allow=[HOST], routes=route, limits=limits) as p:
        status, headers, body = head_of(
            exchange(p.http_addr, f"CONNECT {HOST}:80 HTTP/1.1\r\nHost: {HOST}:80\r\n\r\n".encode())
        )
        assert status == 504
        assert headers["x-proxy-error"] == "upstream-timeout"
        assert headers["content-type"].startswith("text/plain") and 0 < len(body) < 200
        status, headers, _ = head_of(
            exchange(p.http_addr, f"GET http://{HOST}/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        )
        assert status == 504
        assert headers["x-proxy-error"] == "upstream-timeout"
        assert socks_connect(p.socks_addr, HOST, 80) == 0x06


# --- §8: the broker is reachable from a BackgroundProxy ------------------------------------


def test_background_proxy_exposes_its_broker(start_proxy: ProxyFactory) -> None:
    with start_proxy(allow=[HOST]) as p:
        assert p.broker is None
    with start_proxy(allow=[HOST], credential_broker=True) as p:
        assert p.broker is not None
        real = "ghp_" + "R" * 36
        env = p.broker.virtualize({"GH_TOKEN": real})
        assert env["GH_TOKEN"] != real and env["GH_TOKEN"].startswith("ghp_")
        assert env["NETPROXY_CREDENTIAL_BROKER_ACTIVE"] == "1"


# --- §15: limits apply on reload -----------------------------------------------------------


def test_reload_applies_dns_timeout(start_proxy: ProxyFactory) -> None:
    with start_proxy(allow=[HOST]) as p:
        assert p.proxy is not None
        p.reload(p.config.with_changes(limits=Limits(dns_timeout=0.5)))
        assert p.proxy.ctx.resolver.timeout == 0.5
