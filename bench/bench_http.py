"""Plain HTTP forwarding and CONNECT throughput through `netproxy-core serve`, as ratios
against a direct client→origin baseline measured in the same run.

Run:  python bench/bench_http.py [--seconds 5] [--concurrency 1,16] [--mib 64]

Every process is separate (origin, proxy, load generator), all on 127.0.0.1. The proxy
evaluates its full policy for every request (name allowlist + `routes`), as in production.
Figures are printed as a table and as JSON (last line) for bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import time
from pathlib import Path

from common import receive, split_addr, start_netproxy

BODY = b"x" * 512
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
HOST = "bench.example.test"


# --- origin (own process) --------------------------------------------------------------------


async def _origin_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /bytes/"):
                n = int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1])
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: " + str(n).encode() + b"\r\n\r\n")
                chunk = b"z" * (1 << 20)
                while n > 0:
                    writer.write(chunk[: min(n, len(chunk))])
                    n -= len(chunk)
                    await writer.drain()
            else:
                writer.write(RESPONSE)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def _run_origin(port_queue: multiprocessing.Queue[int]) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_origin_conn, "127.0.0.1", 0, backlog=1024)
        port_queue.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


# --- load generator (own process) ------------------------------------------------------------


async def _client(
    request: bytes, deadline: float, counts: list[int], new_conn: bool, addr: tuple[str, int]
) -> None:
    reader = writer = None
    while time.monotonic() < deadline:
        if reader is None or writer is None:
            reader, writer = await asyncio.open_connection(*addr)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
        counts[0] += 1
        if new_conn:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def _run_load(
    addr: tuple[str, int],
    request: bytes,
    seconds: float,
    concurrency: int,
    new_conn: bool,
    out: multiprocessing.Queue[float],
) -> None:
    async def main() -> float:
        counts = [0]
        deadline = time.monotonic() + seconds
        start = time.monotonic()
        await asyncio.gather(
            *(_client(request, deadline, counts, new_conn, addr) for _ in range(concurrency))
        )
        return counts[0] / (time.monotonic() - start)

    out.put(asyncio.run(main()))


def measure_rps(
    addr: tuple[str, int], request: bytes, seconds: float, concurrency: int, new_conn: bool
) -> float:
    out: multiprocessing.Queue[float] = multiprocessing.Queue()
    p = multiprocessing.Process(
        target=_run_load, args=(addr, request, seconds, concurrency, new_conn, out)
    )
    p.start()
    value = out.get(timeout=seconds + 60)
    p.join()
    return value


# --- CONNECT throughput ----------------------------------------------------------------------


def download(addr: tuple[str, int], mib: int, via_connect: tuple[str, int] | None) -> float:
    """MB/s for one GET /bytes/N, directly or inside a CONNECT tunnel."""
    n = mib << 20
    with socket.create_connection(addr if via_connect is None else via_connect) as s:
        if via_connect is not None:
            s.sendall(
                f"CONNECT {HOST}:{addr[1]} HTTP/1.1\r\nHost: {HOST}:{addr[1]}\r\n\r\n".encode()
            )
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 200"), reply
        start = time.monotonic()
        s.sendall(f"GET /bytes/{n} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        got = receive(s, n)
        elapsed = time.monotonic() - start
    return got / elapsed / 1e6


# --- proxy (own process) ---------------------------------------------------------------------


def start_proxy(origin_port: int, home: Path) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    proc, ready = start_netproxy(
        home, "--no-socks5", "--allow", HOST, "--route", f"{HOST}=127.0.0.1:{origin_port}"
    )
    return proc, split_addr(ready["http"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    import tempfile

    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    origin = multiprocessing.Process(target=_run_origin, args=(ports,), daemon=True)
    origin.start()
    origin_port = ports.get(timeout=10)
    home = Path(tempfile.mkdtemp(prefix="netproxy-bench-"))
    proxy, proxy_addr = start_proxy(origin_port, home)
    results: dict[str, float] = {}
    try:
        direct_req = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        proxied_req = f"GET http://{HOST}/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        rows = []
        for c in (int(x) for x in args.concurrency.split(",")):
            for new_conn in (False, True):
                kind = "new-conn" if new_conn else "keep-alive"
                direct = measure_rps(
                    ("127.0.0.1", origin_port), direct_req, args.seconds, c, new_conn
                )
                proxied = measure_rps(proxy_addr, proxied_req, args.seconds, c, new_conn)
                results[f"http_{kind}_c{c}_direct"] = direct
                results[f"http_{kind}_c{c}_netproxy"] = proxied
                rows.append((f"plain HTTP {kind} c={c} (req/s)", direct, proxied))
        direct_mb = download(("127.0.0.1", origin_port), args.mib, None)
        tunnel_mb = download(("127.0.0.1", origin_port), args.mib, proxy_addr)
        results["connect_direct_MBps"], results["connect_netproxy_MBps"] = direct_mb, tunnel_mb
        rows.append((f"CONNECT {args.mib} MiB download (MB/s)", direct_mb, tunnel_mb))
    finally:
        proxy.terminate()
        proxy.wait(10)
        origin.terminate()
    print(f"{'figure':44} {'direct':>10} {'netproxy':>10} {'ratio':>7}")
    for name, direct, proxied in rows:
        print(f"{name:44} {direct:10.0f} {proxied:10.0f} {proxied / direct:7.2f}")
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
