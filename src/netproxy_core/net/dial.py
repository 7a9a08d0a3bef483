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


@contextmanager
def upstream_errors(target: str) -> Iterator[None]:
    try:
        yield
    except TimeoutError as exc:
        raise UpstreamError(f"connecting to {target} timed out", timeout=True) from exc
    except h11.ProtocolError as exc:
        raise UpstreamError(f"{target} sent an invalid HTTP response: {exc}") from exc
    except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UpstreamError(f"cannot connect to {target}: {detail}") from exc


async def dial_addresses(
    addresses: Sequence[IPAddress | str], port: int, *, timeout: float, label: str = ""
) -> anyio.abc.SocketStream:
    """Connect to the first address that answers, in order, within `timeout` overall.

    Raises:
        UpstreamError: nothing answered (timeout → 504 flavour).
    """
    target = label or (format_host_port(str(addresses[0]), port) if addresses else "?")
    last: BaseException | None = None
    with upstream_errors(target), anyio.fail_after(timeout):
        for address in addresses:
            try:
                stream = await anyio.connect_tcp(str(address), port)
            except OSError as exc:
                last = exc
                continue
            _tune(stream)
            return stream
        if last is not None:
            raise last
        raise OSError(0, "no address to connect to")
    raise AssertionError("unreachable")  # pragma: no cover


async def dial_unix(path: str, *, timeout: float) -> anyio.abc.SocketStream:
    with upstream_errors(path), anyio.fail_after(timeout):
        return await anyio.connect_unix(path)


def _tune(stream: anyio.abc.SocketStream) -> None:
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    with suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
