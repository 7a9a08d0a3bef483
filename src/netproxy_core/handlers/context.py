"""`ProxyContext`: everything a connection handler needs from its proxy, passed down.

No globals (STYLE habit 13): two proxies in one process each have their own context.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from ..audit import AuditBus
from ..broker import CredentialBroker
from ..certs import CertificateAuthority
from ..config.model import Limits, ProxyConfig
from ..net.resolve import Resolver
from ..net.upstream import UpstreamProxies
from ..policy.model import NetworkDecision, NetworkPolicyRequest
from ..state import RuntimeState
from .origin_pool import OriginPool

__all__ = ["Cancellable", "Decider", "Interceptor", "ProxyContext"]


class Cancellable(Protocol):
    """Anything `idle_waits` can end: an anyio `CancelScope`, or a fast-path wait."""

    def cancel(self) -> None: ...


Decider = Callable[[NetworkPolicyRequest], Awaitable[NetworkDecision]]
# Serves an intercepted TLS tunnel: (ctx, client stream with peeked bytes, tunnel target).
Interceptor = Callable[["ProxyContext", Any, Any], Awaitable[None]]


@dataclass(slots=True, eq=False)
class ProxyContext:
    state: RuntimeState
    audit: AuditBus
    resolver: Resolver
    decider: Decider | None = None
    ca: CertificateAuthority | None = None
    upstream: UpstreamProxies = field(default_factory=UpstreamProxies)
    intercept: Interceptor | None = None
    broker_hosts: Callable[[str], bool] | None = None
    broker: CredentialBroker | None = None
    shutting_down: bool = False
    # Waits on an idle peer, each ended at once by `cancel()` when shutting down.
    idle_waits: set[Cancellable] = field(default_factory=set)
    origin_pool: OriginPool = field(default_factory=OriginPool)
    _origin_tls: ssl.SSLContext | None = None

    def idle_wait(self) -> anyio.CancelScope:
        """A scope for waiting on an idle client; cancelled at once when shutting down."""
        scope = anyio.CancelScope()
        if self.shutting_down:
            scope.cancel()
        return scope

    @property
    def config(self) -> ProxyConfig:
        return self.state.config

    @property
    def limits(self) -> Limits:
        return self.state.config.limits

    def origin_tls(self) -> ssl.SSLContext:
        """Client-side TLS for origins: system roots + `upstream_ca_files` (cached)."""
        if self._origin_tls is None:
            context = ssl.create_default_context()
            try:
                import certifi

                context.load_verify_locations(cafile=certifi.where())
            except (ImportError, OSError):
                pass
            for path in self.config.upstream_ca_files:
                context.load_verify_locations(cafile=path)
            context.set_alpn_protocols(["http/1.1"])
            self._origin_tls = context
        return self._origin_tls
