"""`ReplayStream`: a byte stream that first returns bytes already read (peeked).

Tunnel routing peeks at the first bytes to choose a path (SPEC §7.3) and replays them to
whichever path is taken, so nothing is ever lost or consumed twice.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

__all__ = ["ReplayStream", "peek"]


class ReplayStream(anyio.abc.ByteStream):
    """Wraps `inner`; `receive` returns `prefix` before reading from `inner`."""

    __slots__ = ("_closed", "_prefix", "inner")

    def __init__(self, inner: anyio.abc.ByteStream, prefix: bytes = b"") -> None:
        self.inner = inner
        self._prefix = prefix
        self._closed = False

    def __repr__(self) -> str:
        return f"<ReplayStream pending={len(self._prefix)} inner={self.inner!r}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> bytes:
        return self._prefix

    def push_front(self, data: bytes) -> None:
        self._prefix = data + self._prefix

    def take_pending(self) -> bytes:
        """Remove and return the bytes not yet received (the caller reads `inner` itself)."""
        data, self._prefix = self._prefix, b""
        return data

    def mark_closed(self) -> None:
        """`inner` was closed by other means: `aclose` has nothing left to do."""
        self._closed = True

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self.inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self.inner.extra_attributes


async def peek(
    stream: ReplayStream, want: int, *, first_byte_timeout: float | None, total_timeout: float
) -> bytes:
    """Read until `want` bytes are buffered (or EOF/timeout) without consuming them.

    `first_byte_timeout` bounds the wait for the first byte (server-first protocols send
    nothing); returns ``b""`` when it expires.
    """
    data = stream.pending
    try:
        if not data and first_byte_timeout is not None:
            with anyio.move_on_after(first_byte_timeout):
                data += await stream.inner.receive()
            if not data:
                return b""
        with anyio.move_on_after(total_timeout):
            while len(data) < want:
                data += await stream.inner.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # a reset while peeking is an end of input: the caller's next read reports it
    stream._prefix = data
    return data


def is_tls(stream: anyio.abc.AnyByteStream) -> bool:
    return isinstance(stream, TLSStream)
