"""Audit events through real listeners and the real `serve` process (SPEC §10).

One event per evaluation across HTTP, CONNECT, SOCKS5 TCP and unix sockets; the JSON-lines
file (also on stdout after the ready line); the `netproxy.audit` logger; OpenTelemetry (in
memory and over real OTLP/HTTP); no secret in any sink; slow or raising sinks never stall or
break requests.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from socketserver import ThreadingUnixStreamServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.sdk._logs import export as otel_export

from helpers.events import REQUIRED, RFC3339_MS_Z
from helpers.origins import Origin
from helpers.serve import clean_env, serving
from netproxy_core import BackgroundProxy, PolicyDecisionEvent, ProxyConfig
from netproxy_core.config.model import Access
from netproxy_core.otel import OtelSink

ALLOWED = "api.example.test"
BLOCKED = "other.example.test"


def _in_memory_exporter() -> Any:
    cls = getattr(otel_export, "InMemoryLogRecordExporter", None) or otel_export.InMemoryLogExporter
    return cls()


# --- a unix-socket HTTP origin -------------------------------------------------------------


class _UnixHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def address_string(self) -> str:
        return "unix"

    def do_GET(self) -> None:
        body = b"unix ok"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def unix_origin() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="np-", dir="/tmp")  # short: sun_path is ~108 bytes
    path = os.path.join(directory, "s.sock")
    server = ThreadingUnixStreamServer(path, _UnixHandler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        shutil.rmtree(directory, ignore_errors=True)


def _unix_request(proxy: BackgroundProxy, path: str) -> bytes:
    assert proxy.http_addr is not None
    with socket.create_connection(proxy.http_addr, timeout=10) as sock:
        sock.sendall(
            f"GET /info HTTP/1.1\r\nHost: localhost\r\nx-unix-socket: {path}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


# --- one event per evaluation --------------------------------------------------------------


def test_one_event_per_evaluation_across_protocols(
    start_proxy: Any, origin: Origin, tls_origin: Origin, origin_ca_file: Path
) -> None:
    routes = {f"{ALLOWED}:80": origin.addr, f"{ALLOWED}:443": tls_origin.addr}
    with (
        unix_origin() as sock_path,
        start_proxy(allow=[ALLOWED], routes=routes, unix_sockets=((sock_path, Access.ALLOW),)) as p,
    ):
        seen: list[dict[str, Any]] = []

        def step(expect: tuple[str, str, str, int, str]) -> None:
            events = [e.to_dict() for e in p.events()]
            new = events[len(seen) :]
            assert len(new) == 1, new  # exactly one event for the evaluation
            seen.extend(new)
            event = new[0]
            assert set(event) == REQUIRED
            assert RFC3339_MS_Z.match(event["event.timestamp"])
            assert event["client.address"].startswith("127.0.0.1:")
            got = (
                event["network.transport.protocol"],
                event["network.policy.decision"],
                event["server.address"],
                event["server.port"],
                event["http.request.method"],
            )
            assert got == expect

        with httpx.Client(proxy=p.http_url, trust_env=False, timeout=10) as c:
            assert c.get(f"http://{ALLOWED}/a").status_code == 200
        step(("http", "allow", ALLOWED, 80, "GET"))
        with httpx.Client(proxy=p.http_url, trust_env=False, timeout=10) as c:
            assert c.post(f"http://{BLOCKED}/b", content=b"x").status_code == 403
        step(("http", "deny", BLOCKED, 80, "POST"))
        verify = ssl.create_default_context(cafile=str(origin_ca_file))
        with httpx.Client(proxy=p.http_url, verify=verify, trust_env=False, timeout=10) as c:
            assert c.get(f"https://{ALLOWED}/c").status_code == 200
        step(("https_connect", "allow", ALLOWED, 443, "CONNECT"))
        with (
            httpx.Client(proxy=p.http_url, verify=verify, trust_env=False, timeout=10) as c,
            pytest.raises(httpx.ProxyError),
        ):
            c.get(f"https://{BLOCKED}/d")
        step(("https_connect", "deny", BLOCKED, 443, "CONNECT"))
        assert _unix_request(p, sock_path).endswith(b"unix ok")
        step(("unix_socket", "allow", "unix-socket", 0, "GET"))
        assert b" 403 " in _unix_request(p, sock_path + ".other").split(b"\r\n")[0] + b" "
        step(("unix_socket", "deny", "unix-socket", 0, "GET"))
        with httpx.Client(proxy=p.socks_url, trust_env=False, timeout=10) as c:
            assert c.get(f"http://{ALLOWED}/e").status_code == 200
        step(("socks5_tcp", "allow", ALLOWED, 80, "none"))
        with (
            httpx.Client(proxy=p.socks_url, trust_env=False, timeout=10) as c,
            pytest.raises(httpx.ProxyError),
        ):
            c.get(f"http://{BLOCKED}/f")
        step(("socks5_tcp", "deny", BLOCKED, 80, "none"))
        assert [r.host for r in p.blocked()] == [BLOCKED, BLOCKED, "unix-socket", BLOCKED]


# --- sinks never stall or break requests ----------------------------------------------------


def test_raising_and_slow_sinks_do_not_stall_requests(
    tmp_path: Path, origin: Origin, origin_ca_file: Path
) -> None:
    slow_got: list[str] = []

    def raising(event: PolicyDecisionEvent) -> None:
        raise RuntimeError("broken sink")

    def slow(event: PolicyDecisionEvent) -> None:
        time.sleep(1)
        slow_got.append(event.host)

    config = ProxyConfig(
        proxy_url="127.0.0.1:0",
        socks_url="127.0.0.1:0",
        domains=((ALLOWED, Access.ALLOW),),
        routes=((f"{ALLOWED}:80", origin.addr),),
    )
    with BackgroundProxy(
        config, home=tmp_path / "home", sinks=(raising, slow), upstream_env={}
    ) as p:
        with httpx.Client(proxy=p.http_url, trust_env=False, timeout=10) as c:
            statuses = [c.get(f"http://{ALLOWED}/{i}").status_code for i in range(3)]
            statuses.append(c.get(f"http://{BLOCKED}/").status_code)
        # Had the slow sink run on the request path, all four would have been delivered
        # before the last response (4 s); the requests finished long before that.
        delivered_when_done = len(slow_got)
        assert statuses == [200, 200, 200, 403]
        assert delivered_when_done < 4
        assert len(p.events()) == 4
    assert slow_got == [ALLOWED] * 3 + [BLOCKED]  # shutdown let the slow sink catch up


# --- no secrets anywhere --------------------------------------------------------------------

SECRETS = {
    "path": "PathSecret7f3a",
    "query": "QuerySecret91bc",
    "authorization": "AuthSecret4d2e",
    "cookie": "CookieSecret88aa",
    "api_key": "ApiKeySecret5c1d",
    "userinfo": "UserinfoSecret2b9f",
    "proxy_auth": "ProxyAuthSecret6e0a",
    "admin": "AdminTokenSecret3f7c",
}


def test_no_secret_reaches_any_sink(
    tmp_path: Path,
    origin: Origin,
    tls_origin: Origin,
    origin_ca_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit_log = tmp_path / "audit.jsonl"
    exporter = _in_memory_exporter()
    otel = OtelSink(exporter=exporter)
    collected: list[dict[str, Any]] = []
    config = ProxyConfig(
        proxy_url="127.0.0.1:0",
        socks_url="127.0.0.1:0",
        domains=((ALLOWED, Access.ALLOW),),
        routes=((f"{ALLOWED}:80", origin.addr), (f"{ALLOWED}:443", tls_origin.addr)),
        upstream_ca_files=(str(origin_ca_file),),
        audit_log=str(audit_log),
        admin_url="127.0.0.1:0",
        admin_token=SECRETS["admin"],
        proxy_auth_token=SECRETS["proxy_auth"],
    )
    s = SECRETS
    headers = {
        "Authorization": f"Bearer {s['authorization']}",
        "Cookie": f"session={s['cookie']}",
        "X-Api-Key": s["api_key"],
    }
    caplog.set_level(logging.INFO, logger="netproxy.audit")
    sinks = (otel, lambda e: collected.append(e.to_dict()))
    with BackgroundProxy(config, home=tmp_path / "home", sinks=sinks, upstream_env={}) as p:
        assert p.http_addr is not None
        proxy_url = f"http://user:{s['proxy_auth']}@{p.http_addr[0]}:{p.http_addr[1]}"
        verify = ssl.create_default_context(cafile=str(origin_ca_file))
        with httpx.Client(proxy=proxy_url, verify=verify, trust_env=False, timeout=10) as c:
            for host in (ALLOWED, BLOCKED):
                for scheme in ("http", "https"):
                    url = f"{scheme}://me:{s['userinfo']}@{host}/{s['path']}/x?key={s['query']}&q=1"
                    try:
                        c.get(url, headers=headers)
                    except httpx.ProxyError:
                        assert host == BLOCKED
        # the secrets did travel (positive control)
        assert any(s["path"] in r.path and s["query"] in r.path for r in origin.requests)
        assert any(s["cookie"] in r.headers.get("cookie", "") for r in tls_origin.requests)

        assert p.proxy is not None and p.proxy.handle is not None
        admin_addr = p.proxy.handle.admin_addr
        assert admin_addr is not None
        admin = f"http://{admin_addr[0]}:{admin_addr[1]}"
        auth = {"Authorization": f"Bearer {s['admin']}"}
        with httpx.Client(trust_env=False, timeout=10) as a:
            admin_text = "".join(
                a.get(admin + route, headers=auth).text
                for route in ("/events", "/blocked", "/config", "/health")
            )
            assert "***" in a.get(admin + "/config", headers=auth).text
        assert p.proxy.audit.flush(10)
        assert otel.flush()
        ring_text = json.dumps([e.to_dict() for e in p.events()])
    otel_text = json.dumps(
        [
            {"attrs": dict(d.log_record.attributes or {}), "body": str(d.log_record.body)}
            for d in exporter.get_finished_logs()
        ]
    )
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    sinks = {
        "ring": ring_text,
        "jsonl": audit_log.read_text(),
        "logger": log_text,
        "otel": otel_text,
        "sink": json.dumps(collected),
        "admin": admin_text,
    }
    for name, text in sinks.items():
        assert ALLOWED in text or name == "admin", name  # each sink really saw the events
        for kind, secret in SECRETS.items():
            assert secret not in text, f"{kind} secret leaked into {name}"
    assert BLOCKED in sinks["ring"] and BLOCKED in sinks["jsonl"]
    assert len(json.loads(ring_text)) == 4


# --- the serve process: --audit-log, stdout, OTLP/HTTP --------------------------------------


@contextmanager
def serve(tmp_path: Path, *args: str) -> Iterator[tuple[dict[str, Any], queue.Queue[str | None]]]:
    """Run `netproxy-core serve` on ephemeral ports; yield (ready line, later stdout lines)."""
    with serving(tmp_path, *args) as server:
        yield server.ready, server.stdout


def _get(ready: dict[str, Any], url: str) -> int:
    with httpx.Client(proxy=f"http://{ready['http']}", trust_env=False, timeout=10) as c:
        return c.get(url).status_code


def test_serve_audit_log_file(tmp_path: Path, origin: Origin) -> None:
    audit = tmp_path / "audit.jsonl"
    with serve(
        tmp_path,
        "--allow",
        ALLOWED,
        "--route",
        f"{ALLOWED}:80={origin.addr}",
        "--audit-log",
        str(audit),
    ) as (ready, _):
        assert _get(ready, f"http://{ALLOWED}/x?secret=QuerySecret") == 200
        assert _get(ready, f"http://{BLOCKED}/y") == 403
        events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["server.address"], e["network.policy.decision"]) for e in events] == [
        (ALLOWED, "allow"),
        (BLOCKED, "deny"),
    ]
    for event in events:
        assert set(event) == REQUIRED
        assert RFC3339_MS_Z.match(event["event.timestamp"])
    assert "QuerySecret" not in audit.read_text()


def test_serve_audit_log_stdout_after_ready_line(tmp_path: Path, origin: Origin) -> None:
    with serve(
        tmp_path, "--allow", ALLOWED, "--route", f"{ALLOWED}:80={origin.addr}", "--audit-log", "-"
    ) as (ready, lines):
        assert ready["event"] == "ready"  # the first stdout line
        assert _get(ready, f"http://{ALLOWED}/x") == 200
        assert _get(ready, f"http://{BLOCKED}/y") == 403
        events = [json.loads(lines.get(timeout=10)) for _ in range(2)]
    assert [e["server.address"] for e in events] == [ALLOWED, BLOCKED]
    assert all(set(e) == REQUIRED for e in events)


class _OtlpReceiver(BaseHTTPRequestHandler):
    bodies: list[tuple[str, str, bytes]]
    got: threading.Event

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.bodies.append((self.path, self.headers.get("content-type", ""), body))
        self.got.set()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, str, bytes]], threading.Event]]:
    bodies: list[tuple[str, str, bytes]] = []
    got = threading.Event()
    handler = type("Receiver", (_OtlpReceiver,), {"bodies": bodies, "got": got})
    server: HTTPServer = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies, got
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_serve_exports_otlp_http(tmp_path: Path, origin: Origin) -> None:
    with otlp_receiver() as (endpoint, bodies, got):
        config = tmp_path / "netproxy.toml"
        config.write_text(
            f'default_permissions = "w"\n[permissions.w.network.otel]\nendpoint = "{endpoint}"\n'
        )
        with serve(
            tmp_path,
            "--config",
            str(config),
            "--otel",
            "--allow",
            ALLOWED,
            "--route",
            f"{ALLOWED}:80={origin.addr}",
        ) as (ready, _):
            assert _get(ready, f"http://{ALLOWED}/x?token=QuerySecret") == 200
            assert _get(ready, f"http://{BLOCKED}/y") == 403
            # the batch processor exports within its schedule delay, else at shutdown
            assert got.wait(30), "no OTLP export arrived"
    path, content_type, _ = bodies[0]
    assert path == "/v1/logs" and content_type == "application/x-protobuf"
    raw = b"".join(b for _, _, b in bodies)
    assert b"netproxy.policy_decision" in raw and b"QuerySecret" not in raw
    records = []
    for _, _, data in bodies:
        request = ExportLogsServiceRequest.FromString(data)
        for rl in request.resource_logs:
            for sl in rl.scope_logs:
                records.extend(sl.log_records)
    attrs = [{kv.key: kv.value for kv in r.attributes} for r in records]
    hosts = sorted(a["server.address"].string_value for a in attrs)
    assert hosts == sorted([ALLOWED, BLOCKED])
    assert all(set(a) == REQUIRED for a in attrs)
    assert {r.event_name for r in records} == {"netproxy.policy_decision"}


def test_serve_otel_bad_protocol_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[permissions.full.network.otel]\nprotocol = "grpc-over-smoke"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "netproxy_core",
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--no-socks5",
            "--home",
            str(tmp_path / "h"),
            "--config",
            str(config),
            "--otel",
            "--allow",
            ALLOWED,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(tmp_path / "h"),
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("netproxy-core: error: otel.protocol")
    assert len(result.stderr.strip().splitlines()) == 1
