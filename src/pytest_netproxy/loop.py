"""One event-loop thread per worker, and proxies started on it (SPEC §14.3).

A `BackgroundProxy` with its own thread and event loop costs ~16 ms to start and join, more
than the whole per-test budget. The plugin instead keeps one loop thread per pytest process
(`WorkerLoop`, session scope) and runs each test's `BackgroundProxy` on it (``portal=``):
~5 ms per test. Proxies on the shared
loop still share nothing but the loop (SPEC §13: two proxies never see each other).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from netproxy_core import (
    BackgroundProxy,
    CertificateAuthority,
    PolicyDecisionEvent,
    ProxyConfig,
)

__all__ = ["WorkerLoop"]

T = TypeVar("T")
_EXECUTOR_THREADS = 4
Sink = Callable[[PolicyDecisionEvent], None]


class WorkerLoop:
    """The event-loop thread shared by this process's proxies; `close()` joins it.

    The loop's default executor (``getaddrinfo`` and other blocking calls) is a fixed pool
    whose threads all start here: asyncio's own pool starts threads lazily, so one would
    otherwise appear in the middle of some test and look like a leak.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(_EXECUTOR_THREADS, thread_name_prefix="netproxy-loop")
        barrier = threading.Barrier(_EXECUTOR_THREADS + 1)
        for _ in range(_EXECUTOR_THREADS):
            self._executor.submit(barrier.wait)
        barrier.wait()  # every pool thread is now running
        self._stack = contextlib.ExitStack()
        self.portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())

        async def install() -> None:
            asyncio.get_running_loop().set_default_executor(self._executor)

        self.portal.call(install)

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            self._executor.shutdown(wait=True)

    def start(
        self,
        config: ProxyConfig,
        *,
        ca: CertificateAuthority,
        home: Path,
        sinks: tuple[Sink, ...] = (),
        audit_fields: dict[str, str] | None = None,
    ) -> BackgroundProxy:
        """Build and start a proxy on this loop (listeners bound when this returns)."""
        proxy = BackgroundProxy(
            config, ca=ca, home=home, sinks=sinks, audit_fields=audit_fields, portal=self.portal
        )
        return proxy.__enter__()
