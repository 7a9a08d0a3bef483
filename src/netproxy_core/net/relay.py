"""Two-way byte pump with half-close and a shared idle timeout (SPEC §5.6, §15).

Opaque tunnels (CONNECT, SOCKS) and upgraded connections end here. The idle clock is shared:
a long download with a silent upload is not idle.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

__all__ = ["relay"]

CHUNK = 256 * 1024
_CLOSED = (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError)


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
