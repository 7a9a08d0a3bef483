"""TLS on an accepted or dialled socket with the event loop's own TLS (`loop.start_tls`).

anyio's `TLSStream` drives an `ssl.SSLObject` from Python, record by record, on top of a
`SocketStream` that pauses and resumes reading around every receive. uvloop implements the
same TLS machinery in Cython (plain asyncio has it in `asyncio.sslproto`), so the MITM legs
(the leaf towards the client, verified TLS towards the origin) run it there and hand the rest
of the proxy a small `anyio.abc.ByteStream` over the TLS transport.

`start_tls` works on an anyio asyncio-backend socket stream, optionally behind a
`ReplayStream` whose pending bytes (the peeked ClientHello) are fed to the TLS layer before it
starts. Anything else (another backend, a stream type it does not know, a socket that already
saw EOF) goes through anyio's `TLSStream`, with the same behaviour for the caller.

Behaviour of `TlsStream` (same as `TLSStream(standard_compatible=False)` unless noted):

- `receive` returns decrypted bytes, `EndOfStream` after the peer's close_notify or a bare
  TCP EOF, `BrokenResourceError` after a reset or a TLS error.
- `send` returns once the bytes are in the kernel's socket buffer (like anyio's socket stream,
  whose write-buffer limit of 0 the socket keeps): a thin protocol between the socket and the
  TLS layer reports when the socket's own buffer is drained. After the peer has closed, `send`
  raises `BrokenResourceError` (the TLS layer does not support half-close; `send_eof` raises
  `NotImplementedError`, as anyio's does).
- `aclose` aborts the connection (a TCP close without close_notify, like anyio's); nothing
  sent is lost, since `send` waited for the socket buffer.
- Extra attributes: `TLSAttribute.*` from the SSL object and the socket addresses; no
  `raw_socket` (nothing may bypass TLS, e.g. splice it).
- Callback use (not in anyio's): `set_listener` has a function called from the event loop on
  every arrival, EOF, loss and drained writer; it reads with `take`, writes with `write` and
  closes with `abort`, so a caller can relay without a task waking per arrival. Bytes not
  taken stay buffered exactly as bytes not received do.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import types
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.tls import TLSAttribute, TLSStream

from .streams import ReplayStream

__all__ = ["TlsStream", "start_tls"]

READ_HIGH = 256 * 1024  # decrypted bytes buffered before reading from the socket pauses
READ_LOW = 64 * 1024


async def start_tls(
    stream: anyio.abc.ByteStream,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    hostname: str | None = None,
    handshake_timeout: float,
) -> anyio.abc.ByteStream:
    """Run the TLS handshake on `stream` and return the encrypted stream.

    The caller bounds the handshake (e.g. `anyio.fail_after`); `handshake_timeout` is also
    given to the TLS layer as its own limit. Takes ownership of `stream` on success.

    Raises:
        ssl.SSLError: the handshake failed (`ssl.SSLCertVerificationError` for a certificate).
        OSError, anyio.BrokenResourceError, anyio.EndOfStream: the connection broke.
    """
    native = _native_parts(stream)
    if native is None:
        return await TLSStream.wrap(
            stream,
            server_side=server_side,
            hostname=hostname,
            ssl_context=context,
            standard_compatible=False,
        )
    transport, prefix = native
    loop = asyncio.get_running_loop()
    protocol = _Protocol()
    socket_side = _SocketSide(protocol)
    coro = loop.start_tls(
        transport,
        protocol,
        context,
        server_side=server_side,
        server_hostname=None if server_side else hostname,
        # The loop's own bound as a backstop (it must be a finite positive number).
        ssl_handshake_timeout=handshake_timeout if 0 < handshake_timeout < 86400 else None,
    )
    tls_transport = await _primed(coro, lambda: socket_side.install(transport, prefix))
    if tls_transport is None:  # the loop closed the transport meanwhile
        raise anyio.BrokenResourceError
    # Back-pressure acts on the socket: `start_tls` never calls `connection_made`, and pausing
    # the TLS transport instead loses decrypted bytes on uvloop when the peer closes meanwhile.
    protocol.transport = transport
    return TlsStream(tls_transport, protocol)


class TlsStream(anyio.abc.ByteStream):
    """A `ByteStream` over an asyncio TLS transport made by `start_tls`."""

    __slots__ = ("_closed", "_protocol", "_transport")

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closed = False
        transport.set_write_buffer_limits(1, 0)  # any pending byte pauses the writer

    def __repr__(self) -> str:
        return f"<TlsStream closed={self._closed} peer={self._peer()}>"

    def _peer(self) -> Any:
        return self._transport.get_extra_info("peername")

    async def receive(self, max_bytes: int = 65536) -> bytes:
        protocol = self._protocol
        chunks = protocol.chunks
        if not chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if not (protocol.eof or protocol.lost):
                waiter = protocol.read_waiter = asyncio.get_running_loop().create_future()
                try:
                    await waiter
                finally:
                    protocol.read_waiter = None
            if not chunks:
                if self._closed:
                    raise anyio.ClosedResourceError
                if protocol.error is not None:
                    raise anyio.BrokenResourceError from protocol.error
                raise anyio.EndOfStream
        chunk = chunks.popleft()
        if len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            chunks.appendleft(rest)
        protocol.size -= len(chunk)
        if protocol.reading_paused and protocol.size <= READ_LOW:
            protocol.resume()
        return chunk

    async def receive_within(self, timeout: float, max_bytes: int = 65536) -> bytes:
        """`receive`, raising `TimeoutError` when nothing arrives within `timeout` seconds
        (or when `cancel_wait` ends the wait): a timer, not a cancel scope per call."""
        protocol = self._protocol
        if not protocol.chunks and not (protocol.eof or protocol.lost or self._closed):
            loop = asyncio.get_running_loop()
            waiter = protocol.read_waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                protocol.read_waiter = None
        return await self.receive(max_bytes)

    def cancel_wait(self) -> None:
        """End a pending `receive_within` with `TimeoutError` (a shutdown ending idle waits)."""
        _expire(self._protocol.read_waiter)

    # --- callback use: no task wakes up per arrival ---------------------------------------

    def set_listener(self, listener: Callable[[], None] | None) -> None:
        """Call `listener()` from the event loop on every arrival, EOF, loss, drained writer
        and close, until it is set to None. It must not raise; it reads with `take`."""
        self._protocol.listener = listener

    def take(self) -> bytes:
        """Every decrypted byte received and not yet read, without waiting (b"" if none)."""
        protocol = self._protocol
        chunks = protocol.chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        protocol.size = 0
        if protocol.reading_paused:
            protocol.resume()
        return data

    @property
    def ended(self) -> bool:
        """Nothing is left to read and nothing more will come (EOF, loss or our close)."""
        protocol = self._protocol
        return not protocol.chunks and (protocol.eof or protocol.lost or self._closed)

    @property
    def idle(self) -> bool:
        """Open, with nothing unread (no byte has come that nobody asked for)."""
        protocol = self._protocol
        return not (protocol.chunks or protocol.eof or protocol.lost or self._closed)

    @property
    def write_blocked(self) -> bool:
        """Bytes written are still waiting for the kernel's socket buffer."""
        protocol = self._protocol
        return protocol.writing_paused or protocol.socket_paused

    def write(self, data: bytes) -> None:
        """`send` without waiting for the socket buffer (see `write_blocked`); same errors."""
        self._check_writable()
        self._transport.write(data)

    def abort(self) -> None:
        """`aclose` from a callback."""
        if not self._closed:
            self._closed = True
            self._close()

    async def send(self, item: bytes) -> None:
        protocol = self._protocol
        if protocol.writing_paused or protocol.socket_paused:
            await self._drained()
        self._check_writable()
        self._transport.write(item)
        if protocol.writing_paused or protocol.socket_paused:
            await self._drained()

    def _check_writable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        protocol = self._protocol
        if protocol.lost or protocol.eof or self._transport.is_closing():
            raise anyio.BrokenResourceError from protocol.error

    async def _drained(self) -> None:
        protocol = self._protocol
        while (protocol.writing_paused or protocol.socket_paused) and not (
            protocol.lost or self._closed
        ):
            waiter = protocol.write_waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                protocol.write_waiter = None
        self._check_writable()

    async def send_eof(self) -> None:
        raise NotImplementedError("TLS streams do not support half-close")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()
        await anyio.lowlevel.checkpoint()

    def _close(self) -> None:
        if not self._protocol.lost:
            self._transport.abort()
        self._protocol.wake()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        transport = self._transport
        ssl_object: ssl.SSLObject = transport.get_extra_info("ssl_object")

        def sockname() -> Any:
            return _address(transport.get_extra_info("sockname"))

        def peername() -> Any:
            return _address(transport.get_extra_info("peername"))

        attributes: dict[Any, Callable[[], Any]] = {
            TLSAttribute.alpn_protocol: ssl_object.selected_alpn_protocol,
            TLSAttribute.channel_binding_tls_unique: lambda: ssl_object.get_channel_binding(
                "tls-unique"
            ),
            TLSAttribute.cipher: ssl_object.cipher,
            TLSAttribute.peer_certificate: lambda: ssl_object.getpeercert(False),
            TLSAttribute.peer_certificate_binary: lambda: ssl_object.getpeercert(True),
            TLSAttribute.server_side: lambda: ssl_object.server_side,
            TLSAttribute.shared_ciphers: lambda: (
                ssl_object.shared_ciphers() if ssl_object.server_side else None
            ),
            TLSAttribute.ssl_object: lambda: ssl_object,
            TLSAttribute.standard_compatible: lambda: False,
            TLSAttribute.tls_version: ssl_object.version,
            anyio.abc.SocketAttribute.local_address: sockname,
            anyio.abc.SocketAttribute.remote_address: peername,
        }
        family = _family(sockname())
        if family is not None:
            attributes[anyio.abc.SocketAttribute.family] = lambda: family
            if family in (socket.AF_INET, socket.AF_INET6):
                attributes[anyio.abc.SocketAttribute.local_port] = lambda: sockname()[1]
                attributes[anyio.abc.SocketAttribute.remote_port] = lambda: peername()[1]
        return attributes


