"""Request-target classification, hop-by-hop stripping and proxy auth (SPEC §5)."""

from __future__ import annotations

import base64

import pytest

from netproxy_core.policy.model import Reason
from netproxy_core.proto.http_head import (
    Connect,
    Forward,
    Reject,
    authority_for,
    check_proxy_auth,
    classify,
    strip_hop_by_hop,
)

FORMS = [
    pytest.param(
        b"GET",
        b"http://Example.COM/a?b=1",
        [],
        Forward("http", "example.com", 80, b"/a?b=1", b"Example.COM", True),
        id="absolute-http",
    ),
    pytest.param(
        b"GET",
        b"https://example.com:8443/",
        [],
        Forward("https", "example.com", 8443, b"/", b"example.com:8443", True),
        id="absolute-https-port",
    ),
    pytest.param(
        b"GET",
        b"http://example.com",
        [],
        Forward("http", "example.com", 80, b"/", b"example.com", True),
        id="absolute-no-path",
    ),
    pytest.param(
        b"GET",
        b"http://example.com?q",
        [],
        Forward("http", "example.com", 80, b"/?q", b"example.com", True),
        id="absolute-query-no-path",
    ),
    pytest.param(
        b"GET",
        b"http://example.com/p#frag",
        [],
        Forward("http", "example.com", 80, b"/p", b"example.com", True),
        id="fragment-dropped",
    ),
    pytest.param(
        b"GET",
        b"ws://example.com/chat",
        [],
        Forward("ws", "example.com", 80, b"/chat", b"example.com", True),
        id="ws",
    ),
    pytest.param(
        b"GET",
        b"http://[::1]:8080/",
        [],
        Forward("http", "::1", 8080, b"/", b"[::1]:8080", True),
        id="ipv6-literal",
    ),
    pytest.param(
        b"GET",
        b"http://2130706433/",
        [],
        Forward("http", "127.0.0.1", 80, b"/", b"2130706433", True),
        id="decimal-ipv4-canonical",
    ),
    pytest.param(
        b"GET",
        b"/x",
        [(b"host", b"example.com:81")],
        Forward("http", "example.com", 81, b"/x", b"example.com:81", False),
        id="origin-form",
    ),
    pytest.param(b"CONNECT", b"example.com:443", [], Connect("example.com", 443), id="connect"),
    pytest.param(b"CONNECT", b"[::1]:22", [], Connect("::1", 22), id="connect-ipv6"),
    pytest.param(
        b"CONNECT", b"EXAMPLE.com.:443", [], Connect("example.com", 443), id="connect-canonical"
    ),
]


@pytest.mark.parametrize(("method", "target", "headers", "expected"), FORMS)
def test_classify_forms(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], expected: Forward | Connect
) -> None:
    assert classify(method, target, headers) == expected


REJECTS = [
    pytest.param(b"GET", b"/x", [], 400, None, id="no-host"),
    pytest.param(b"CONNECT", b"example.com", [], 400, Reason.INVALID_HOST, id="connect-no-port"),
    pytest.param(b"CONNECT", b"exa mple.com:443", [], 400, Reason.INVALID_HOST, id="connect-space"),
    pytest.param(b"CONNECT", b"a..b:443", [], 400, Reason.INVALID_HOST, id="connect-empty-label"),
    pytest.param(
        b"CONNECT", b"example.com:0", [], 400, Reason.INVALID_HOST, id="connect-port-zero"
    ),
    pytest.param(b"GET", b"http://user@example.com/", [], 400, Reason.INVALID_HOST, id="userinfo"),
    pytest.param(
        b"GET", b"http://exa%2emple.com/", [], 400, Reason.INVALID_HOST, id="percent-in-host"
    ),
    pytest.param(b"GET", b"ftp://example.com/", [], 400, None, id="unsupported-scheme"),
    pytest.param(
        b"GET",
        b"http://a.com/",
        [(b"host", b"b.com")],
        400,
        Reason.HOST_MISMATCH,
        id="host-mismatch",
    ),
    pytest.param(
        b"GET",
        b"http://a.com/",
        [(b"host", b"a.com:8080")],
        400,
        Reason.HOST_MISMATCH,
        id="host-port-mismatch",
    ),
    pytest.param(
        b"GET", b"/x", [(b"host", b"bad host")], 400, Reason.INVALID_HOST, id="bad-host-header"
    ),
]


@pytest.mark.parametrize(("method", "target", "headers", "status", "reason"), REJECTS)
def test_classify_rejects(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    status: int,
    reason: Reason | None,
) -> None:
    result = classify(method, target, headers)
    assert isinstance(result, Reject)
    assert (result.status, result.reason) == (status, reason)


def test_host_header_with_default_port_matches() -> None:
    assert isinstance(classify(b"GET", b"http://a.com:80/", [(b"host", b"A.com")]), Forward)


def test_strip_hop_by_hop_removes_listed_and_standard_headers() -> None:
    headers = [
        (b"host", b"a"),
        (b"connection", b"keep-alive, x-secret"),
        (b"x-secret", b"1"),
        (b"keep-alive", b"5"),
        (b"proxy-authorization", b"Basic x"),
        (b"te", b"trailers"),
        (b"upgrade", b"websocket"),
        (b"x-end", b"kept"),
    ]
    assert strip_hop_by_hop(headers) == [(b"host", b"a"), (b"x-end", b"kept")]


def test_strip_hop_by_hop_keeps_upgrade_for_websocket() -> None:
    headers = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"host", b"a")]
    assert strip_hop_by_hop(headers, keep_upgrade=True) == [
        (b"upgrade", b"websocket"),
        (b"host", b"a"),
        (b"connection", b"upgrade"),
    ]


def _basic(user: str, password: str) -> list[tuple[bytes, bytes]]:
    return [(b"proxy-authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode()))]


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        pytest.param(_basic("any", "s3cret"), True, id="any-user"),
        pytest.param(_basic("", "s3cret"), True, id="empty-user"),
        pytest.param(_basic("s3cret", ""), False, id="token-as-user"),
        pytest.param(_basic("any", "wrong"), False, id="wrong"),
        pytest.param([(b"proxy-authorization", b"Bearer s3cret")], False, id="bearer"),
        pytest.param([(b"proxy-authorization", b"Basic !!!")], False, id="bad-base64"),
        pytest.param([], False, id="missing"),
    ],
)
def test_proxy_auth(headers: list[tuple[bytes, bytes]], ok: bool) -> None:
    assert check_proxy_auth(headers, "s3cret") is ok


def test_authority_for_omits_default_port() -> None:
    assert authority_for("a.com", 443, "https") == b"a.com"
    assert authority_for("::1", 8080, "http") == b"[::1]:8080"
