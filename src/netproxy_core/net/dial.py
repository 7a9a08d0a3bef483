"""Dial exactly the checked addresses (SPEC §4.2 step 6) and map failures to 502/504.

The one place outbound TCP/unix connections are opened; every foreign error becomes an
`UpstreamError` here (STYLE habit 14).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

import anyio
import anyio.abc
import h11

from ..errors import UpstreamError
from ..hosts import IPAddress, format_host_port

__all__ = ["dial_addresses", "dial_unix", "upstream_errors"]

try:  # anyio internals: the running backend's own connect, and its asyncio stream type
    from anyio._backends._asyncio import SocketStream as _AioStream
    from anyio._core._eventloop import get_async_backend as _backend
except ImportError:  # pragma: no cover - another anyio layout: the public calls only
    _AioStream = None  # type: ignore[assignment,misc]
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
    last: BaseException = OSError(0, "no address to connect to")
    # A bare deadline scope: `fail_after` and `upstream_errors` cost two generator-based
    # context managers per dial (this is on every CONNECT's path).
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
