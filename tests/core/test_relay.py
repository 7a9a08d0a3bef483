"""`net.relay.relay`: both engines (linked transports, pumps) on plain asyncio and on uvloop.

Real TCP sockets on 127.0.0.1. Each case builds two connected pairs: the test's `client`
talks to the relay's `a`, the relay's `b` talks to the test's `origin`. The pump engine is
chosen by wrapping `b` in a pass-through stream the linked engine cannot borrow.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import pytest

from netproxy_core.errors import UpstreamError
from netproxy_core.net import link
from netproxy_core.net.adopt import Adopted, adoptable
from netproxy_core.net.dial import dial_protocol
from netproxy_core.net.relay import Dialled, linkable, relay, relay_dialled
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


def run_case(
    loop: str, engine: str, case: Callable[..., Awaitable[None]], *, port: bool = False
) -> None:
    """case(client, a, b, origin) with a/b ready for `relay(a, b)`; with `port`, the listener's
    port comes last (for dialling one more connection to it)."""

    async def main() -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port_ = listener.extra(anyio.abc.SocketAttribute.local_port)
            client, a, b_raw, origin = await _pairs(listener)
            assert adoptable(a) and adoptable(b_raw)
            b: anyio.abc.ByteStream = b_raw if engine == "linked" else Wrapped(b_raw)
            try:
                with anyio.fail_after(30):
                    await (
                        case(client, a, b, origin, port_) if port else case(client, a, b, origin)
                    )
            finally:
                for s in (client, origin, a, b_raw):
                    await s.aclose()

    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})


async def _accept(listener: Any) -> anyio.abc.SocketStream:
    stream: anyio.abc.SocketStream = await listener.listeners[0].accept()
    return stream


async def _pairs(listener: Any) -> tuple[anyio.abc.SocketStream, ...]:
    """(client, a, b, origin): two connected pairs through `listener` (see the module doc)."""
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    client = await anyio.connect_tcp("127.0.0.1", port)
    a = await _accept(listener)
    b = await anyio.connect_tcp("127.0.0.1", port)
    return client, a, b, await _accept(listener)


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


async def _record(into: list[Any], relaying: Awaitable[Any]) -> None:
    into.append(await relaying)


@pytest.mark.parametrize("loop", LOOPS)
def test_tunnels_one_after_another_share_the_idle_clock_and_it_stops(loop: str) -> None:
    """A short tunnel's idle clock runs on to its next tick, so the next tunnel reuses it; that
    tunnel's idle timeout is still kept, and with no tunnel left the clock stops a tick later."""

    async def case(client: Any, a: Any, b: Any, origin: Any) -> None:
        loop_ = asyncio.get_running_loop()
        await client.send_eof()
        await origin.send_eof()
        assert await relay(a, b, idle_timeout=0.4) == (0, 0)  # both ended: a short tunnel
        clock = link._clocks[loop_]
        assert clock.timer is not None and not clock.links  # runs on to its next tick

        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            client2, a2, b2, origin2 = await _pairs(listener)
            counts: list[tuple[int, int]] = []
            start = anyio.current_time()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _record(counts, relay(a2, b2, idle_timeout=0.4)))
                await anyio.sleep(0.02)
                assert link._clocks.get(loop_) is clock and len(clock.links) == 1  # reused
            took = anyio.current_time() - start
            assert counts == [(0, 0)]  # idle, then ended by the clock
            assert await read_all(origin2) == b""
            for s in (client2, origin2):
                await s.aclose()
        assert 0.39 <= took < 2.0, took
        await anyio.sleep(0.2)  # a tick is 0.05 s
        assert loop_ not in link._clocks

    run_case(loop, "linked", case)


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


# --- cheaper tunnel set-up paths (SPEC §5.6, §16) ----------------------------------------------
# A borrowed client transport taken over by the linked relay (`held`), an origin dialled
# straight into the relay's protocol (`Dialled`), the dial's own deadline, and streams closed
# in place when a relay ends.


