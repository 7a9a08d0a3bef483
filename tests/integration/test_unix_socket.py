"""`x-unix-socket` requests (SPEC §5.6): allowlisted paths only, audited as unix-socket:0."""

from __future__ import annotations

import json
import logging
import os
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from netproxy_core import BackgroundProxy, ProxyConfig
from netproxy_core.config.model import Access, MitmConfig


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        record = {
            "method": self.command,
            "path": self.path,
            "body": body.decode(),
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        self.seen.append(record)
        payload = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _serve


@contextmanager
def unix_server(path: Path) -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    handler = type("H", (_Handler,), {"seen": seen})
    server = socketserver.ThreadingUnixStreamServer(str(path), handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes: pytest's tmp_path can be too long.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="np-") as d:
        yield Path(d) / "api.sock"


def curl_unix(
    proxy: BackgroundProxy, socket_path: str, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        [
            "/usr/bin/curl",
            "-sS",
            "--proxy",
            proxy.http_url,
            "-H",
            f"x-unix-socket: {socket_path}",
            "-w",
            "\n%{http_code}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def split(out: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    assert out.returncode == 0, out.stderr
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


def test_allowlisted_socket_is_used_and_audited(start_proxy, sock_path: Path) -> None:
    with (
        unix_server(sock_path) as seen,
        start_proxy(unix_sockets=((str(sock_path), Access.ALLOW),)) as p,
    ):
        code, body = split(curl_unix(p, str(sock_path), "http://localhost/v1.43/info?all=1"))
        assert code == 200
        assert json.loads(body)["path"] == "/v1.43/info?all=1"
        code, body = split(
            curl_unix(p, str(sock_path), "--data-binary", "payload", "http://docker/post")
        )
        assert code == 200 and json.loads(body)["body"] == "payload"
        events = [e.to_dict() for e in p.events()]
    assert len(events) == 2
    for event in events:
        assert event["server.address"] == "unix-socket" and event["server.port"] == 0
        assert event["network.transport.protocol"] == "unix_socket"
        assert event["network.policy.decision"] == "allow"
        assert str(sock_path) not in json.dumps(event)
    assert "x-unix-socket" not in seen[0]["headers"]


@pytest.mark.parametrize("allow_link", [False, True], ids=["request-via-symlink", "allow-symlink"])
def test_symlink_resolves_to_the_same_socket(
    start_proxy, sock_path: Path, allow_link: bool
) -> None:
    link = sock_path.parent / "link.sock"
    link.symlink_to(sock_path)
    allowed, requested = (link, sock_path) if allow_link else (sock_path, link)
    with unix_server(sock_path), start_proxy(unix_sockets=((str(allowed), Access.ALLOW),)) as p:
        code, _ = split(curl_unix(p, str(requested), "http://localhost/x"))
        assert code == 200


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({}, "ABS"),
        ({"unix_sockets": (("/nonexistent/other.sock", Access.ALLOW),)}, "ABS"),
        ({"dangerously_allow_all_unix_sockets": True}, "api.sock"),
        ({"dangerously_allow_all_unix_sockets": True}, "./api.sock"),
        (
            {"dangerously_allow_all_unix_sockets": True, "unix_sockets": (("ABS", Access.DENY),)},
            "ABS",
        ),
    ],
    ids=["empty", "other-path", "relative", "dot-relative", "deny-entry"],
)
def test_not_allowed_socket_is_403(
    start_proxy, sock_path: Path, config: dict[str, Any], path: str
) -> None:
    abs_path = str(sock_path)
    if "unix_sockets" in config:
        config = {
            **config,
            "unix_sockets": tuple(
                (abs_path if p == "ABS" else p, a) for p, a in config["unix_sockets"]
            ),
        }
    path = abs_path if path == "ABS" else path
    with unix_server(sock_path) as seen, start_proxy(**config) as p:
        code, body = split(curl_unix(p, path, "http://localhost/secret"))
        assert code == 403
        assert json.loads(body)["reason"] == "not_allowed"
        event = p.events()[-1].to_dict()
        assert event["network.policy.reason"] == "not_allowed"
        assert (event["server.address"], event["server.port"]) == ("unix-socket", 0)
    assert seen == []


def test_headers_of_refusal(start_proxy, sock_path: Path) -> None:
    with start_proxy() as p:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        out = subprocess.run(
            [
                "/usr/bin/curl",
                "-sS",
                "-i",
                "--proxy",
                p.http_url,
                "-H",
                f"x-unix-socket: {sock_path}",
                "http://localhost/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
    assert "x-proxy-error: blocked-by-allowlist" in out.stdout.lower()


def test_dangerous_allow_all_accepts_absolute_paths(start_proxy, sock_path: Path) -> None:
    with unix_server(sock_path), start_proxy(dangerously_allow_all_unix_sockets=True) as p:
        code, _ = split(curl_unix(p, str(sock_path), "http://localhost/any"))
        assert code == 200


def test_limited_mode_applies_to_unix_sockets(start_proxy, sock_path: Path) -> None:
    with (
        unix_server(sock_path) as seen,
        start_proxy(
            unix_sockets=((str(sock_path), Access.ALLOW),),
            mode="limited",
            mitm=MitmConfig(enabled=False),
        ) as p,
    ):
        assert split(curl_unix(p, str(sock_path), "http://localhost/get"))[0] == 200
        code, body = split(
            curl_unix(p, str(sock_path), "--data-binary", "x", "http://localhost/post")
        )
        assert code == 403 and json.loads(body)["reason"] == "method_not_allowed"
    assert [s["method"] for s in seen] == ["GET"]


def test_dead_allowlisted_socket_is_502(start_proxy, sock_path: Path) -> None:
    with start_proxy(unix_sockets=((str(sock_path), Access.ALLOW),)) as p:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        out = subprocess.run(
            [
                "/usr/bin/curl",
                "-sS",
                "-i",
                "--proxy",
                p.http_url,
                "-H",
                f"x-unix-socket: {sock_path}",
                "http://localhost/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
    assert out.stdout.startswith("HTTP/1.1 502")
    assert "x-proxy-error: upstream-error" in out.stdout.lower()


def test_unix_sockets_force_loopback_listeners(
    tmp_path: Path, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ProxyConfig(
        proxy_url="0.0.0.0:0",
        socks_url="0.0.0.0:0",
        dangerously_allow_non_loopback_proxy=True,
        unix_sockets=((str(sock_path), Access.ALLOW),),
    )
    with caplog.at_level(logging.WARNING, logger="netproxy"):  # noqa: SIM117
        with BackgroundProxy(config, home=tmp_path, upstream_env={}) as p:
            assert p.http_addr is not None and p.http_addr[0] == "127.0.0.1"
            assert p.socks_addr is not None and p.socks_addr[0] == "127.0.0.1"
    assert any("unix sockets" in r.getMessage() for r in caplog.records)
