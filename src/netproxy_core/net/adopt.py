"""Borrow the asyncio transport under an anyio TCP stream, and give it back intact.

The plain-forwarding fast path drives sockets with protocol callbacks (one callback per
read, writes straight to the transport) instead of anyio's awaitable `receive`/`send`,
which pause and resume reading around every call and checkpoint on every send. It borrows
the transport of an anyio asyncio `SocketStream` by installing its own protocol, and hands
it back — bytes read but not consumed, end-of-file, a lost connection and a paused writer
all carried over — so the stream then works exactly as if anyio had read those bytes itself.

Only anyio's asyncio backend stream over a TCP transport qualifies (`adoptable`); any other
stream (TLS, unix, trio) simply never takes the fast path.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Any

import anyio.abc

__all__ = ["Adopted", "adoptable", "close_now", "peer_address", "write_now"]

try:  # anyio's asyncio backend (private: checked by type, used through three attributes)
    from anyio._backends._asyncio import SocketStream as _AnyioSocketStream
    from anyio._backends._asyncio import StreamProtocol as _AnyioProtocol
except ImportError:  # pragma: no cover - another anyio layout: no fast path
    _AnyioSocketStream = None  # type: ignore[assignment,misc]
    _AnyioProtocol = None  # type: ignore[assignment,misc]

HIGH_WATER = 1 << 18  # bytes queued in a transport before its writer is paused


def peer_address(stream: anyio.abc.SocketStream) -> tuple[str, int] | None:
    """The TCP peer of an accepted stream; None for other families or a vanished peer.

    An asyncio transport caches its peer name (anyio's `extra` rebuilds its whole attribute
    table per call). Nothing to set here: TCP_NODELAY is on already (`net.listener` sees to it
    on every loop; anyio's own listeners and dials set it too).
    """
    if _AnyioSocketStream is not None and type(stream) is _AnyioSocketStream:
        peer = stream._transport.get_extra_info("peername")
        return (peer[0], peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else None
    try:
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        address = sock.getpeername()
    except (OSError, anyio.TypedAttributeLookupError):
        return None
    return str(address[0]), int(address[1])


def close_now(stream: anyio.abc.ByteStream) -> bool:
    """Close an anyio asyncio TCP stream as its `aclose` does, without the extra loop turn.

    Returns False for any other stream (close that one with `aclose`).
    """
    if _AnyioSocketStream is None or type(stream) is not _AnyioSocketStream:
        return False
    stream._closed = True
    stream._transport.abort()
    return True


def write_now(stream: anyio.abc.ByteStream, data: bytes) -> bool:
    """Write to an anyio asyncio TCP stream's transport at once, as its `send` would.

    True when written; False when the stream is another kind, or its writer is paused or
    closing (use `send`, which waits or raises as anyio does). Saves `send`'s loop turn.
    """
    if _AnyioSocketStream is None or type(stream) is not _AnyioSocketStream:
        return False
    protocol: Any = stream._protocol
    transport: Any = stream._transport
    if (
        stream._closed
        or transport.is_closing()
        or protocol.exception is not None
        or not hasattr(protocol, "write_event")
        or not protocol.write_event.is_set()
    ):
        return False
    transport.write(data)
    return True


def adoptable(stream: anyio.abc.ByteStream) -> bool:
    """An anyio asyncio TCP stream whose transport can be borrowed right now."""
    if _AnyioSocketStream is None or type(stream) is not _AnyioSocketStream:
        return False
    protocol: Any = stream._protocol
    transport: Any = stream._transport
    return (
        isinstance(protocol, _AnyioProtocol)  # anyio's, or a subclass (`net.listener`'s)
        and hasattr(protocol, "read_queue")  # not borrowed already
        and protocol.exception is None
        and not stream._closed
        and not transport.is_closing()
        and transport.get_protocol() is protocol
        and transport.get_extra_info("socket") is not None
    )


class Adopted(asyncio.Protocol):
    """Base protocol for a borrowed transport: buffered input, EOF, loss, write pausing.

    anyio's read queue and events are dropped while the transport is borrowed (an idle tunnel
    keeps neither) and rebuilt by `restore`.
    """

    __slots__ = (
        "buffer",
        "eof",
        "error",
        "lost",
        "reading",
        "saved",
        "stream",
        "transport",
        "write_paused",
    )

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream: Any = stream
        self.transport: Any = stream._transport  # type: ignore[attr-defined]
        self.saved: Any = None  # anyio's protocol while we hold the transport
        self.buffer = bytearray()
        self.eof = False
        self.lost = False
        self.error: Exception | None = None
        self.write_paused = False
        self.reading = False  # anyio leaves a transport paused between receives

    @property
    def adopted(self) -> bool:
        return self.saved is not None

    def adopt(self, *, read: bool = True) -> None:
        """Install this protocol; anything anyio had read already moves into `buffer`."""
        protocol = self.stream._protocol
        for chunk in protocol.read_queue:
            self.buffer += chunk
        self.eof = protocol.is_at_eof
        self.write_paused = not protocol.write_event.is_set()
        del protocol.read_queue, protocol.read_event, protocol.write_event
        self.saved = protocol
        self.transport.set_protocol(self)
        self.transport.set_write_buffer_limits(HIGH_WATER)
        if read and not self.eof:
            self.set_reading(True)

    def restore(self) -> None:
        """Give the transport back to anyio with our unread bytes in its read queue."""
        protocol, self.saved = self.saved, None
        if protocol is None:
            return
        protocol.read_queue = deque()
        protocol.read_event = asyncio.Event()
        protocol.write_event = asyncio.Event()
        protocol.write_event.set()
        self.set_reading(False)
        self.transport.set_protocol(protocol)
        if self.buffer:
            protocol.read_queue.append(bytes(self.buffer))
            self.buffer.clear()
            protocol.read_event.set()
        if self.eof:
            protocol.eof_received()
        if self.lost:
            protocol.connection_lost(self.error)
            return
        if self.write_paused:
            protocol.pause_writing()  # the transport resumes it once drained
        if not self.transport.is_closing():
            self.transport.set_write_buffer_limits(0)

    def set_reading(self, want: bool) -> None:
        """Resume or pause reading (kept track of: transports differ on repeated calls)."""
        if want != self.reading and not self.lost and not self.transport.is_closing():
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # --- asyncio.Protocol -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.on_input()

    def eof_received(self) -> bool:
        self.eof = True
        self.on_input()
        return True  # keep the write side open (half-close), as anyio does

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.error, self.reading = True, exc, False
        self.write_paused = False
        self.on_input()
        self.on_writable()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.on_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.on_writable()

    # --- for subclasses -------------------------------------------------------------------

    def on_input(self) -> None:
        """New bytes in `buffer`, or EOF, or the connection was lost."""

    def on_write_paused(self) -> None:
        """The transport holds more than `HIGH_WATER` unsent bytes."""

    def on_writable(self) -> None:
        """The transport drained below its low-water mark (or the connection was lost)."""
