"""Test origins: real HTTP/HTTPS servers on 127.0.0.1:0 that record what arrives.

`run_origin()` serves in a thread (so it works with sync clients and `BackgroundProxy`).
Paths: anything → 200 JSON echo of method/path/headers/body length;
``/status/N`` → status N; ``/bytes/N`` → N bytes of b"x" (streamed, Content-Length);
``/chunked/N`` → N bytes chunked; ``/drop`` → close without answering.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme

PUBLIC_NAMES = (
    "api.example.test",
    "www.example.test",
    "origin.example.test",
    "api.github.com",
    "uploads.github.com",
    "api.openai.com",
    "other.example.test",
)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Origin:
    host: str
    port: int
    tls: bool
    requests: list[Recorded] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    origin: Origin

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        body = self._body()
        rec = Recorded(
            self.command,
            self.path,
            {k.lower(): v for k, v in self.headers.items()},
            list(self.headers.items()),
            body,
        )
        self.origin.requests.append(rec)
        path = self.path.split("?")[0]
        if path == "/drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if path.startswith("/bytes/"):
            n = int(path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("content-length", str(n))
            self.end_headers()
            if self.command != "HEAD":
                chunk = b"x" * 65536
                while n > 0:
                    self.wfile.write(chunk[: min(n, len(chunk))])
                    n -= len(chunk)
            return
        if path.startswith("/chunked/"):
            n = int(path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            while n > 0:
                part = b"y" * min(n, 10000)
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                n -= len(part)
            self.wfile.write(b"0\r\n\r\n")
            return
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": rec.headers,
                "body_len": len(body),
                "tls": self.origin.tls,
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _serve


@contextmanager
def run_origin(
    ca: trustme.CA | None = None, names: tuple[str, ...] = PUBLIC_NAMES, host: str = "127.0.0.1"
) -> Iterator[Origin]:
    """Serve an origin; HTTPS with a certificate for `names` (+ localhost, 127.0.0.1) when `ca`."""
    origin = Origin(host, 0, ca is not None)
    handler = type("Handler", (_Handler,), {"origin": origin})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_cls = type(
        "Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True}
    )
    server = server_cls((host, 0), handler)
    if ca is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*names, "localhost", "127.0.0.1").configure_cert(context)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    origin.port = server.server_address[1]
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield origin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def write_ca(ca: trustme.CA, directory: Path) -> Path:
    path = directory / "origin-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
