"""Dial exactly the checked addresses (SPEC §4.2 step 6) and map failures to 502/504.

The one place outbound TCP/unix connections are opened; every foreign error becomes an
`UpstreamError` here (STYLE habit 14).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TypeVar

import anyio
import anyio.abc
import h11

from ..errors import UpstreamError
from ..hosts import IPAddress, format_host_port

__all__ = ["asyncio_loop", "dial_addresses", "dial_protocol", "dial_unix", "upstream_errors"]

P = TypeVar("P", bound=asyncio.BaseProtocol)

try:  # anyio internals: the running backend's own connect, its asyncio stream and protocol
    from anyio._backends._asyncio import SocketStream as _AioStream
    from anyio._backends._asyncio import StreamProtocol as _AioProtocol
    from anyio._core._eventloop import get_async_backend as _backend
except ImportError:  # pragma: no cover - another anyio layout: the public calls only
    _AioStream = None  # type: ignore[assignment,misc]
    _AioProtocol = None  # type: ignore[assignment,misc]
    _backend = None  # type: ignore[assignment]


_FOREIGN = (TimeoutError, h11.ProtocolError, OSError, anyio.BrokenResourceError, anyio.EndOfStream)


@contextmanager
def upstream_errors(target: str) -> Iterator[None]:
    try:
        yield
    except _FOREIGN as exc:
        raise _upstream_error(target, exc) from exc


def _upstream_error(target: str, exc: BaseException) -> UpstreamError:
    if isinstance(exc, TimeoutError):
        return UpstreamError(f"connecting to {target} timed out", timeout=True)
    if isinstance(exc, h11.ProtocolError):
        return UpstreamError(f"{target} sent an invalid HTTP response: {exc}")
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return UpstreamError(f"cannot connect to {target}: {detail}")


async def dial_addresses(
    addresses: Sequence[IPAddress | str], port: int, *, timeout: float, label: str = ""
) -> anyio.abc.SocketStream:
    """Connect to the first address that answers, in order, within `timeout` overall.

    Raises:
        UpstreamError: nothing answered (timeout → 504 flavour).
    """
    loop = asyncio_loop()
    if loop is not None:
        return await _dial_asyncio(loop, addresses, port, timeout=timeout, label=label)
    last: BaseException = OSError(0, "no address to connect to")
    # A bare deadline scope: `fail_after` and `upstream_errors` cost two generator-based
    # context managers per dial.
    with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
        for address in addresses:
            try:
                stream = await _connect(str(address), port)
            except OSError as exc:
                last = exc
                continue
            _tune(stream)
            return stream
    if scope.cancelled_caught:
        last = TimeoutError()
    target = label or (format_host_port(str(addresses[0]), port) if addresses else "?")
    raise _upstream_error(target, last) from last


async def _dial_asyncio(
    loop: asyncio.AbstractEventLoop,
    addresses: Sequence[IPAddress | str],
    port: int,
    *,
    timeout: float,
    label: str,
) -> anyio.abc.SocketStream:
    """`dial_addresses` on asyncio: the loop's `create_connection` into the stream anyio's
    own `connect_tcp` builds (no backend lookup and no anyio cancel scope per dial)."""
    transport, protocol = await dial_protocol(
        loop, addresses, port, _AioProtocol, timeout=timeout, label=label
    )
    transport.pause_reading()  # anyio reads on demand
    return _AioStream(transport, protocol)


async def dial_protocol(
    loop: asyncio.AbstractEventLoop,
    addresses: Sequence[IPAddress | str],
    port: int,
    factory: Callable[[], P],
    *,
    timeout: float,
    label: str = "",
) -> tuple[asyncio.Transport, P]:
    """`dial_addresses` straight into an asyncio protocol (asyncio loops only): no stream.

    The deadline works as `asyncio.timeout` does — a timer cancels this task, and only that
    cancellation becomes a timeout — in one timer and closure (this is on every CONNECT's
    path), so an anyio cancel scope around the call still cancels it as usual.

    Raises:
        UpstreamError: nothing answered (timeout → 504 flavour).
    """
    last: BaseException = OSError(0, "no address to connect to")
    task = asyncio.current_task(loop)
    assert task is not None
    cancelling = task.cancelling()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = loop.call_later(timeout, expire)
    try:
        for address in addresses:
            try:
                return await loop.create_connection(factory, str(address), port)
            except OSError as exc:
                last = exc
    except asyncio.CancelledError:
        # Ours alone becomes the timeout; any other cancellation (as well) goes on.
        if not expired or task.uncancel() > cancelling:
            raise
        last = TimeoutError()
    finally:
        timer.cancel()
    target = label or (format_host_port(str(addresses[0]), port) if addresses else "?")
    raise _upstream_error(target, last) from last


def asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop when anyio's asyncio internals are at hand, else None."""
    if _AioStream is None:  # pragma: no cover
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # another backend (trio)
        return None


async def dial_unix(path: str, *, timeout: float) -> anyio.abc.SocketStream:
    with upstream_errors(path), anyio.fail_after(timeout):
        return await anyio.connect_unix(path)


async def _connect(host: str, port: int) -> anyio.abc.SocketStream:
    """One TCP connection to `host` (the checked address, normally an IP literal).

    anyio's `connect_tcp` runs even a single literal address through its happy-eyeballs task
    group (a task, an event and a cancel scope per connect); the backend's own connect is
    one `create_connection` on asyncio (no resolver thread for a literal either way).
    """
    if _backend is None:  # pragma: no cover
        return await anyio.connect_tcp(host, port)
    return await _backend().connect_tcp(host, port)


def _tune(stream: anyio.abc.SocketStream) -> None:
    if type(stream) is _AioStream:
        return  # asyncio and uvloop set TCP_NODELAY on every TCP transport themselves
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    with suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
