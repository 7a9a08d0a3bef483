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
"""

from __future__ import annotations

import asyncio
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

        def protocol() -> asyncio.Protocol:
            return _Accepted(accepted, ready)

        async with anyio.create_task_group() as own:
            group = task_group or own
            try:
                for sock in self.sockets:
                    self._servers.append(
                        await loop.create_server(protocol, sock=sock, backlog=BACKLOG)
                    )
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

        def protocol() -> asyncio.Protocol:
            return _Started(start)

        try:
            for sock in self.sockets:
                self._servers.append(await loop.create_server(protocol, sock=sock, backlog=BACKLOG))
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


class _Accepted(_StreamProtocol):
    """anyio's stream protocol that queues its stream for a handler once connected."""

    def __init__(self, accepted: deque[_SocketStream], ready: asyncio.Event) -> None:
        self._accepted = accepted
        self._ready = ready

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        stream = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses
        stream.pause_reading()  # anyio reads on demand
        self._accepted.append(_SocketStream(stream, self))
        self._ready.set()


class _Started(_StreamProtocol):
    """anyio's stream protocol that hands its stream to a `Starter` once connected."""

    def __init__(self, start: Starter) -> None:
        self._start = start

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        stream = cast(asyncio.Transport, transport)
        stream.pause_reading()  # anyio reads on demand
        self._start(_SocketStream(stream, self))
