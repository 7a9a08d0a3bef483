"""Linux zero-copy for a bulk tunnel direction: socket → pipe → socket with `splice(2)`.

Both relay engines switch a direction to it once that direction moved one chunk of at least
`SPLICE_AFTER` bytes with nothing buffered in user space; idle and interactive tunnels never
hold a pipe or extra descriptors.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

import anyio
import anyio.lowlevel

__all__ = ["AVAILABLE", "SPLICE_AFTER", "splice_until_eof"]

AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")
SPLICE_AFTER = 64 * 1024
PIPE_SIZE = 1 << 20


async def splice_until_eof(
    src_fd: int, dst_fd: int, counts: list[int], index: int, touch: Callable[[], None]
) -> None:
    """Copy src → dst with splice(2) until EOF (returns) or an error (raises OSError)."""
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
            touch()
            counts[index] += n
            while n:
                try:
                    n -= os.splice(pipe_r, dst_dup, n, flags=flags)
                except BlockingIOError:
                    await anyio.wait_writable(dst_dup)
            await anyio.lowlevel.checkpoint()
