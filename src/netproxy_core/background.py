"""`BackgroundProxy`: a proxy on an event-loop thread for synchronous callers (SPEC §13).

Used by the pytest plugin and by scripts. A context manager: entering starts the listeners,
leaving shuts the proxy down gracefully. By default each instance runs its own loop thread;
pass `portal` to run on a loop that several proxies share (the plugin keeps one per worker:
starting and joining a thread per proxy costs more than the whole per-test budget). Proxies
on one loop still share nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from .audit import BlockedRecord, EventSink, PolicyDecisionEvent
from .broker import CredentialBroker
from .certs import CertificateAuthority
from .config.model import Mode, ProxyConfig
from .handlers.context import Decider
from .policy.model import NetworkDecision, NetworkPolicyRequest
from .proxy import NetworkProxy, ProxyHandle

__all__ = ["BackgroundProxy"]

T = TypeVar("T")


class BackgroundProxy:
    """Run a `NetworkProxy` on a background thread.

    Args:
        config: the configuration (default: nothing allowed).
        http_addr / socks_addr: listener addresses overriding the config's.
        decider, sinks, ca, home, audit_fields: as for `NetworkProxy`.
        upstream_env: environment to read upstream proxy variables from.
        portal: run on this shared event-loop thread instead of starting one.
    """

    def __init__(
        self,
        config: ProxyConfig | None = None,
        *,
        http_addr: str | None = None,
        socks_addr: str | None = None,
        decider: Decider | None = None,
        sinks: tuple[EventSink, ...] = (),
        ca: CertificateAuthority | None = None,
        home: str | Path | None = None,
        audit_fields: dict[str, str] | None = None,
        upstream_env: dict[str, str] | None = None,
        portal: BlockingPortal | None = None,
    ) -> None:
        self._config = config or ProxyConfig()
        self._http_addr, self._socks_addr = http_addr, socks_addr
        self._decider, self._sinks, self._ca = decider, sinks, ca
        self._home = Path(home) if home is not None else None
        self._audit_fields = audit_fields
        self._upstream_env = upstream_env
        self._stack: contextlib.ExitStack | None = None
        self._shared_portal = portal
        self._portal: BlockingPortal | None = None
        self.proxy: NetworkProxy | None = None
        self.handle: ProxyHandle | None = None

    def __repr__(self) -> str:
        state = f"http={self.http_url}" if self.handle else "stopped"
        return f"<BackgroundProxy {state}>"

    def __enter__(self) -> BackgroundProxy:
        stack = contextlib.ExitStack()
        try:
            portal = self._shared_portal or stack.enter_context(start_blocking_portal())
            self.proxy = portal.call(self._build)
            self.handle = stack.enter_context(portal.wrap_async_context_manager(self.proxy.run()))
        except BaseException:
            stack.close()
            raise
        self._stack, self._portal = stack, portal
        return self

    async def _build(self) -> NetworkProxy:
        builder = NetworkProxy.builder().config(self._config)
        if self._http_addr is not None:
            builder.http_addr(self._http_addr)
        if self._socks_addr is not None:
            builder.socks_addr(self._socks_addr)
        if self._decider is not None:
            builder.policy_decider(self._decider)
        for sink in self._sinks:
            builder.event_sink(sink)
        if self._ca is not None:
            builder.certificate_authority(self._ca)
        if self._home is not None:
            builder.home(self._home)
        if self._audit_fields:
            builder.audit_fields(**self._audit_fields)
        if self._upstream_env is not None:
            builder.upstream_env(self._upstream_env)
        return await builder.build()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        stack, self._stack, self._portal = self._stack, None, None
        if stack is not None:
            stack.close()
        self.handle = None

    # --- convenience views --------------------------------------------------------------

    def _running(self) -> tuple[NetworkProxy, ProxyHandle]:
        if self.proxy is None or self.handle is None:
            raise RuntimeError("BackgroundProxy is not running; use it as a context manager")
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
    def http_addr(self) -> tuple[str, int] | None:
        return self._running()[1].http_addr

    @property
    def socks_addr(self) -> tuple[str, int] | None:
        return self._running()[1].socks_addr

    @property
    def ca_cert_path(self) -> Path | None:
        return self._running()[1].ca_cert_path

    @property
    def ca_bundle_path(self) -> Path | None:
        return self._running()[1].ca_bundle_path

    @property
    def config(self) -> ProxyConfig:
        return self._running()[0].config

    @property
    def broker(self) -> CredentialBroker | None:
        """The credential broker (`broker.virtualize(env)`, SPEC §8); None when it is off."""
        return self._running()[0].broker

    def allow(self, *patterns: str) -> None:
        self._running()[0].allow(*patterns)

    def deny(self, *patterns: str) -> None:
        self._running()[0].deny(*patterns)

    def set_mode(self, mode: str | Mode) -> None:
        self._running()[0].set_mode(mode)

    def events(self) -> list[PolicyDecisionEvent]:
        return self._running()[0].events()

    def blocked(self) -> list[BlockedRecord]:
        return self._running()[0].blocked()

    def reload(self, config: ProxyConfig) -> None:
        """Swap in a new configuration (listener addresses stay as bound)."""
        self._running()[0].reload(config)

    def evaluate(self, request: NetworkPolicyRequest) -> NetworkDecision:
        proxy, _ = self._running()
        assert self._portal is not None
        return self._portal.call(proxy.evaluate, request)

    def call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run an async function on the proxy's loop and return its result."""
        self._running()
        assert self._portal is not None
        return self._portal.call(func, *args)
