"""Two-way byte pump with half-close and a shared idle timeout (SPEC §5.6, §15).

Opaque tunnels (CONNECT, SOCKS) and upgraded connections end here. The idle clock is shared:
a long download with a silent upload is not idle.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import anyio.lowlevel

from .streams import ReplayStream

__all__ = ["relay"]

CHUNK = 256 * 1024
_CLOSED = (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError)

# Linux zero-copy for bulk transfers between two plain TCP sockets: socket → pipe → socket
# with splice(2), no copy through user space. A direction switches to it only after a chunk of
# at least SPLICE_AFTER bytes (idle and interactive tunnels keep no pipe or extra descriptors).
_SPLICE = sys.platform == "linux" and hasattr(os, "splice")
SPLICE_AFTER = 64 * 1024
PIPE_SIZE = 1 << 20


async def relay(
    a: anyio.abc.ByteStream,
    b: anyio.abc.ByteStream,
    *,
    idle_timeout: float,
    before_forward: Callable[[], Awaitable[bool]] | None = None,
) -> tuple[int, int]:
    """Copy a→b and b→a until both directions end, one breaks, or nothing moves for
    `idle_timeout` seconds. Both streams are closed on return.

    `before_forward` runs in the a→b direction before its first byte is copied (b→a flows
    meanwhile); returning False ends the relay.

    Returns:
        bytes copied (a→b, b→a).
    """
    last = time.monotonic()
    counts = [0, 0]
    finished = 0

    async def pump(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, index: int) -> None:
        nonlocal last, finished
        if index == 0 and before_forward is not None and not await before_forward():
            tg.cancel_scope.cancel()
            return
        try:
            while True:
                data = await src.receive(CHUNK)
                last = time.monotonic()
                counts[index] += len(data)
                await dst.send(data)
                if _SPLICE and len(data) >= SPLICE_AFTER:
                    fds = _splice_fds(src, dst)
                    if fds is not None:
                        await _splice(*fds, index)
                        raise anyio.EndOfStream
        except anyio.EndOfStream:
            try:
                await dst.send_eof()
            except (NotImplementedError, *_CLOSED):
                tg.cancel_scope.cancel()
        except _CLOSED:
            tg.cancel_scope.cancel()
            return
        finished += 1
        if finished == 2:
            tg.cancel_scope.cancel()

    async def _splice(src_fd: int, dst_fd: int, index: int) -> None:
        """Copy src → dst with splice(2) until EOF (returns) or an error (raises OSError)."""
        nonlocal last
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        with contextlib.ExitStack() as stack:
            # Own duplicates: the event loop refuses to watch a descriptor a transport owns.
            src_dup, dst_dup = os.dup(src_fd), os.dup(dst_fd)
            stack.callback(os.close, src_dup)
            stack.callback(os.close, dst_dup)
            pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            stack.callback(os.close, pipe_r)
            stack.callback(os.close, pipe_w)
            with contextlib.suppress(OSError):
                import fcntl

                fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            while True:
                try:
                    n = os.splice(src_dup, pipe_w, PIPE_SIZE, flags=flags)
                except BlockingIOError:
                    await anyio.wait_readable(src_dup)
                    continue
                if n == 0:
                    return
                last = time.monotonic()
                counts[index] += n
                while n:
                    try:
                        n -= os.splice(pipe_r, dst_dup, n, flags=flags)
                    except BlockingIOError:
                        await anyio.wait_writable(dst_dup)
                await anyio.lowlevel.checkpoint()

    async def watchdog() -> None:
        while (remaining := last + idle_timeout - time.monotonic()) > 0:
            await anyio.sleep(remaining)
        tg.cancel_scope.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, a, b, 0)
            tg.start_soon(pump, b, a, 1)
            tg.start_soon(watchdog)
    finally:
        with anyio.CancelScope(shield=True):
            await a.aclose()
            await b.aclose()
    return counts[0], counts[1]


def _splice_fds(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> tuple[int, int] | None:
    """Descriptors of two plain TCP sockets with nothing held in user space, else None."""
    if isinstance(src, ReplayStream):
        if src.pending:
            return None
        src = src.inner
    if isinstance(dst, ReplayStream):
        dst = dst.inner
    src_fd, dst_fd = _idle_socket_fd(src), _idle_socket_fd(dst)
    if src_fd is None or dst_fd is None:
        return None
    return src_fd, dst_fd


def _idle_socket_fd(stream: anyio.abc.ByteStream) -> int | None:
    """The TCP socket under an asyncio-backend anyio stream with no buffered bytes either way.

    Looks at anyio internals (its transport/protocol); anything unexpected means "no".
    """
    if type(stream).__module__ != "anyio._backends._asyncio":
        return None
    protocol = getattr(stream, "_protocol", None)
    transport = getattr(stream, "_transport", None)
    if protocol is None or transport is None:
        return None
    if getattr(protocol, "read_queue", True) or getattr(protocol, "is_at_eof", True):
        return None
    if getattr(protocol, "exception", None) is not None or transport.is_closing():
        return None
    try:
        if transport.get_write_buffer_size():
            return None
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return None
        fd = sock.fileno()
    except (anyio.TypedAttributeLookupError, AttributeError, OSError, NotImplementedError):
        return None
    return fd if fd >= 0 else None
