"""Graceful shutdown of `netproxy-core serve` (SPEC §12, §15 `shutdown_grace`).

tests/integration/test_cli.py already covers a short exchange finishing after SIGTERM/SIGINT
and idle keep-alive clients not holding the shutdown. Here: a long streaming download in
flight completes byte for byte, and an exchange that outlasts the grace period is cut at the
grace period — either way the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

API = "api.example.test"
CHUNK = b"z" * 65536
CHUNKS = 24  # 1.5 MiB, streamed over ~1.2 s


@contextmanager
def slow_origin(handler: Callable[[socket.socket, threading.Event], None]) -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                with suppress(OSError):
                    handler(conn, stop)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        thread.join(5)


def stream_body(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(CHUNK) * CHUNKS))
    for _ in range(CHUNKS):
        conn.sendall(CHUNK)
        time.sleep(0.05)  # a slow origin: the download spans the SIGTERM


def never_finish(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\nstart")
    stop.wait(30)


@contextmanager
def serve(
    tmp_path: Path, port: int, grace: float
) -> Iterator[tuple[subprocess.Popen[str], tuple[str, int]]]:
    config = tmp_path / "proxy.toml"
    config.write_text(
        'default_permissions = "ws"\n[permissions.ws.network]\nenable_socks5 = false\n'
        f"[permissions.ws.network.limits]\nshutdown_grace = {grace}\n"
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "netproxy_core",
            "serve",
            "--config",
            str(config),
            "--http-addr",
            "127.0.0.1:0",
            "--allow",
            API,
            "--route",
            f"{API}:80=127.0.0.1:{port}",
            "--home",
            str(tmp_path / "home"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the ready line (blocks until listening, or EOF)
        assert line, proc.stderr.read() if proc.stderr else ""
        host, _, http_port = json.loads(line)["http"].rpartition(":")
        yield proc, (host, int(http_port))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_long_download_in_flight_completes_after_sigterm(tmp_path: Path) -> None:
    with slow_origin(stream_body) as port, serve(tmp_path, port, grace=5) as (proc, addr):
        with socket.create_connection(addr, timeout=10) as sock:
            sock.sendall(f"GET http://{API}/big HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
            data = b""
            while len(data) < 2 * len(CHUNK):  # the download is under way
                chunk = sock.recv(65536)
                assert chunk
                data += chunk
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            while chunk := sock.recv(65536):
                data += chunk
        body = data.partition(b"\r\n\r\n")[2]
        assert data.startswith(b"HTTP/1.1 200") and body == CHUNK * CHUNKS
        assert proc.wait(10) == 0
        took = time.monotonic() - started
    print(f"\nshutdown: {len(body)} bytes in flight completed; exited 0 {took:.2f}s after SIGTERM")
    assert took < 5


@pytest.mark.parametrize("grace", [1.0])
def test_exchange_outlasting_the_grace_is_cut_and_exit_is_0(tmp_path: Path, grace: float) -> None:
    with slow_origin(never_finish) as port, serve(tmp_path, port, grace=grace) as (proc, addr):
        with socket.create_connection(addr, timeout=10) as sock:
            sock.sendall(f"GET http://{API}/stuck HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
            data = sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            cut = time.monotonic() - started
        assert proc.wait(10) == 0
        took = time.monotonic() - started
    print(
        f"\nshutdown: stuck exchange cut after {cut:.2f}s (grace {grace}s); "
        f"exit 0 after {took:.2f}s"
    )
    assert grace - 0.2 <= cut < grace + 3
    assert took < grace + 4
