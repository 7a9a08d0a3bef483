"""TCP listeners whose accepts run in the event loop's own accept path.

anyio's asyncio listener accepts one connection per turn of an `await` loop (a checkpoint,
`sock_accept`, `connect_accepted_socket`, then a task); `loop.create_server` accepts in the
loop itself (in C under uvloop) and calls back once per connection. `TransportListener`
gives every accepted connection to the handler as the same anyio asyncio `SocketStream`
anyio would have built, so handlers cannot tell the difference — only the cost.

`serve` starts each handler in the caller's anyio task group (one listener wake-up per batch
of accepts). `serve_started` goes further: the accept callback itself is handed the stream
(`Starter`), so the caller can start its own task at once — no listener wake-up and no
anyio task machinery per connection; the caller then owns those tasks' lifetimes.

uvloop accepts one connection per turn of the loop. Under load a turn takes milliseconds, so
a burst of connects would wait in the kernel's accept queue for as many turns (128 at once
behind 128 busy connections: half a second). So for `BURST_WINDOW` after the first accept
that follows a quiet spell (`QUIET`), each accept of the loop is followed by
`_Backlog.take`: up to `ACCEPT_BATCH` more connections from the queue, handed to the loop as
accepted connections (`loop.connect_accepted_socket`) with the same protocol. A steady
stream of new connections is then left to the loop's own accepts: one taken so costs more,
and taking batches all along slowed the whole loop (a third fewer new connections per second
at 128 at once, and a worse p99). Two takes in a row that find the queue empty end the
window early: connects one at a time (sequential set-ups) are no burst, and each empty take
is a failed accept.

Every accepted TCP stream gets TCP_NODELAY, as anyio's own listener gives it: uvloop sets it
itself, but asyncio only for sockets whose `proto` is IPPROTO_TCP, and a listener's accepted
sockets carry the listening socket's (0 for anyio's and ours).
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, cast

import anyio
import anyio.abc

__all__ = ["Starter", "TransportListener"]

# anyio's asyncio stream and protocol (private API: the stream handed out must be anyio's own).
from anyio._backends._asyncio import SocketStream as _SocketStream
from anyio._backends._asyncio import StreamProtocol as _StreamProtocol

BACKLOG = 4096
ACCEPT_BATCH = 512  # connections taken from the accept queue per accept in a burst, at most
QUIET = 0.05  # seconds without an accept that make the next connects a burst
BURST_WINDOW = 0.1  # seconds after a quiet spell in which accepts are followed by batches
Handler = Callable[[anyio.abc.SocketStream], Any]
# Called from the loop's accept callback with each accepted stream; must not block or raise.
Starter = Callable[[anyio.abc.SocketStream], None]


class TransportListener(anyio.abc.Listener[anyio.abc.SocketStream]):
    """Serves connections on listening sockets through `loop.create_server`."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self._servers: list[asyncio.AbstractServer] = []
        self._closed = False

    async def serve(self, handler: Handler, task_group: anyio.abc.TaskGroup | None = None) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        loop = asyncio.get_running_loop()
        accepted: deque[_SocketStream] = deque()
        ready = asyncio.Event()

        async with anyio.create_task_group() as own:
            group = task_group or own
            try:
                for sock in self.sockets:
                    backlog = _Backlog(loop, sock, lambda b: _Accepted(b, accepted, ready))
                    await backlog.serve(self._servers)
                # Handlers start from this task: a protocol callback has no task, and anyio
                # needs one to know its backend. One wake-up starts a whole batch.
                while True:
                    await ready.wait()
                    ready.clear()
                    while accepted:
                        group.start_soon(handler, accepted.popleft())
            finally:
                self._close_servers()
                while accepted:  # accepted as the listener closed: never served
                    accepted.popleft()._transport.abort()

    async def serve_started(self, start: Starter) -> None:
        """Accept until cancelled (or closed), calling `start(stream)` for each connection from
        the loop's accept callback. Connections already started are the caller's to end."""
        if self._closed:
            raise anyio.ClosedResourceError
        loop = asyncio.get_running_loop()

        try:
            for sock in self.sockets:
                await _Backlog(loop, sock, lambda b: _Started(b, start)).serve(self._servers)
            await anyio.sleep_forever()
        finally:
            self._close_servers()

    def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def aclose(self) -> None:
        self._closed = True
        self._close_servers()
        for sock in self.sockets:
            sock.close()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        first = self.sockets[0]
        return {
            anyio.abc.SocketAttribute.family: lambda: first.family,
            anyio.abc.SocketAttribute.local_address: first.getsockname,
            anyio.abc.SocketAttribute.raw_socket: lambda: first,
        }


