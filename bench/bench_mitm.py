"""MITM HTTPS requests/s and first-request latency for a new host (SPEC §16), as ratios against
an opaque CONNECT tunnel to the same origin and a direct client→origin baseline, same run.

Run:  python bench/bench_mitm.py [--seconds 3] [--concurrency 1,16] [--hosts 40]

Processes: the TLS origin, the intercepting proxy (limited mode: every inner request is
decided and forwarded over verified TLS) and the opaque proxy (full mode, no interception)
each run on their own; the load generator is asyncio in this process. The client speaks
HTTP/1.1 keep-alive over one TLS connection per worker. "First request to a new host" is the
time from opening the proxy connection to the end of the first response, for a host name the
proxy has not seen (so the MITM path mints a leaf); medians over `--hosts` names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import ssl
import statistics
import sys
import tempfile
import time
from multiprocessing.synchronize import Event as EventType
from typing import Any

DOMAIN = "bench.example.test"
BODY = b"x" * 512
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)


# --- origin (own process) ------------------------------------------------------------------


async def _origin_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ssl.SSLError):
        pass
    finally:
        writer.close()


def _run_origin(cert_dir: str, queue: Any, stop: EventType) -> None:
    async def main() -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(f"{cert_dir}/origin.pem", f"{cert_dir}/origin.key")
        server = await asyncio.start_server(_origin_conn, "127.0.0.1", 0, ssl=context, backlog=1024)
        queue.put(server.sockets[0].getsockname()[1])
        while not stop.is_set():
            await asyncio.sleep(0.1)

    asyncio.run(main())
    os._exit(0)  # skip cancelling open keep-alive handlers one by one


# --- proxies (own processes) ---------------------------------------------------------------


def _run_proxy(
    kind: str, ca_file: str, origin: str, hosts: int, queue: Any, stop: EventType
) -> None:
    from netproxy_core import BackgroundProxy, ProxyConfig
    from netproxy_core.config.model import Access, Mode

    names = [DOMAIN] + [f"h{i}.{DOMAIN}" for i in range(hosts)]
    config = ProxyConfig(
        proxy_url="127.0.0.1:0",
        enable_socks5=False,
        mode=Mode.LIMITED if kind == "mitm" else Mode.FULL,
        domains=((DOMAIN, Access.ALLOW), (f"*.{DOMAIN}", Access.ALLOW)),
        routes=tuple((f"{n}:443", origin) for n in names),
        upstream_ca_files=(ca_file,),
    )
    with (
        tempfile.TemporaryDirectory() as home,
        BackgroundProxy(config, home=home, upstream_env={}) as proxy,
    ):
        assert proxy.http_addr is not None
        queue.put((proxy.http_addr, str(proxy.ca_cert_path)))
        stop.wait()


# --- load generator ------------------------------------------------------------------------


class Target:
    def __init__(self, label: str, proxy: tuple[str, int] | None, origin_port: int, cafile: str):
        self.label, self.proxy, self.origin_port = label, proxy, origin_port
        self.tls = ssl.create_default_context(cafile=cafile)

    async def connect(self, host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.proxy is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.origin_port)
        else:
            reader, writer = await asyncio.open_connection(*self.proxy)
            writer.write(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{self.label}: CONNECT refused: {head!r}")
        await writer.start_tls(self.tls, server_hostname=host)
        return reader, writer


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer {head[:80]!r}")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)


async def requests_per_second(target: Target, concurrency: int, seconds: float) -> float:
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        reader, writer = await target.connect(DOMAIN)
        await _request(reader, writer, DOMAIN)  # warm-up, not counted
        while time.perf_counter() < deadline:
            await _request(reader, writer, DOMAIN)
            count += 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start)


async def first_request_ms(target: Target, hosts: list[str]) -> float:
    samples = []
    for host in hosts:
        start = time.perf_counter()
        reader, writer = await target.connect(host)
        await _request(reader, writer, host)
        samples.append((time.perf_counter() - start) * 1000)
        writer.close()
    return statistics.median(samples)


# --- main ----------------------------------------------------------------------------------


def _start(ctx: Any, target: Any, *args: Any) -> tuple[Any, Any, EventType]:
    queue, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=target, args=(*args, queue, stop), daemon=True)
    proc.start()
    return proc, queue.get(timeout=30), stop


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    parser.add_argument("--concurrency", default="1,16", help="comma list (default 1,16)")
    parser.add_argument("--hosts", type=int, default=40, help="new host names (default 40)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import trustme

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        origin_ca = trustme.CA()
        leaf = origin_ca.issue_cert(DOMAIN, f"*.{DOMAIN}")
        leaf.cert_chain_pems[0].write_to_path(f"{tmp}/origin.pem")
        leaf.private_key_pem.write_to_path(f"{tmp}/origin.key")
        origin_ca.cert_pem.write_to_path(f"{tmp}/origin-ca.pem")
        ca_file = f"{tmp}/origin-ca.pem"
        procs = []
        try:
            proc, origin_port, origin_stop = _start(ctx, _run_origin, tmp)
            procs.append((proc, origin_stop))
            origin = f"127.0.0.1:{origin_port}"
            hosts = args.hosts
            proc, (mitm_addr, mitm_ca), stop = _start(
                ctx, _run_proxy, "mitm", ca_file, origin, hosts
            )
            procs.append((proc, stop))
            proc, (opaque_addr, _), stop = _start(ctx, _run_proxy, "opaque", ca_file, origin, hosts)
            procs.append((proc, stop))
            direct = Target("direct", None, origin_port, ca_file)
            mitm = Target("mitm", tuple(mitm_addr), origin_port, mitm_ca)
            opaque = Target("opaque", tuple(opaque_addr), origin_port, ca_file)
            results = asyncio.run(_measure(direct, mitm, opaque, levels, args.seconds, hosts))
        finally:
            for _, stop in procs:
                stop.set()
            for proc, _ in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.terminate()
    _report(results, levels)
    return 0


async def _measure(
    direct: Target, mitm: Target, opaque: Target, levels: list[int], seconds: float, hosts: int
) -> dict[str, Any]:
    names = [f"h{i}.{DOMAIN}" for i in range(hosts)]
    half = len(names) // 2
    results: dict[str, Any] = {"rps": {}, "first_ms": {}}
    # New hosts: each proxy sees each name once (split so both see unseen names).
    results["first_ms"]["mitm"] = await first_request_ms(mitm, names[:half])
    results["first_ms"]["opaque"] = await first_request_ms(opaque, names[half:])
    results["first_ms"]["mitm_cached"] = await first_request_ms(mitm, names[:half])
    for c in levels:
        for target in (direct, opaque, mitm):
            rps = await requests_per_second(target, c, seconds)
            results["rps"][f"{target.label}_c{c}"] = rps
    return results


def _report(results: dict[str, Any], levels: list[int]) -> None:
    rps, first = results["rps"], results["first_ms"]
    print(f"{'figure':<40} {'direct':>10} {'opaque':>10} {'mitm':>10} {'mitm/opaque':>12}")
    for c in levels:
        d, o, m = rps[f"direct_c{c}"], rps[f"opaque_c{c}"], rps[f"mitm_c{c}"]
        print(
            f"{f'HTTPS keep-alive req/s, c={c}':<40} {d:>10.0f} {o:>10.0f} {m:>10.0f} "
            f"{m / o:>11.2f}x   (mitm/direct {m / d:.2f}x)"
        )
    print(
        f"{'first request to a new host, ms':<40} {'':>10} {first['opaque']:>10.2f} "
        f"{first['mitm']:>10.2f} {first['mitm'] / first['opaque']:>11.2f}x"
    )
    print(
        f"{'same host again (leaf cached), ms':<40} {'':>10} {'':>10} {first['mitm_cached']:>10.2f}"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
