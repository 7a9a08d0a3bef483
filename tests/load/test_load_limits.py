"""Load and limits (SPEC §15): keep-alive load, idle tunnels, slowloris, floods, no fd leaks.

Clients and origins are asyncio sockets on this test's own loop; the proxy runs in-process on
its `BackgroundProxy` thread, so /proc/self/{status,fd} account for the proxy and the test.
Every figure is printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from netproxy_core import BackgroundProxy
from netproxy_core.config.model import Limits

API = "api.example.test"
BODY = b"ok" * 32


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_fds_back(baseline: int, slack: int = 8, deadline: float = 10.0) -> int:
    """Poll (bounded) until the fd count is back near `baseline`; returns the final count."""
    end = time.monotonic() + deadline
    while (now := fd_count()) > baseline + slack and time.monotonic() < end:
        time.sleep(0.05)
    return now


WANT_FDS = 6000
_HARD_FDS = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
pytestmark = pytest.mark.skipif(
    _HARD_FDS != resource.RLIM_INFINITY and _HARD_FDS < WANT_FDS,
    reason=f"RLIMIT_NOFILE hard limit {_HARD_FDS} < {WANT_FDS}: cannot hold 1,000 tunnels",
)


@pytest.fixture(scope="module", autouse=True)
def enough_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WANT_FDS
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- an asyncio origin living on the test's loop -------------------------------------------------


async def serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive origin: answers every request head with BODY."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def hold_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Tunnel origin: echoes until the peer closes."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
    except ConnectionError:
        pass
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


@contextmanager
def proxy_for(
    start_proxy: Any, port: int, tunnel_port: int | None = None, **config: Any
) -> Iterator[BackgroundProxy]:
    """HTTP to API goes to `port`; CONNECT API:22 to `tunnel_port`."""
    routes = {f"{API}:80": f"127.0.0.1:{port}"}
    if tunnel_port is not None:
        routes[f"{API}:22"] = f"127.0.0.1:{tunnel_port}"
    with start_proxy(allow=[API], routes=routes, **config) as p:
        yield p


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())  # type: ignore[arg-type]


async def good_request(addr: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(f"GET http://{API}/ok HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert await asyncio.wait_for(read_response(reader), 5) == (200, BODY)
    finally:
        writer.close()


# --- 200 keep-alive clients x 20 requests --------------------------------------------------------


def test_200_keep_alive_clients_x_20_requests(start_proxy: Any) -> None:
    clients, per_client = 200, 20
    state: dict[str, Any] = {}

    async def main() -> None:
        origin = await asyncio.start_server(serve_http, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        with proxy_for(start_proxy, port) as p:
            addr = p.http_addr
            assert addr is not None
            await good_request(addr)
            baseline = fd_count()
            ok = 0

            async def client(i: int) -> None:
                nonlocal ok
                reader, writer = await asyncio.open_connection(*addr)
                try:
                    for j in range(per_client):
                        writer.write(
                            f"GET http://{API}/{i}/{j} HTTP/1.1\r\nHost: {API}\r\n\r\n".encode()
                        )
                        assert await read_response(reader) == (200, BODY)
                        ok += 1
                finally:
                    writer.close()

            started = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), 90)
            state["elapsed"] = time.monotonic() - started
            state["ok"] = ok
            state["decisions"] = sum(1 for e in p.events() if e.host == API)
            await asyncio.sleep(0)
            state["fds"] = (baseline, await asyncio.to_thread(wait_fds_back, baseline))
        origin.close()
        await origin.wait_closed()

    run(main)
    assert state["ok"] == clients * per_client  # nothing lost
    assert state["decisions"] == clients * per_client + 1  # one audited decision per request
    baseline, after = state["fds"]
    assert after <= baseline + 8, state["fds"]
    print(
        f"\nload: {clients} keep-alive clients x {per_client} requests = {state['ok']} ok "
        f"in {state['elapsed']:.2f}s; fds {baseline} -> {after}"
    )


# --- 1,000 idle tunnels --------------------------------------------------------------------------


def test_1000_idle_tunnels_memory_and_fds(start_proxy: Any) -> None:
    tunnels = 1000
    state: dict[str, Any] = {}

    async def main() -> None:
        origin = await asyncio.start_server(hold_open, "127.0.0.1", 0, backlog=2048)
        web = await asyncio.start_server(serve_http, "127.0.0.1", 0)
        port = web.sockets[0].getsockname()[1]
        with proxy_for(start_proxy, port, origin.sockets[0].getsockname()[1]) as p:
            addr = p.http_addr
            assert addr is not None
            await good_request(addr)
            baseline_fds, baseline_rss = fd_count(), rss_kib()
            sem = asyncio.Semaphore(200)  # open at most 200 at a time, hold all 1,000

            async def open_tunnel() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                async with sem:
                    reader, writer = await asyncio.open_connection(*addr)
                    writer.write(f"CONNECT {API}:22 HTTP/1.1\r\nHost: {API}:22\r\n\r\n".encode())
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200"), head
                    return reader, writer

            held = await asyncio.wait_for(
                asyncio.gather(*(open_tunnel() for _ in range(tunnels))), 60
            )
            state["rss"] = rss_kib() - baseline_rss
            state["fds_held"] = fd_count() - baseline_fds
            # every tunnel still works: a byte goes through and comes back
            reader, writer = held[-1]
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            await good_request(addr)  # the proxy still serves while 1,000 tunnels are open
            for _, writer in held:
                writer.close()
            del held
            state["fds"] = (baseline_fds, await asyncio.to_thread(wait_fds_back, baseline_fds))
            await good_request(addr)
            state["events"] = sum(1 for e in p.events() if e.protocol == "https_connect")
        for server in (origin, web):
            server.close()
            await server.wait_closed()

    run(main)
    per_tunnel = state["rss"] * 1024 / tunnels
    print(
        f"\nload: {tunnels} idle tunnels held; RSS +{state['rss']} KiB = "
        f"{per_tunnel / 1024:.1f} KiB per idle tunnel (proxy + test client + origin sockets); "
        f"fds held +{state['fds_held']}; after close {state['fds'][0]} -> {state['fds'][1]}"
    )
    assert state["events"] == tunnels
    assert state["fds_held"] >= 3 * tunnels  # client, proxy's two ends (+ origin) per tunnel
    assert per_tunnel < 64 * 1024, per_tunnel
    assert state["fds"][1] <= state["fds"][0] + 8, state["fds"]


# --- slowloris -----------------------------------------------------------------------------------


def test_slowloris_clients_do_not_block_others(start_proxy: Any) -> None:
    slow_clients = 100
    state: dict[str, Any] = {}

    async def main() -> None:
        origin = await asyncio.start_server(serve_http, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        with proxy_for(start_proxy, port, limits=Limits(handshake_timeout=0.5)) as p:
            addr = p.http_addr
            assert addr is not None
            await good_request(addr)
            baseline = fd_count()
            head = f"GET http://{API}/ HTTP/1.1\r\nHost: {API}\r\nX-Slow: ".encode()

            async def slowloris() -> tuple[float, bytes]:
                reader, writer = await asyncio.open_connection(*addr)
                started = time.monotonic()
                try:
                    for byte in head:
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(0.05)  # the attack: one byte at a time, forever
                except ConnectionError:
                    pass
                try:
                    answer = await asyncio.wait_for(reader.read(), 5)
                except ConnectionError:
                    answer = b""
                writer.close()
                return time.monotonic() - started, answer

            attack = asyncio.gather(*(slowloris() for _ in range(slow_clients)))
            good_latency = []
            for _ in range(10):
                started = time.monotonic()
                await good_request(addr)
                good_latency.append(time.monotonic() - started)
                await asyncio.sleep(0.05)
            results = await asyncio.wait_for(attack, 30)
            state["good"] = max(good_latency)
            state["cut"] = max(t for t, _ in results)
            state["answers"] = {a[:12] for _, a in results}
            state["fds"] = (baseline, await asyncio.to_thread(wait_fds_back, baseline))
            await good_request(addr)
        origin.close()
        await origin.wait_closed()

    run(main)
    print(
        f"\nslowloris: {slow_clients} slow heads cut after <= {state['cut']:.2f}s; "
        f"good requests meanwhile <= {state['good'] * 1000:.0f} ms"
    )
    assert state["good"] < 1.0
    assert state["cut"] < 5.0  # handshake_timeout (0.5 s) bounds a whole head, not each byte
    assert state["answers"] <= {b"", b"HTTP/1.1 408"}
    assert state["fds"][1] <= state["fds"][0] + 8, state["fds"]


# --- floods past max_connections -----------------------------------------------------------------


def test_flood_past_max_connections_is_shed_logged_once_and_recovers(
    start_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    limit, flood = 50, 150
    state: dict[str, Any] = {}

    async def main() -> None:
        origin = await asyncio.start_server(serve_http, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        with (
            caplog.at_level(logging.WARNING, logger="netproxy"),
            proxy_for(start_proxy, port, limits=Limits(max_connections=limit)) as p,
        ):
            addr = p.http_addr
            assert addr is not None
            await good_request(addr)
            baseline = fd_count()
            held = []
            for _ in range(limit):  # fill every slot with an idle client
                held.append(await asyncio.open_connection(*addr))
            await asyncio.sleep(0.2)  # let the proxy register them (bounded, not readiness)

            async def extra() -> bytes:
                reader, writer = await asyncio.open_connection(*addr)
                try:
                    return await asyncio.wait_for(reader.read(), 5)  # closed at once: b""
                except ConnectionError:
                    return b""
                finally:
                    writer.close()

            started = time.monotonic()
            shed = await asyncio.gather(*(extra() for _ in range(flood - limit)))
            state["shed_time"] = time.monotonic() - started
            state["shed"] = shed
            # one held client still works
            reader, writer = held[0]
            writer.write(f"GET http://{API}/held HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
            assert await asyncio.wait_for(read_response(reader), 5) == (200, BODY)
            for _, w in held:
                w.close()
            state["fds"] = (baseline, await asyncio.to_thread(wait_fds_back, baseline))
            end = time.monotonic() + 5
            while True:  # recovered: new connections are served again (bounded poll)
                try:
                    await good_request(addr)
                    break
                except (AssertionError, asyncio.IncompleteReadError, ConnectionError):
                    assert time.monotonic() < end, "proxy did not recover after the flood"
                    await asyncio.sleep(0.05)
        origin.close()
        await origin.wait_closed()

    run(main)
    warnings = [r for r in caplog.records if "connections" in r.getMessage()]
    print(
        f"\nflood: {flood} connections against max_connections={limit}: "
        f"{len(state['shed'])} shed in {state['shed_time']:.2f}s, {len(warnings)} log line(s)"
    )
    assert state["shed"] == [b""] * (flood - limit)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert state["fds"][1] <= state["fds"][0] + 8, state["fds"]
