"""`net.listener.TransportListener`: a burst of waiting connects is accepted in a few loop turns.

uvloop on its own accepts one connection per turn of the loop; behind busy connections each
turn takes milliseconds, so a burst of connects waited in the kernel's queue (the c=128 p99
of `bench/`). Real sockets on 127.0.0.1, on plain asyncio and on uvloop: the clients connect
before the listener serves, so the whole burst is in the accept queue at the first turn, and
every turn of the loop is made busy for a few milliseconds, as under load.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import anyio
import anyio.abc
import pytest

from netproxy_core.net.listener import TransportListener

try:
    import uvloop  # noqa: F401

    LOOPS = ["asyncio", "uvloop"]
except ImportError:  # pragma: no cover
    LOOPS = ["asyncio"]

BURST = 160
BUSY_TURN = 0.006  # seconds each turn of the loop takes


def _listening() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _run(loop: str, main: Callable[[], object]) -> None:
    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})  # type: ignore[arg-type]


class _Turns:
    """Counts turns of the running loop (a callback that re-schedules itself each turn), each
    made to take `BUSY_TURN` (the work of busy connections)."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        time.sleep(BUSY_TURN)
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def _echo_once(stream: anyio.abc.SocketStream) -> None:
    data = await stream.receive()
    await stream.send(data.upper())


def _check_clients(clients: list[socket.socket]) -> None:
    """Every client is served by its own stream (an echo through each)."""
    for i, client in enumerate(clients):
        client.sendall(b"ping %d" % i)
    for i, client in enumerate(clients):
        client.settimeout(5)
        assert client.recv(100) == b"PING %d" % i
        client.close()


@pytest.mark.parametrize("entry", ["serve_started", "serve"])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_burst_is_taken_in_a_few_turns(loop: str, entry: str) -> None:
    """Both entry points: `serve_started` (the proxy's) and `serve` (handlers in a task group)."""
    sock = _listening()
    clients = [socket.create_connection(sock.getsockname()) for _ in range(BURST)]

    async def main() -> None:
        listener = TransportListener([sock])
        turns = _Turns()
        arrived: list[int] = []  # the loop turn each connection reached its handler in
        nodelay: list[int] = []
        done = anyio.Event()

        def arrive(stream: anyio.abc.SocketStream) -> None:
            arrived.append(turns.count)
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            nodelay.append(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            if len(arrived) == BURST:
                done.set()

        async with anyio.create_task_group() as tg:
            if entry == "serve_started":

                def start(stream: anyio.abc.SocketStream) -> None:
                    arrive(stream)
                    tg.start_soon(_echo_once, stream)

                tg.start_soon(listener.serve_started, start)
            else:

                async def handler(stream: anyio.abc.SocketStream) -> None:
                    arrive(stream)
                    await _echo_once(stream)

                tg.start_soon(listener.serve, handler, tg)
            with anyio.fail_after(10):
                await done.wait()
            turns.stop()
            await anyio.to_thread.run_sync(_check_clients, clients)
            tg.cancel_scope.cancel()
        await listener.aclose()
        assert max(arrived) - min(arrived) <= 4, arrived  # not one connection per turn
        assert all(nodelay), nodelay  # on every loop, for the loop's accepts and the batch

    _run(loop, main)


class _CountingSocket(socket.socket):
    """A real listening socket that counts the listener's own `accept` calls (the loop
    accepts through the descriptor, not through this method)."""

    accepts = 0

    def accept(self) -> tuple[socket.socket, object]:
        self.accepts += 1
        return super().accept()


@pytest.mark.skipif("uvloop" not in LOOPS, reason="only uvloop accepts one per turn")
def test_connects_one_at_a_time_stop_the_burst_takes() -> None:
    """Sequential connects after a quiet spell: two empty takes end the burst window, so the
    rest are accepted by the loop alone (no failed accept per connection)."""
    sock = _CountingSocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    address = sock.getsockname()
    served = 10

    def connect_one_at_a_time() -> None:
        for i in range(served):
            with socket.create_connection(address, timeout=5) as client:
                client.sendall(b"ping %d" % i)
                assert client.recv(100) == b"PING %d" % i

    async def main() -> None:
        listener = TransportListener([sock])
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve_started, lambda s: tg.start_soon(_echo_once, s))
            await anyio.sleep(0.01)
            with anyio.fail_after(10):
                await anyio.to_thread.run_sync(connect_one_at_a_time)
            tg.cancel_scope.cancel()
        await listener.aclose()

    _run("uvloop", main)
    assert sock.accepts == 2
