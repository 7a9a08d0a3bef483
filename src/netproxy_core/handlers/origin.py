"""Open the outbound leg for an allowed destination: route, upstream proxy or checked address.

One function serves every listener (HTTP forward, CONNECT, SOCKS, intercepted requests) so
routing, chaining and TLS verification are decided in one place (SPEC §4.2 step 6, §5.8).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import anyio.abc

from ..errors import UpstreamError
from ..hosts import IPAddress, format_host_port
from ..net.dial import dial_addresses
from ..net.tls import start_tls
from ..net.upstream import UpstreamProxy, open_connect_tunnel
from ..policy.engine import find_route
from ..policy.model import NetworkDecision
from .context import ProxyContext

__all__ = ["Direct", "Origin", "open_origin", "origin_path"]


@dataclass(slots=True, eq=False)
class Origin:
    """An open outbound stream; `via` is set when a plain-HTTP request goes through an
    upstream proxy (the request must then use absolute-form)."""

    stream: anyio.abc.ByteStream
    via: UpstreamProxy | None = None


@dataclass(frozen=True, slots=True)
class Direct:
    """Dial these addresses (in order) at `port` — no upstream proxy in between."""

    addresses: Sequence[IPAddress | str]
    port: int
    label: str


def origin_path(
    ctx: ProxyContext,
    host: str,
    port: int,
    decision: NetworkDecision,
    *,
    secure: bool,
) -> Direct | UpstreamProxy:
    """How `open_origin` reaches ``host:port``: a route or the checked addresses (`Direct`),
    or an upstream proxy. `secure`: TLS or a tunnel (picks the proxy for secure traffic)."""
    route = find_route(ctx.state.rules, host, port)
    if route is not None:
        return Direct((route[0],), route[1], format_host_port(host, port))
    proxy = (
        ctx.upstream.proxy_for(host, secure=secure, routed=False)
        if ctx.config.allow_upstream_proxy
        else None
    )
    if proxy is not None:
        return proxy
    return Direct(decision.addresses, port, format_host_port(host, port))


async def open_origin(
    ctx: ProxyContext,
    host: str,
    port: int,
    decision: NetworkDecision,
    *,
    tls: bool = False,
    tunnel: bool = False,
) -> Origin:
    """Connect to ``host:port`` as the policy allowed it.

    Args:
        tls: originate TLS (verified with system roots + `upstream_ca_files`).
        tunnel: the caller relays raw bytes (CONNECT/SOCKS): an upstream proxy is asked for a
            CONNECT tunnel rather than used for absolute-form requests.

    Raises:
        UpstreamError: connection, chaining or TLS failure (502), or timeout (504).
    """
    limits = ctx.limits
    path = origin_path(ctx, host, port, decision, secure=tls or tunnel)
    via: UpstreamProxy | None = None
    stream: anyio.abc.ByteStream
    if isinstance(path, Direct):
        stream = await dial_addresses(
            path.addresses, path.port, timeout=limits.connect_timeout, label=path.label
        )
    elif tls or tunnel:
        stream = await open_connect_tunnel(path, host, port, timeout=limits.connect_timeout)
    else:
        stream = await dial_addresses(
            [path.host], path.port, timeout=limits.connect_timeout, label=path.label
        )
        via = path
    if tls:
        stream = await _wrap_tls(ctx, stream, host)
    return Origin(stream, via)


async def _wrap_tls(
    ctx: ProxyContext, stream: anyio.abc.ByteStream, host: str
) -> anyio.abc.ByteStream:
    try:
        with anyio.fail_after(ctx.limits.handshake_timeout):
            return await start_tls(
                stream,
                ctx.origin_tls(),
                server_side=False,
                hostname=host.partition("%")[0],
                handshake_timeout=ctx.limits.handshake_timeout,
            )
    except TimeoutError:
        await stream.aclose()
        raise UpstreamError(f"TLS handshake with {host} timed out", timeout=True) from None
    except ssl.SSLCertVerificationError as exc:
        await stream.aclose()
        raise UpstreamError(
            f"TLS certificate of {host} is not trusted: {exc.verify_message}"
        ) from None
    except (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
        await stream.aclose()
        raise UpstreamError(f"TLS handshake with {host} failed: {type(exc).__name__}") from None
