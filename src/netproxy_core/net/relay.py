"""Two-way byte pump with half-close and a shared idle timeout (SPEC §5.6, §15).

Opaque tunnels (CONNECT, SOCKS) and upgraded connections end here. The idle clock is shared:
a long download with a silent upload is not idle.

Two engines, same behaviour:

- **Linked transports** (`net.link`), used when both ends are plain TCP streams of anyio's
  asyncio backend: protocol callbacks, no task per direction, no watchdog task (an idle tunnel
  costs two small protocol objects).
- **Pumps** (`_pump_relay`): one task per direction plus a watchdog, for any other stream
  (TLS, unix sockets, upstream-proxy tunnels, other backends).

Either engine moves a bulk direction to Linux `splice(2)` (`net.splice`).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import anyio
import anyio.abc

from .adopt import Adopted, adoptable, close_now
from .link import Dialled, FirstBytesCheck, run_linked
from .splice import AVAILABLE as _SPLICE
from .splice import SPLICE_AFTER, splice_until_eof
from .streams import ReplayStream

__all__ = ["Dialled", "FirstBytesCheck", "linkable", "relay", "relay_dialled"]

CHUNK = 256 * 1024
_CLOSED = (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError)


async def relay(
    a: anyio.abc.ByteStream,
    b: anyio.abc.ByteStream,
    *,
    idle_timeout: float,
    first_bytes: FirstBytesCheck | None = None,
    first_bytes_timeout: float = 10.0,
    held: Adopted | None = None,
) -> tuple[int, int]:
    """Copy a→b and b→a until both directions end, one breaks, or nothing moves for
    `idle_timeout` seconds. Both streams are closed on return.

    Args:
        first_bytes: holds back the a→b direction until it accepts a's first bytes (b→a
            flows meanwhile); a refusal ends the relay.
        first_bytes_timeout: how long after a's first byte `first_bytes` may keep asking for
            more before it is asked to decide.
        held: a protocol that has borrowed a's transport already (`a` is its stream, or a
            `ReplayStream` over it): the linked engine takes the transport over from it; for
            the pumps it is handed back to the stream first.

    Returns:
        bytes copied (a→b, b→a).
    """
    inner = a.inner if isinstance(a, ReplayStream) else a
    if held is not None and held.adopted:
        assert held.stream is inner
        linked = _live(held) and adoptable(b) and inner is not b
        if not linked:
            held.restore()
            held = None
    else:
        held = None
        linked = adoptable(inner) and adoptable(b) and inner is not b
    if linked:
        return await _linked(a, b, held, idle_timeout, first_bytes, first_bytes_timeout)
    return await _pump_relay(
        a, b, idle_timeout=idle_timeout, check=first_bytes, check_timeout=first_bytes_timeout
    )


def linkable(a: anyio.abc.ByteStream, held: Adopted | None = None) -> bool:
    """`relay_dialled` can take `a` (see `relay` for `held`)."""
    inner = a.inner if isinstance(a, ReplayStream) else a
    if held is not None and held.adopted:
        return _live(held)
    return adoptable(inner)


async def relay_dialled(
    a: anyio.abc.ByteStream,
    b: Dialled,
    *,
    idle_timeout: float,
    first_bytes: FirstBytesCheck | None = None,
    first_bytes_timeout: float = 10.0,
    held: Adopted | None = None,
) -> tuple[int, int]:
    """`relay` to a connection dialled straight into a `Dialled` protocol (linked engine only:
    `a` must be `linkable`). Both are closed on return."""
    if held is not None and not held.adopted:
        held = None
    live = linkable(a, held)  # False: the client closed or broke meanwhile, nothing to relay
    return await _linked(a, b, held, idle_timeout, first_bytes, first_bytes_timeout, live=live)


async def _linked(
    a: anyio.abc.ByteStream,
    b: anyio.abc.ByteStream | Dialled,
    held: Adopted | None,
    idle_timeout: float,
    first_bytes: FirstBytesCheck | None,
    first_bytes_timeout: float,
    *,
    live: bool = True,
) -> tuple[int, int]:
    """The linked engine for `relay` and `relay_dialled`; both ends are closed on return."""
    inner = a.inner if isinstance(a, ReplayStream) else a
    prefix = a.take_pending() if isinstance(a, ReplayStream) else b""
    dialled = b if isinstance(b, Dialled) else None
    stream: Any = b.stream if isinstance(b, Dialled) else b
    try:
        if not live:
            return 0, 0
        return await run_linked(
            inner,
            stream,
            prefix,
            idle_timeout=idle_timeout,
            check=first_bytes,
            check_timeout=first_bytes_timeout,
            held=held,
            held_b=dialled,
            close=True,
        )
    finally:
        if isinstance(a, ReplayStream):
            a.mark_closed()
        close_now(inner)
        if isinstance(b, Dialled):
            b.close()
        else:
            close_now(b)


def _live(held: Adopted) -> bool:
    """A borrowed transport still open (a lost one goes back to its stream: the pumps end it)."""
    return not held.lost and not held.transport.is_closing()


# --- pumps (any stream) -----------------------------------------------------------------------


async def _pump_relay(
    a: anyio.abc.ByteStream,
    b: anyio.abc.ByteStream,
    *,
    idle_timeout: float,
    check: FirstBytesCheck | None,
    check_timeout: float,
) -> tuple[int, int]:
    last = time.monotonic()
    counts = [0, 0]
    finished = 0

    def touch() -> None:
        nonlocal last
        last = time.monotonic()

    async def pump(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, index: int) -> None:
        nonlocal finished
        try:
            if index == 0 and check is not None:
                first = await _first_bytes(src, check, check_timeout)
                if first is None:
                    tg.cancel_scope.cancel()
                    return
                data, eof = first
                if data:
                    touch()
                    counts[0] += len(data)
                    await dst.send(data)
                if eof:
                    raise anyio.EndOfStream
            while True:
                data = await src.receive(CHUNK)
                touch()
                counts[index] += len(data)
                await dst.send(data)
                if _SPLICE and len(data) >= SPLICE_AFTER:
                    fds = _splice_fds(src, dst)
                    if fds is not None:
                        await splice_until_eof(*fds, counts, index, touch)
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


async def _first_bytes(
    src: anyio.abc.ByteStream, check: FirstBytesCheck, timeout: float
) -> tuple[bytes, bool] | None:
    """Read until `check` decides: (bytes to forward, end of input), or None if refused."""
    data = b""
    eof = False
    verdict = check(data, False)
    with anyio.CancelScope() as scope:
        while verdict is None:
            try:
                chunk = await src.receive(CHUNK)
            except anyio.EndOfStream:
                eof = True
                break
            if not data:
                scope.deadline = anyio.current_time() + timeout
            data += chunk
            verdict = check(data, False)
    if verdict is None:  # end of input, or `timeout` after the first byte
        verdict = bool(check(data, True))
    return (data, eof) if verdict else None


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
