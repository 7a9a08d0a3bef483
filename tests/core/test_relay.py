"""`net.relay.relay`: both engines (linked transports, pumps) on plain asyncio and on uvloop.

Real TCP sockets on 127.0.0.1. Each case builds two connected pairs: the test's `client`
talks to the relay's `a`, the relay's `b` talks to the test's `origin`. The pump engine is
chosen by wrapping `b` in a pass-through stream the linked engine cannot borrow.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import pytest

from netproxy_core.net.adopt import adoptable
from netproxy_core.net.relay import relay
from netproxy_core.net.streams import ReplayStream

try:
    import uvloop  # noqa: F401

    LOOPS = ["asyncio", "uvloop"]
except ImportError:  # pragma: no cover
    LOOPS = ["asyncio"]

ENGINES = ["linked", "pumps"]


class Wrapped(anyio.abc.ByteStream):
    """A pass-through stream: not a plain anyio socket stream, so the relay uses its pumps."""

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self.inner = inner

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self.inner.extra_attributes


Case = Callable[
    [anyio.abc.SocketStream, anyio.abc.ByteStream, anyio.abc.ByteStream, anyio.abc.SocketStream],
    Awaitable[None],
]


def run_case(loop: str, engine: str, case: Case) -> None:
    """case(client, a, b, origin) with a/b ready for `relay(a, b)`."""

    async def main() -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            client = await anyio.connect_tcp("127.0.0.1", port)
            a = await _accept(listener)
            b_raw = await anyio.connect_tcp("127.0.0.1", port)
            origin = await _accept(listener)
            assert adoptable(a) and adoptable(b_raw)
            b: anyio.abc.ByteStream = b_raw if engine == "linked" else Wrapped(b_raw)
            try:
                with anyio.fail_after(30):
                    await case(client, a, b, origin)
            finally:
                for s in (client, origin, a, b_raw):
                    await s.aclose()

    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})


async def _accept(listener: Any) -> anyio.abc.SocketStream:
    stream: anyio.abc.SocketStream = await listener.listeners[0].accept()
    return stream


async def read_all(stream: anyio.abc.ByteStream) -> bytes:
    chunks = []
    try:
        while True:
            chunks.append(await stream.receive(1 << 20))
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    return b"".join(chunks)


async def send_then_eof(stream: anyio.abc.SocketStream, data: bytes) -> None:
    for i in range(0, len(data), 100_000):
        await stream.send(data[i : i + 100_000])
    await stream.send_eof()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("loop", LOOPS)
def test_bulk_both_ways_with_half_close(loop: str, engine: str) -> None:
    up, down = os.urandom(3 << 20), os.urandom(5 << 20)
    got: dict[str, Any] = {}

    async def case(client: Any, a: Any, b: Any, origin: Any) -> None:
        async with anyio.create_task_group() as tg:

            async def run_relay() -> None:
                got["counts"] = await relay(a, b, idle_timeout=10)

            async def client_reader() -> None:
                got["down"] = await read_all(client)

            async def origin_side() -> None:
                # half-close: the origin reads the whole upload (to EOF), then answers
                got["up"] = await read_all(origin)
                await send_then_eof(origin, down)

            tg.start_soon(run_relay)
            tg.start_soon(send_then_eof, client, up)
            tg.start_soon(client_reader)
            tg.start_soon(origin_side)

    run_case(loop, engine, case)
    assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["down"]).digest() == hashlib.sha256(down).digest()
    assert got["counts"] == (len(up), len(down))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("loop", LOOPS)
def test_idle_tunnel_ends_after_idle_timeout_and_closes_both(loop: str, engine: str) -> None:
    async def case(client: Any, a: Any, b: Any, origin: Any) -> None:
        start = anyio.current_time()
        await client.send(b"x")
        assert await relay(a, b, idle_timeout=0.3) == (1, 0)
        took = anyio.current_time() - start
        assert 0.29 <= took < 2.0, took
        assert await read_all(origin) == b"x"  # then EOF: the relay closed b
        assert await read_all(client) == b""

    run_case(loop, engine, case)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("loop", LOOPS)
def test_pending_prefix_goes_first_and_server_first_bytes_flow_while_checking(
    loop: str, engine: str
) -> None:
    seen: list[tuple[bytes, bool]] = []

    def check(data: bytes, final: bool) -> bool | None:
        seen.append((data, final))
        return None if len(data) < 6 else True

    async def case(client: Any, a: Any, b: Any, origin: Any) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: relay(ReplayStream(a, b"pre"), b, idle_timeout=5, first_bytes=check)
            )
            await origin.send(b"banner")  # server-first: reaches the client before it speaks
            assert await client.receive() == b"banner"
            await client.send(b"fix")
            assert await origin.receive() == b"prefix"  # held until the check accepted
            await client.send(b"-more")
            assert await origin.receive() == b"-more"
            await client.aclose()
            assert await read_all(origin) == b""
            await origin.aclose()

    run_case(loop, engine, case)
    assert seen[-1] == (b"prefix", False)
    assert all(not final for _, final in seen)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("loop", LOOPS)
def test_refused_first_bytes_end_the_relay_without_forwarding(loop: str, engine: str) -> None:
    async def case(client: Any, a: Any, b: Any, origin: Any) -> None:
        await client.send(b"\x16\x03\x01 not for you")
        counts = await relay(a, b, idle_timeout=5, first_bytes=lambda data, final: False)
        assert counts == (0, 0)
        assert await read_all(origin) == b""

    run_case(loop, engine, case)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("loop", LOOPS)
def test_undecided_check_is_asked_to_decide_after_its_timeout_or_at_eof(
    loop: str, engine: str
) -> None:
    calls: list[tuple[bytes, bool]] = []

    def check(data: bytes, final: bool) -> bool | None:
        calls.append((data, final))
        return True if final else None

    async def case(client: Any, a: Any, b: Any, origin: Any) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: relay(a, b, idle_timeout=5, first_bytes=check, first_bytes_timeout=0.2)
            )
            await client.send(b"\x16")
            assert await origin.receive() == b"\x16"  # forwarded once the timeout asked
            await client.send_eof()
            assert await read_all(origin) == b""
            await origin.aclose()

    run_case(loop, engine, case)
    assert calls[-1] == (b"\x16", True)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("loop", LOOPS)
def test_reset_on_one_side_ends_the_relay(loop: str, engine: str) -> None:
    async def case(client: Any, a: Any, b: Any, origin: Any) -> None:
        async with anyio.create_task_group() as tg:
            done: list[tuple[int, int]] = []

            async def run_relay() -> None:
                done.append(await relay(a, b, idle_timeout=30))

            tg.start_soon(run_relay)
            await client.send(b"hello")
            assert await origin.receive() == b"hello"
            raw = origin.extra(anyio.abc.SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await origin.aclose()  # RST
            assert await read_all(client) == b""
        assert done == [(5, 0)]

    run_case(loop, engine, case)


@pytest.mark.parametrize("loop", LOOPS)
def test_cancelling_the_relay_closes_both_ends(loop: str) -> None:
    async def case(client: Any, a: Any, b: Any, origin: Any) -> None:
        with anyio.move_on_after(0.2):
            await relay(a, b, idle_timeout=30)
        assert await read_all(client) == b""
        assert await read_all(origin) == b""

    run_case(loop, "linked", case)
