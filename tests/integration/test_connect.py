"""CONNECT tunnels (SPEC §5.6, §4.6): policy first, dial before answering, then relay bytes."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.origins import Origin
from netproxy_core import BackgroundProxy
from netproxy_core.config.model import Limits, MitmConfig

API = "api.example.test"


def open_tunnel(proxy: BackgroundProxy, target: str) -> tuple[socket.socket, bytes]:
    """Send CONNECT; returns the socket and the response head (+ body for refusals)."""
    addr = proxy.http_addr
    assert addr is not None
    sock = socket.create_connection(addr, timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        rest += chunk
    return sock, head + b"\r\n\r\n" + rest


def status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def headers_of(data: bytes) -> dict[str, str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
    }


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_connect_then_tls_end_to_end(start_proxy, tls_origin: Origin, origin_ca_file: Path) -> None:
    with start_proxy(allow=[API], routes={f"{API}:443": tls_origin.addr}) as p:
        sock, head = open_tunnel(p, f"{API}:443")
        assert status(head) == 200
        context = ssl.create_default_context(cafile=str(origin_ca_file))
        with context.wrap_socket(sock, server_hostname=API) as tls:
            tls.sendall(
                f"GET /through HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        assert status(data) == 200
        assert json.loads(body_of(data))["tls"] is True
        event = p.events()[-1]
        assert (event.protocol, event.method, event.port, event.decision) == (
            "https_connect",
            "CONNECT",
            443,
            "allow",
        )
    assert tls_origin.requests[0].path == "/through"


def test_connect_with_httpx_requests_and_curl(
    start_proxy, tls_origin: Origin, origin_ca_file: Path
) -> None:
    with start_proxy(allow=[API], routes={f"{API}:443": tls_origin.addr}) as p:
        context = ssl.create_default_context(cafile=str(origin_ca_file))
        with httpx.Client(proxy=p.http_url, verify=context) as client:
            assert client.get(f"https://{API}/httpx").json()["path"] == "/httpx"
        import requests

        r = requests.get(
            f"https://{API}/requests",
            proxies={"https": p.http_url},
            verify=str(origin_ca_file),
            timeout=10,
        )
        assert r.json()["path"] == "/requests"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        out = subprocess.run(
            [
                "/usr/bin/curl",
                "-sS",
                "--proxy",
                p.http_url,
                "--cacert",
                str(origin_ca_file),
                f"https://{API}/curl",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["path"] == "/curl"


def test_connect_large_transfer(start_proxy, tls_origin: Origin, origin_ca_file: Path) -> None:
    n = 8 * 1024 * 1024
    with start_proxy(allow=[API], routes={f"{API}:443": tls_origin.addr}) as p:
        context = ssl.create_default_context(cafile=str(origin_ca_file))
        with httpx.Client(proxy=p.http_url, verify=context) as client:
            r = client.get(f"https://{API}/bytes/{n}")
    assert r.status_code == 200 and len(r.content) == n


@pytest.mark.parametrize("how", ["exact-allow", "route"])
def test_connect_to_dead_upstream_is_502(start_proxy, how: str) -> None:
    port = closed_port()
    if how == "exact-allow":
        config: dict[str, Any] = {"allow": ["127.0.0.1"]}
        target = f"127.0.0.1:{port}"
    else:
        config = {"allow": [API], "routes": {f"{API}:443": f"127.0.0.1:{port}"}}
        target = f"{API}:443"
    with start_proxy(**config) as p:
        sock, data = open_tunnel(p, target)
        sock.close()
        assert status(data) == 502
        assert headers_of(data)["x-proxy-error"] == "upstream-error"
        assert p.events()[-1].decision == "allow"  # policy allowed it; the dial failed


def test_connect_timeout_is_504(start_proxy) -> None:
    """A connect deadline that has already passed when the dial starts is deterministic."""
    with start_proxy(allow=["127.0.0.1"], limits=Limits(connect_timeout=1e-9)) as p:
        listener = socket.create_server(("127.0.0.1", 0))
        try:
            sock, data = open_tunnel(p, f"127.0.0.1:{listener.getsockname()[1]}")
            sock.close()
        finally:
            listener.close()
        assert status(data) == 504
        assert headers_of(data)["x-proxy-error"] == "upstream-timeout"


@pytest.mark.parametrize(
    ("config", "target", "reason", "proxy_error"),
    [
        ({"allow": [API]}, "other.example.test:443", "not_allowed", "blocked-by-allowlist"),
        ({"allow": [API]}, "127.0.0.1:443", "not_allowed_local", "blocked-by-allowlist"),
        ({"allow": [API]}, "[::ffff:127.0.0.1]:443", "not_allowed_local", "blocked-by-allowlist"),
        (
            {"allow": ["**.example.test"], "deny": [API]},
            f"{API}:443",
            "denied",
            "blocked-by-denylist",
        ),
        (
            {"allow": [API], "mode": "limited", "mitm": MitmConfig(enabled=False)},
            f"{API}:443",
            "mitm_required",
            "blocked-by-mitm-required",
        ),
    ],
    ids=["not_allowed", "not_allowed_local", "mapped-v6-local", "denied", "mitm_required"],
)
def test_refused_connect_is_403_text(
    start_proxy,
    tls_origin: Origin,
    config: dict[str, Any],
    target: str,
    reason: str,
    proxy_error: str,
) -> None:
    with start_proxy(routes={f"{API}:443": tls_origin.addr}, **config) as p:
        sock, data = open_tunnel(p, target)
        sock.close()
        assert status(data) == 403
        headers = headers_of(data)
        assert headers["x-proxy-error"] == proxy_error
        assert headers["content-type"].startswith("text/plain")
        text = body_of(data).decode()
        assert text.strip() and text[-1] == "\n" and "{" not in text
        event = p.events()[-1]
        assert (event.reason, event.protocol) == (reason, "https_connect")
    assert tls_origin.requests == []


def test_connect_proxy_disabled_is_503(start_proxy) -> None:
    with start_proxy(allow=[API]) as p:
        assert p.proxy is not None
        p.proxy.state.set_enabled(False)
        sock, data = open_tunnel(p, f"{API}:443")
        sock.close()
        assert status(data) == 503
        assert "x-proxy-error" not in headers_of(data)


def test_connect_to_port_zero_or_missing_port_is_400(start_proxy) -> None:
    with start_proxy(allow=[API]) as p:
        for target in (f"{API}:0", API, f"{API}:99999"):
            sock, data = open_tunnel(p, target)
            sock.close()
            assert status(data) == 400, target


def test_connect_sni_mismatch_is_refused(
    start_proxy, tls_origin: Origin, origin_ca_file: Path
) -> None:
    with start_proxy(allow=[API], routes={f"{API}:443": tls_origin.addr}) as p:
        sock, head = open_tunnel(p, f"{API}:443")
        assert status(head) == 200
        context = ssl.create_default_context(cafile=str(origin_ca_file))
        with pytest.raises((ssl.SSLError, OSError)):  # noqa: SIM117
            with context.wrap_socket(sock, server_hostname="other.example.test") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n")
                assert tls.recv(1) == b""
                raise OSError("closed")
        assert p.events()[-1].reason == "host_mismatch"
    assert tls_origin.requests == []