class _Backlog:
    """One listening socket: the loop's own accepts, and under uvloop the rest of a burst.

    `protocol(backlog)` makes each connection's protocol; for a connection the loop accepted,
    its `connection_made` calls `backlog.accepted(transport)`. For one taken here `backlog` is
    None, so a turn of the loop takes one batch at most and a flood cannot stall the loop.
    (asyncio's own accept already takes up to `BACKLOG` connections per turn.)
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: Callable[[_Backlog | None], asyncio.Protocol],
    ) -> None:
        self.loop = loop
        self.sock = sock
        sock.setblocking(False)  # `take` must never wait
        self.tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.one_per_turn = type(loop).__module__.startswith("uvloop")  # uvloop's accepts
        self.nodelay = self.tcp and not self.one_per_turn  # uvloop sets TCP_NODELAY itself
        self.last_accept = -math.inf  # loop time of the loop's latest accept
        self.burst_until = -math.inf
        self.empty_takes = 0  # takes in a row that found no connection waiting
        self.protocol = lambda: protocol(self)
        self.taken_protocol = lambda: protocol(None)
        self.attaching: set[asyncio.Task[object]] = set()  # strong references until attached

    async def serve(self, servers: list[asyncio.AbstractServer]) -> None:
        servers.append(
            await self.loop.create_server(self.protocol, sock=self.sock, backlog=BACKLOG)
        )

    def take(self) -> int:
        """Accept up to `ACCEPT_BATCH` waiting connections (after one the loop accepted);
        returns how many."""
        for taken in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError:  # out of descriptors, a closed listener: the loop's accept reports it
                return taken
            conn.setblocking(False)
            if self.tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._attach(conn))
            self.attaching.add(task)
            task.add_done_callback(self.attaching.discard)
        return ACCEPT_BATCH

    def accepted(self, transport: asyncio.BaseTransport) -> None:
        """The loop accepted a connection: its TCP_NODELAY, and a batch in a burst."""
        if self.nodelay:
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.one_per_turn:
            return
        now = self.loop.time()
        if now - self.last_accept >= QUIET:
            self.burst_until = now + BURST_WINDOW
            self.empty_takes = 0
        self.last_accept = now
        if now >= self.burst_until:
            return
        if self.take():
            self.empty_takes = 0
            return
        self.empty_takes += 1
        if self.empty_takes >= 2:  # connects one at a time: no burst after all
            self.burst_until = now

    async def _attach(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.taken_protocol, conn)
        except OSError:  # reset before it was attached
            conn.close()


class _Accepted(_StreamProtocol):
    """anyio's stream protocol that queues its stream for a handler once connected."""

    def __init__(
        self, backlog: _Backlog | None, accepted: deque[_SocketStream], ready: asyncio.Event
    ) -> None:
        self._backlog = backlog
        self._accepted = accepted
        self._ready = ready

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        stream = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses
        stream.pause_reading()  # anyio reads on demand
        if self._backlog is not None:
            self._backlog.accepted(transport)
        self._accepted.append(_SocketStream(stream, self))
        self._ready.set()


class _Started(_StreamProtocol):
    """anyio's stream protocol that hands its stream to a `Starter` once connected."""

    def __init__(self, backlog: _Backlog | None, start: Starter) -> None:
        self._backlog = backlog
        self._start = start

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        stream = cast(asyncio.Transport, transport)
        stream.pause_reading()  # anyio reads on demand
        if self._backlog is not None:
            self._backlog.accepted(transport)
        self._start(_SocketStream(stream, self))
