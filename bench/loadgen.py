"""Clients for run_all.py: HTTP load (wrk, else asyncio), downloads, tunnels, MITM TLS.

All measurements run on the load core (the harness pins itself there) against 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from peers import LOAD_CORE, pinned


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int  # completed in the round


# --- plain HTTP load -------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "GET"
wrk.path = "{path}"
wrk.headers["Host"] = "{host}"
{close}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def http_load(
    addr: tuple[str, int], path: str, host: str, c: int, seconds: float, close: bool
) -> Load:
    if shutil.which("wrk"):
        return _wrk(addr, path, host, c, seconds, close)
    return _py_load(addr, path, host, c, seconds, close)


def _wrk(addr: tuple[str, int], path: str, host: str, c: int, seconds: float, close: bool) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(
            WRK_SCRIPT.format(
                path=path, host=host, close='wrk.headers["Connection"] = "close"' if close else ""
            )
        )
    cmd = pinned(
        LOAD_CORE,
        [
            "wrk",
            "-t1",
            f"-c{c}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "5s",
            "-s",
            f.name,
            f"http://{addr[0]}:{addr[1]}/",
        ],
    )
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    finally:
        Path(f.name).unlink()
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise RuntimeError(f"wrk gave no result: {out[-300:]!r}")
    reqs, dur_us, p50, p99, errors = (int(x) for x in m.groups())
    return Load(reqs / (dur_us / 1e6), p50 / 1000, p99 / 1000, errors, reqs)


async def _py_client(
    addr: tuple[str, int],
    request: bytes,
    deadline: float,
    lat: list[float],
    errs: list[int],
    close: bool,
) -> None:
    reader = writer = None
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            if reader is None or writer is None:
                reader, writer = await asyncio.open_connection(*addr)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            errs[0] += 1
            reader = writer = None
            continue
        lat.append(time.perf_counter() - start)
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def _py_load_proc(
    addr: tuple[str, int],
    request: bytes,
    c: int,
    seconds: float,
    close: bool,
    out: multiprocessing.Queue[tuple[float, list[float], int]],
) -> None:
    async def main() -> tuple[float, list[float], int]:
        lat: list[float] = []
        errs = [0]
        start = time.monotonic()
        await asyncio.gather(
            *(_py_client(addr, request, start + seconds, lat, errs, close) for _ in range(c))
        )
        return time.monotonic() - start, lat, errs[0]

    out.put(asyncio.run(main()))


def _py_load(
    addr: tuple[str, int], path: str, host: str, c: int, seconds: float, close: bool
) -> Load:
    conn = "Connection: close\r\n" if close else ""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{conn}\r\n".encode()
    q: multiprocessing.Queue[tuple[float, list[float], int]] = multiprocessing.Queue()
    p = multiprocessing.Process(target=_py_load_proc, args=(addr, request, c, seconds, close, q))
    p.start()
    elapsed, lat, errors = q.get(timeout=seconds + 60)
    p.join(10)
    lat.sort()
    p50 = lat[len(lat) // 2] if lat else 0.0
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0
    return Load(len(lat) / elapsed, p50 * 1000, p99 * 1000, errors, len(lat))


def first_response(proxy: tuple[str, int], path: str, host: str, timeout: float = 30) -> float:
    """perf_counter() when a GET through `proxy` first comes back 200 (retried until then).

    "Listening" alone can flatter a proxy that binds its port before it can serve; this is
    the moment a client is actually answered.
    """
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(proxy, timeout=timeout) as s:
                s.sendall(request)
                if _read_head(s).startswith(b"HTTP/1.1 200"):
                    return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.001)
    raise RuntimeError(f"no 200 through {proxy} within {timeout:.0f} s")


# --- tunnels ---------------------------------------------------------------------------------


def _read_head(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise EOFError(f"closed during the reply: {data[:80]!r}")
        data += chunk
    return data


def connect_tunnel(proxy: tuple[str, int], target: str, timeout: float = 10) -> socket.socket:
    s = socket.create_connection(proxy, timeout=timeout)
    try:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = _read_head(s)
        if not head.split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"]:
            raise RuntimeError(f"CONNECT {target} refused: {head[:80]!r}")
    except BaseException:
        s.close()
        raise
    return s


def socks_tunnel(proxy: tuple[str, int], host: str, port: int) -> socket.socket:
    s = socket.create_connection(proxy, timeout=10)
    name = host.encode()
    s.sendall(b"\x05\x01\x00")
    if s.recv(2) != b"\x05\x00":
        raise RuntimeError("SOCKS5 greeting refused")
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", port))
    head = b""
    while len(head) < 10:
        chunk = s.recv(10 - len(head))
        if not chunk:
            raise RuntimeError("SOCKS5 CONNECT closed")
        head += chunk
    if head[1] != 0:
        raise RuntimeError(f"SOCKS5 CONNECT refused with code {head[1]}")
    return s


def download(s: socket.socket, path: str, host: str, size: int) -> float:
    """MB/s of one GET of `size` body bytes on an open socket (direct, CONNECT or SOCKS)."""
    with s:
        s.settimeout(60)
        buf = memoryview(bytearray(1 << 20))
        start = time.perf_counter()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        got = 0
        while got < size:
            k = s.recv_into(buf)
            if not k:
                break
            got += k
        elapsed = time.perf_counter() - start
    if got < size:
        raise RuntimeError(f"download ended after {got} of {size} bytes")
    return got / elapsed / 1e6


def connect_setups(proxy: tuple[str, int] | None, target: str, n: int) -> float:
    """ms for n sequential CONNECT set-ups (direct: n TCP connects to the origin)."""
    _host, port = target.rsplit(":", 1)
    start = time.perf_counter()
    for _ in range(n):
        if proxy is None:
            socket.create_connection(("127.0.0.1", int(port)), timeout=10).close()
        else:
            connect_tunnel(proxy, target).close()
    return (time.perf_counter() - start) * 1000


def hold_tunnels(
    proxy: tuple[str, int], target: str, n: int, deadline: float
) -> tuple[list[socket.socket], int]:
    held: list[socket.socket] = []
    errors = 0
    for _ in range(n):
        if time.monotonic() > deadline:
            errors += 1
            continue
        try:
            held.append(connect_tunnel(proxy, target, timeout=5))
        except (OSError, RuntimeError, EOFError):
            errors += 1
    return held, errors


# --- MITM HTTPS ------------------------------------------------------------------------------


@dataclass
class TlsTarget:
    """How a client reaches an HTTPS origin: directly or through a CONNECT proxy."""

    proxy: tuple[str, int] | None
    origin_port: int
    cafile: str
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cafile)
        ctx.check_hostname = self.check_hostname
        return ctx


async def _tls_open(
    t: TlsTarget, ctx: ssl.SSLContext, connect_to: str, sni: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if t.proxy is None:
        reader, writer = await asyncio.open_connection(connect_to, t.origin_port)
    else:
        reader, writer = await asyncio.open_connection(*t.proxy)
        target = f"{connect_to}:{t.origin_port if connect_to[0].isdigit() else 443}"
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.split(b" ", 2)[1:2] == [b"200"]:
            raise RuntimeError(f"CONNECT refused: {head[:80]!r}")
    await writer.start_tls(ctx, server_hostname=sni)
    return reader, writer


async def _tls_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
    writer.write(f"GET /small HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer {head[:80]!r}")
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    await reader.readexactly(length)


async def _mitm_rps(t: TlsTarget, connect_to: str, sni: str, c: int, seconds: float) -> float:
    ctx = t.context()
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        reader, writer = await _tls_open(t, ctx, connect_to, sni)
        await _tls_get(reader, writer, sni)
        while time.perf_counter() < deadline:
            await _tls_get(reader, writer, sni)
            count += 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(c)))
    return count / (time.perf_counter() - start)


def mitm_rps(t: TlsTarget, connect_to: str, sni: str, c: int, seconds: float) -> float:
    return asyncio.run(asyncio.wait_for(_mitm_rps(t, connect_to, sni, c, seconds), seconds + 60))


async def _first(t: TlsTarget, hosts: list[tuple[str, str]]) -> float:
    ctx = t.context()
    samples = []
    for connect_to, sni in hosts:
        start = time.perf_counter()
        reader, writer = await _tls_open(t, ctx, connect_to, sni)
        await _tls_get(reader, writer, sni)
        samples.append((time.perf_counter() - start) * 1000)
        writer.close()
    return statistics.median(samples)


def first_request_ms(t: TlsTarget, hosts: list[tuple[str, str]]) -> float:
    """Median ms from opening the connection to the end of the first response, new hosts."""
    return asyncio.run(asyncio.wait_for(_first(t, hosts), 120))