class Holder(Adopted):
    """A borrower like the HTTP fast path's client: buffers, and says when bytes came."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        super().__init__(stream)
        self.arrived = asyncio.Event()

    def on_input(self) -> None:
        self.arrived.set()


async def assert_closed_in_place(stream: anyio.abc.ByteStream) -> None:
    with pytest.raises(anyio.ClosedResourceError):
        await stream.receive()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.send(b"x")
    assert not adoptable(stream)


@pytest.mark.parametrize("loop", LOOPS)
def test_held_transport_is_taken_over_with_its_bytes_after_the_prefix(loop: str) -> None:
    async def case(client: Any, a: Any, b: Any, origin: Any, port: int) -> None:
        held = Holder(a)
        held.adopt()
        await client.send(b"later")  # arrives while the transport is held
        await held.arrived.wait()
        assert linkable(ReplayStream(a, b"pre-"), held)
        async with anyio.create_task_group() as tg:
            done: list[tuple[int, int]] = []

            async def run_relay() -> None:
                done.append(await relay(ReplayStream(a, b"pre-"), b, idle_timeout=10, held=held))

            tg.start_soon(run_relay)
            assert await origin.receive() == b"pre-later"
            await origin.send(b"answer")
            assert await client.receive() == b"answer"
            await client.send_eof()
            assert await read_all(origin) == b""
            await origin.send_eof()
            assert await read_all(client) == b""
        assert done == [(9, 6)]
        assert not held.adopted and not held.buffer
        held.restore()  # nothing left to hand back
        await assert_closed_in_place(a)
        await assert_closed_in_place(b)

    run_case(loop, "linked", case, port=True)


@pytest.mark.parametrize("loop", LOOPS)
def test_held_transport_goes_back_to_its_stream_for_the_pumps(loop: str) -> None:
    async def case(client: Any, a: Any, b: Any, origin: Any, port: int) -> None:
        held = Holder(a)
        held.adopt()
        await client.send(b"later")
        await held.arrived.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: relay(ReplayStream(a, b"pre-"), Wrapped(b), idle_timeout=10, held=held)
            )
            assert await origin.receive() == b"pre-"
            assert await origin.receive() == b"later"
            await client.send_eof()
            await origin.send_eof()
            assert await read_all(origin) == b""
            assert await read_all(client) == b""
        assert not held.adopted

    run_case(loop, "linked", case, port=True)


@pytest.mark.parametrize("loop", LOOPS)
def test_dialled_origin_keeps_early_bytes_for_the_relay_and_reports_its_address(
    loop: str,
) -> None:
    async def case(client: Any, a: Any, b: Any, origin: Any, port: int) -> None:
        ev_loop = asyncio.get_running_loop()
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as server:
            server_port = server.extra(anyio.abc.SocketAttribute.local_port)
            _, dialled = await dial_protocol(
                ev_loop, ["127.0.0.1"], server_port, Dialled, timeout=5, label="t:1"
            )
            far = await _accept(server)
            async with far:
                assert dialled.local_addr == far.extra(anyio.abc.SocketAttribute.remote_address)
                await far.send(b"banner")  # server-first, before any relay runs
                await anyio.sleep(0.05)
                assert not dialled.reading  # paused by its first chunk
                assert bytes(dialled.buffer) in (b"", b"banner")  # (or it waits in the socket)
                await client.send(b"hi")
                async with anyio.create_task_group() as tg:
                    done: list[tuple[int, int]] = []

                    async def run_relay() -> None:
                        done.append(await relay_dialled(a, dialled, idle_timeout=10))

                    tg.start_soon(run_relay)
                    assert await client.receive() == b"banner"
                    assert await far.receive() == b"hi"
                    await far.send_eof()
                    assert await read_all(client) == b""
                    await client.send_eof()
                    assert await read_all(far) == b""
                assert done == [(2, 6)]
        await assert_closed_in_place(a)
        assert dialled.transport.is_closing()

    run_case(loop, "linked", case, port=True)


@pytest.mark.parametrize("loop", LOOPS)
def test_dial_deadline_is_a_504_and_an_outer_cancel_stays_a_cancel(loop: str) -> None:
    async def case(client: Any, a: Any, b: Any, origin: Any, port: int) -> None:
        ev_loop = asyncio.get_running_loop()
        with pytest.raises(UpstreamError) as caught:
            await dial_protocol(ev_loop, ["127.0.0.1"], port, Dialled, timeout=1e-9, label="x:1")
        assert caught.value.status == 504
        with anyio.CancelScope() as scope:
            scope.cancel()  # delivered at the dial's first wait
            _, dialled = await dial_protocol(
                ev_loop, ["127.0.0.1"], port, Dialled, timeout=60, label="x:1"
            )
            dialled.close()  # (not reached)
        assert scope.cancelled_caught
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0

    run_case(loop, "linked", case, port=True)


def test_refused_dial_is_a_502() -> None:
    async def main() -> None:
        with anyio.fail_after(10):
            probe = await anyio.create_tcp_listener(local_host="127.0.0.1")
            port = probe.extra(anyio.abc.SocketAttribute.local_port)
            await probe.aclose()  # nothing listens there now
            with pytest.raises(UpstreamError) as caught:
                await dial_protocol(
                    asyncio.get_running_loop(), ["127.0.0.1"], port, Dialled, timeout=5
                )
            assert caught.value.status == 502
            assert f"127.0.0.1:{port}" in str(caught.value)

    anyio.run(main, backend="asyncio")
