"""One event-loop thread per worker, and proxies started on it (SPEC §14.3).

`BackgroundProxy` gives every proxy its own thread and event loop; starting and joining them
costs ~16 ms, more than the whole per-test budget. The plugin instead keeps one loop thread per
pytest process (`WorkerLoop`, session scope) and runs each test's `NetworkProxy` on it
(`LoopProxy`, the same surface as `BackgroundProxy`): ~5 ms per test. Proxies on the shared
loop still share nothing but the loop (SPEC §13: two proxies never see each other).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from netproxy_core import (
    BlockedRecord,
    CertificateAuthority,
    NetworkProxy,
    PolicyDecisionEvent,
    ProxyConfig,
    ProxyHandle,
)
from netproxy_core.config.model import Mode

__all__ = ["LoopProxy", "WorkerLoop"]

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
    ) -> LoopProxy:
        """Build and start a proxy on this loop (listeners bound when this returns)."""

        async def build() -> NetworkProxy:
            builder = NetworkProxy.builder().config(config).certificate_authority(ca).home(home)
            for sink in sinks:
                builder.event_sink(sink)
            if audit_fields:
                builder.audit_fields(**audit_fields)
            return await builder.build()

        proxy = self.portal.call(build)
        return LoopProxy(self.portal, proxy)


class LoopProxy:
    """A running `NetworkProxy` on a `WorkerLoop`, driven from the test's thread."""

    def __init__(self, portal: BlockingPortal, proxy: NetworkProxy) -> None:
        self._portal = portal
        self._cm = portal.wrap_async_context_manager(proxy.run())
        self.handle: ProxyHandle | None = self._cm.__enter__()
        self.proxy: NetworkProxy | None = proxy

    def close(self) -> None:
        """Stop the proxy (graceful, as `ProxyHandle.shutdown`). Idempotent."""
        if self.handle is None:
            return
        self.handle = None
        self._cm.__exit__(None, None, None)

    def _running(self) -> tuple[NetworkProxy, ProxyHandle]:
        if self.proxy is None or self.handle is None:
            raise RuntimeError("the proxy is not running (the test's fixture was torn down)")
        return self.proxy, self.handle

    @property
    def http_url(self) -> str:
        url = self._running()[1].http_url
        assert url is not None
        return url

    @property
    def socks_url(self) -> str | None:
        return self._running()[1].socks_url

    @property
    def ca_cert_path(self) -> Path | None:
        return self._running()[1].ca_cert_path

    @property
    def ca_bundle_path(self) -> Path | None:
        return self._running()[1].ca_bundle_path

    @property
    def config(self) -> ProxyConfig:
        return self._running()[0].config

    def allow(self, *patterns: str) -> None:
        self._running()[0].allow(*patterns)

    def deny(self, *patterns: str) -> None:
        self._running()[0].deny(*patterns)

    def set_mode(self, mode: str | Mode) -> None:
        self._running()[0].set_mode(mode)

    def reload(self, config: ProxyConfig) -> None:
        self._running()[0].reload(config)

    def events(self) -> list[PolicyDecisionEvent]:
        return self._running()[0].events()

    def blocked(self) -> list[BlockedRecord]:
        return self._running()[0].blocked()

    def call(self, func: Callable[[], Awaitable[T]]) -> T:
        """Run an async function on the proxy's loop and return its result."""
        self._running()
        return self._portal.call(func)