class _Protocol(asyncio.Protocol):
    """The application side of the TLS transport: buffers decrypted bytes, tracks flow."""

    __slots__ = (
        "chunks",
        "eof",
        "error",
        "listener",
        "lost",
        "read_waiter",
        "reading_paused",
        "size",
        "socket_paused",
        "transport",
        "write_waiter",
        "writing_paused",
    )

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.eof = False
        self.lost = False
        self.error: BaseException | None = None
        self.read_waiter: asyncio.Future[None] | None = None
        self.write_waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.socket_paused = False  # the socket's own write buffer holds bytes
        self.transport: asyncio.Transport | None = None
        self.listener: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > READ_HIGH and self.transport is not None:
            # Every time: the TLS layer may resume the socket for its own reasons.
            self.reading_paused = True
            self.transport.pause_reading()
        waiter = self.read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.listener is not None:
            self.listener()

    def resume(self) -> None:
        """Read from the socket again (the reader took enough of what was buffered)."""
        self.reading_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        self.eof = True
        self.wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is not None and self.error is None:
            self.error = exc
        self.wake()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.wake_writer()

    def wake_writer(self) -> None:
        waiter = self.write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.listener is not None:
            self.listener()

    def wake(self) -> None:
        for waiter in (self.read_waiter, self.write_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self.listener is not None:
            self.listener()


class _SocketSide(asyncio.BufferedProtocol):
    """Sits between the socket transport and the loop's TLS protocol, passing everything on.

    It exists to see the socket's own flow control: the socket pauses its protocol while its
    write buffer holds bytes (anyio set its limit to 0), and the TLS layer alone would not
    tell the application when those bytes have reached the kernel.
    """

    __slots__ = ("_app", "_tls")

    def __init__(self, app: _Protocol) -> None:
        self._app = app
        self._tls: Any = None

    def install(self, transport: asyncio.Transport, prefix: bytes) -> None:
        """Called right after `loop.start_tls` put its TLS protocol on `transport`: feed it
        the bytes read before the upgrade, then take its place in front of it."""
        tls: Any = transport.get_protocol()
        if not (hasattr(tls, "get_buffer") and hasattr(tls, "buffer_updated")):
            raise anyio.BrokenResourceError("unexpected TLS protocol")
        self._tls = tls
        view = memoryview(prefix)
        while view:
            buffer = tls.get_buffer(len(view))
            n = min(len(buffer), len(view))
            if n <= 0:
                raise anyio.BrokenResourceError("TLS layer offered no buffer")
            buffer[:n] = view[:n]
            tls.buffer_updated(n)
            view = view[n:]
        transport.set_protocol(self)

    def get_buffer(self, sizehint: int) -> Any:
        return self._tls.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._tls.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        result: bool | None = self._tls.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self._app.socket_paused = False
        self._tls.connection_lost(exc)
        self._app.wake_writer()

    def pause_writing(self) -> None:
        self._app.socket_paused = True
        self._tls.pause_writing()

    def resume_writing(self) -> None:
        self._app.socket_paused = False
        self._tls.resume_writing()
        self._app.wake_writer()


def _expire(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_exception(TimeoutError())


def _native_parts(stream: anyio.abc.ByteStream) -> tuple[Any, bytes] | None:
    """The asyncio transport under `stream` and the bytes already read from it, or None.

    Only for anyio's asyncio-backend socket stream (optionally behind a `ReplayStream`), whose
    transport the loop can upgrade, and only when the socket is still open for reading.
    """
    prefix = b""
    if isinstance(stream, ReplayStream):
        prefix = stream.pending
        stream = stream.inner
    if type(stream).__module__ != "anyio._backends._asyncio" or type(stream).__name__ != (
        "SocketStream"
    ):
        return None
    transport: Any = getattr(stream, "_transport", None)
    protocol: Any = getattr(stream, "_protocol", None)
    if protocol is None or not all(  # uvloop's transports do not subclass asyncio's
        hasattr(transport, name) for name in ("get_protocol", "set_protocol", "is_closing")
    ):
        return None
    if not getattr(transport, "_start_tls_compatible", True):  # asyncio's marker
        return None
    queue = getattr(protocol, "read_queue", None)
    if (
        queue is None
        or getattr(protocol, "is_at_eof", True)
        or getattr(protocol, "exception", None) is not None
        or getattr(stream, "_closed", True)
        or transport.is_closing()
    ):
        return None
    if queue:
        prefix += b"".join(queue)
        queue.clear()
        event = getattr(protocol, "read_event", None)
        if event is not None:
            event.clear()
    return transport, prefix


@types.coroutine
def _primed(coro: Coroutine[Any, Any, Any], prime: Callable[[], None]) -> Generator[Any, Any, Any]:
    """Await `coro`, calling `prime()` right after its first step.

    `loop.start_tls` installs its TLS protocol on the transport and schedules the protocol's
    `connection_made` in its first step; bytes fed in between are what the handshake reads
    first (the ClientHello that routing already peeked at).
    """
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value
    try:
        prime()
    except BaseException as exc:
        with contextlib.suppress(StopIteration):
            coro.throw(exc)  # start_tls closes the transport and re-raises
        raise
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


def _address(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) > 2:
        return value[:2]  # IPv6: anyio reports (host, port)
    return value


def _family(address: Any) -> socket.AddressFamily | None:
    if isinstance(address, tuple) and address:
        return socket.AF_INET6 if ":" in str(address[0]) else socket.AF_INET
    if isinstance(address, str):
        return socket.AF_UNIX
    return None
