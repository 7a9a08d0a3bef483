"""SOCKS5 CONNECT throughput through `netproxy-core serve`, as a ratio against a direct
client→origin download measured in the same run (SPEC §16: target ≥ 0.9× direct).

Run:  python bench/bench_socks.py [--mib 64] [--rounds 3]

Separate processes (origin, proxy, client), all on 127.0.0.1. The origin sends N bytes as soon
as a connection opens. The proxy evaluates its full policy for the tunnel (name allowlist +
`routes`), as in production. Each figure is the best of `--rounds` downloads; the last line is
JSON for bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from common import receive, split_addr, start_netproxy

HOST = "bench.example.test"
CHUNK = 1 << 20


# --- origin (own process): a connection gets `n` bytes after an 8-byte size request ---------


async def _origin_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
        chunk = b"z" * CHUNK
        while n > 0:
            writer.write(chunk[: min(n, CHUNK)])
            n -= CHUNK
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _run_origin(port_queue: multiprocessing.Queue[int]) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_origin_conn, "127.0.0.1", 0)
        port_queue.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


# --- client ----------------------------------------------------------------------------------


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("proxy closed the connection during the SOCKS5 handshake")
        data += chunk
    return data


def socks_connect(proxy: tuple[str, int], host: str, port: int) -> socket.socket:
    s = socket.create_connection(proxy)
    name = host.encode()
    s.sendall(
        b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", port)
    )
    assert _recv_exact(s, 2) == b"\x05\x00"
    head = _recv_exact(s, 4)
    if head[1] != 0:
        raise RuntimeError(f"SOCKS5 CONNECT refused with reply code {head[1]}")
    _recv_exact(s, (4 if head[3] == 1 else 16) + 2)
    return s


def download(origin: tuple[str, int], mib: int, proxy: tuple[str, int] | None) -> float:
    """MB/s for one download of `mib` MiB, directly or through a SOCKS5 CONNECT tunnel."""
    n = mib << 20
    s = socket.create_connection(origin) if proxy is None else socks_connect(proxy, HOST, 80)
    with s:
        start = time.monotonic()
        s.sendall(struct.pack("!Q", n))
        got = receive(s, n)
        elapsed = time.monotonic() - start
    if got != n:
        raise RuntimeError(f"download ended after {got} of {n} bytes")
    return got / elapsed / 1e6


# --- proxy (own process) ---------------------------------------------------------------------


def start_proxy(origin_port: int, home: Path) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    proc, ready = start_netproxy(
        home,
        "--socks-addr",
        "127.0.0.1:0",
        "--allow",
        HOST,
        "--route",
        f"{HOST}=127.0.0.1:{origin_port}",
    )
    return proc, split_addr(ready["socks"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    origin_proc = multiprocessing.Process(target=_run_origin, args=(ports,), daemon=True)
    origin_proc.start()
    origin = ("127.0.0.1", ports.get(timeout=10))
    proxy, proxy_addr = start_proxy(origin[1], Path(tempfile.mkdtemp(prefix="netproxy-bench-")))
    try:
        download(origin, 1, proxy_addr)  # warm-up: imports, first policy evaluation
        direct = max(download(origin, args.mib, None) for _ in range(args.rounds))
        socks = max(download(origin, args.mib, proxy_addr) for _ in range(args.rounds))
    finally:
        proxy.terminate()
        proxy.wait(10)
        origin_proc.terminate()
    print(f"{'figure':40} {'direct':>10} {'netproxy':>10} {'ratio':>7}")
    print(
        f"{f'SOCKS5 CONNECT {args.mib} MiB (MB/s)':40} {direct:10.0f} {socks:10.0f} "
        f"{socks / direct:7.2f}"
    )
    print(
        json.dumps(
            {
                "socks_direct_MBps": round(direct, 1),
                "socks_netproxy_MBps": round(socks, 1),
                "socks_ratio": round(socks / direct, 3),
            }
        )
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
