"""The two borrowed sockets of a plain-HTTP fast-path connection (`fast_forward.py`).

`ClientSide` buffers what the client sends; `OriginLink` sends one request at a time to its
origin and relays the response from its data callback straight into the client's transport.
Neither decides anything: an exchange ends with an `Outcome` handed to its owner's callback,
which chooses what happens next (the next request, or a hand-over to the h11 session).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from typing import Final

import anyio.abc

from ..net.adopt import Adopted
from ..proto.h1_fast import find_head_end, simple_response
from .origin import Origin
from .origin_pool import OriginPool

__all__ = ["READ_PAUSE", "ClientSide", "OriginLink", "Outcome"]

READ_PAUSE: Final = 1 << 18  # stop reading a client that has this much unconsumed input


class Outcome(enum.Enum):
    DONE = enum.auto()  # response relayed in full
    FALLBACK = enum.auto()  # nothing sent to the client; h11 must judge the response
    TIMEOUT = enum.auto()  # the origin went quiet for `idle_timeout`
    BROKEN = enum.auto()  # the origin failed after the response began: close the client
    CLIENT_GONE = enum.auto()


class ClientSide(Adopted):
    """The client's side: buffered input, a waiter a task may sleep on, the live exchange."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        super().__init__(stream)
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[object] | None = None
        self.exchange: OriginLink | None = None
        self.on_bytes: Callable[[], None] | None = None  # set while callbacks await a request
        self.reading_paused = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_PAUSE and not self.reading_paused:
            self.set_reading(False)
            self.reading_paused = True
        self.on_input()

    def consume(self, n: int) -> bytes:
        taken = bytes(self.buffer[:n])
        del self.buffer[:n]
        if self.reading_paused and len(self.buffer) <= READ_PAUSE // 2:
            self.set_reading(True)
            self.reading_paused = False
        return taken

    def on_input(self) -> None:
        self._wake()
        if self.lost and self.exchange is not None:
            self.exchange.finish(Outcome.CLIENT_GONE)
        if self.on_bytes is not None:
            self.on_bytes()

    def on_write_paused(self) -> None:
        if self.exchange is not None:
            self.exchange.set_reading(False)

    def on_writable(self) -> None:
        if self.exchange is not None:
            self.exchange.set_reading(True)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def cancel(self) -> None:
        """End a task's wait for the next request (shutdown: see `ProxyContext.idle_waits`)."""
        if self.waiter is not None:
            end_wait(self.waiter)

    async def wait(self) -> None:
        """Sleep until input, EOF, loss or a drained writer."""
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def drain(self) -> None:
        """Wait until every byte written has left for the kernel (anyio closes by abort)."""
        if self.lost or not self.transport.get_write_buffer_size():
            return
        self.transport.set_write_buffer_limits(0)  # pauses us until the buffer is empty
        while self.write_paused and not self.lost:
            await self.wait()


class OriginLink(Adopted):
    """One origin connection: relays each response's head and body into the client's transport.

    An exchange runs from `begin` to the `Outcome` passed to its `on_done`; between exchanges
    the link is idle, and any byte or close from the origin makes it unusable.
    """

    def __init__(self, origin: Origin, key: tuple[object, ...], rules: object) -> None:
        super().__init__(origin.stream)
        self.origin = origin
        self.key = key
        self.rules = rules  # the compiled rules it was opened under (see `OriginPool`)
        self.parked: OriginPool | None = None
        self.reusable = True
        self.client: ClientSide | None = None
        self.on_done: Callable[[Outcome], None] | None = None  # set while an exchange runs
        self.remaining = 0
        self.in_body = False
        self.started = False
        self.bodiless = False
        self.close_client = False
        self.limit = 0
        self.last = 0.0  # when the origin last sent something (see the owner's idle clock)
        self.loop = asyncio.get_running_loop()

    def begin(
        self,
        client: ClientSide,
        request: bytes,
        on_done: Callable[[Outcome], None],
        *,
        bodiless: bool,
        close: bool,
        limit: int,
    ) -> None:
        """Send `request`; its response goes to `client`, then `on_done` gets the outcome.

        Args:
            close: the client connection ends after this response (``Connection: close``).
        """
        self.client, self.on_done, client.exchange = client, on_done, self
        self.remaining, self.in_body, self.started = 0, False, False
        self.bodiless, self.close_client, self.limit = bodiless, close, limit
        self.last = self.loop.time()
        if client.lost:
            self.finish(Outcome.CLIENT_GONE)
            return
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # between exchanges, or after a fallback (the bytes are h11's)
            self.buffer += data
            self.set_reading(False)
            self._unusable()
            return
        self.last = self.loop.time()
        if self.in_body:
            n = len(data)
            if n < self.remaining:
                self.remaining -= n
                client.transport.write(data)
                return
            if n > self.remaining:
                self.reusable = False
                data = data[: self.remaining]
            self.remaining = 0
            client.transport.write(data)
            self.finish(Outcome.DONE)
            return
        self.buffer += data
        self._on_head(client)

    def _on_head(self, client: ClientSide) -> None:
        end = find_head_end(self.buffer)
        if end is None:
            if len(self.buffer) > self.limit:
                self.finish(Outcome.FALLBACK)
            return
        response = simple_response(
            self.buffer, end, bodiless=self.bodiless, limit=self.limit, close=self.close_client
        )
        if response is None:
            self.finish(Outcome.FALLBACK)
            return
        length = response.length
        if not response.keep_alive or len(self.buffer) > end + length:
            self.reusable = False
        body = bytes(self.buffer[end : end + length])
        self.buffer.clear()
        self.started = True
        client.transport.write(response.head + body)
        self.remaining = length - len(body)
        if self.remaining:
            self.in_body = True
        else:
            self.finish(Outcome.DONE)

    def finish(self, outcome: Outcome) -> None:
        """End the running exchange (no-op if none runs) and tell its owner."""
        on_done, client = self.on_done, self.client
        if on_done is None or client is None:
            return
        self.on_done = self.client = client.exchange = None
        self.in_body = False
        if outcome is Outcome.FALLBACK:
            self.reusable = False
            self.set_reading(False)  # what follows is h11's to read
        else:
            if outcome is not Outcome.DONE:
                self.reusable = False
            self.set_reading(True)  # paused for a slow client, or a close to notice while idle
        on_done(outcome)

    def abandon(self) -> None:
        """Drop a running exchange without an outcome (its task was cancelled): not reusable."""
        self.reusable = False
        client = self.client
        if client is not None:
            self.on_done = self.client = client.exchange = None

    def on_input(self) -> None:  # EOF or loss (data goes through data_received)
        if self.client is None:
            self._unusable()
        elif self.in_body:
            self.finish(Outcome.BROKEN)
        else:
            self.finish(Outcome.FALLBACK)  # h11 reports the early close exactly as before

    def _unusable(self) -> None:
        self.reusable = False
        if self.parked is not None:
            self.parked.discard(self.key, self)

    def usable(self) -> bool:
        """Idle and fit for another request."""
        return self.reusable and not (self.lost or self.eof or self.buffer) and self.client is None

    def closed_unanswered(self) -> bool:
        """The origin closed the connection without a byte of response."""
        return not self.buffer and (self.eof or self.lost)

    def close(self) -> None:
        """Close the origin connection (it is ours alone: no anyio stream uses it again)."""
        self.parked = None
        if self.saved is not None:
            self.saved = None
            self.transport.abort()


def end_wait(waiter: asyncio.Future[object]) -> None:
    """End a wait with False (timed out or shut down)."""
    if not waiter.done():
        waiter.set_result(False)
