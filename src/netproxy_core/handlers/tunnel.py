"""Route an allowed CONNECT / SOCKS tunnel: opaque relay or interception (SPEC §5.6, §7.3).

The first client bytes are peeked (never consumed) and replayed to the chosen path. A
ClientHello's SNI must name the tunnel host (no domain fronting). Opaque tunnels are dialled
before the client is answered, so a dead upstream gets its 502/504 (or SOCKS error).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc

from ..config.model import Mode
from ..errors import InvalidHost, UpstreamError
from ..hosts import canonicalize_host
from ..net.adopt import Adopted
from ..net.dial import asyncio_loop, dial_protocol
from ..net.relay import Dialled, FirstBytesCheck, linkable, relay, relay_dialled
from ..net.streams import ReplayStream, peek
from ..policy.engine import deny
from ..policy.model import NetworkDecision, NetworkPolicyRequest, Protocol, Reason, Scope, Source
from ..proto.tls_peek import FirstBytes, classify_first_bytes, parse_client_hello
from .context import ProxyContext
from .decide import refuse
from .origin import Direct, open_origin, origin_path

__all__ = [
    "Established",
    "Reply",
    "TunnelTarget",
    "interception_required",
    "mitm_unavailable",
    "run_tunnel",
]

log = logging.getLogger("netproxy.proxy")

FIRST_BYTE_WAIT = 0.25
MAX_HELLO = 128 * 1024


@dataclass(frozen=True, slots=True)
class Established:
    """The tunnel is open. `upstream`: the dialled upstream connection (a stream, or a
    connection dialled straight into the relay's protocol); None when the tunnel is
    intercepted and dialled per request."""

    upstream: anyio.abc.ByteStream | Dialled | None = None

    @property
    def local_addr(self) -> tuple[str, int] | None:
        """Our end of the upstream connection (SOCKS reports it as BND.ADDR), looked up only
        when asked (a CONNECT reply does not need it)."""
        if isinstance(self.upstream, Dialled):
            return self.upstream.local_addr
        return None if self.upstream is None else _local_address(self.upstream)


# How a listener answers its client: Established, an UpstreamError (dial failed, 502/504 or a
# SOCKS error code) or a NetworkDecision (refused).
Reply = Callable[[Established | UpstreamError | NetworkDecision], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class TunnelTarget:
    host: str
    port: int
    protocol: Protocol
    client_addr: str | None

    def request(self, method: str | None = None) -> NetworkPolicyRequest:
        return NetworkPolicyRequest(self.protocol, self.host, self.port, method, self.client_addr)


def interception_required(ctx: ProxyContext, host: str) -> bool:
    """Limited mode, or the host has MITM hooks (SPEC §7.3)."""
    rules = ctx.state.rules
    return rules.mode is Mode.LIMITED or rules.is_hooked(host)


def mitm_unavailable(ctx: ProxyContext, host: str) -> Callable[[], NetworkDecision] | None:
    """A `decide` check refusing ``mitm_required`` when interception is required for `host`
    but this proxy cannot intercept (SPEC §7.3): the tunnel's one audited decision."""
    if ctx.intercept is not None or not interception_required(ctx, host):
        return None
    return _mitm_required


def _mitm_required() -> NetworkDecision:
    return deny(Reason.MITM_REQUIRED, Source.MODE_GUARD, Scope.NON_DOMAIN)


def interception_wanted(ctx: ProxyContext, host: str) -> bool:
    """Required, or `mitm.enabled = true`, or a brokered credential is bound to the host."""
    if interception_required(ctx, host) or ctx.config.mitm.enabled is True:
        return True
    return ctx.broker_hosts is not None and ctx.broker_hosts(host)


async def run_tunnel(
    ctx: ProxyContext,
    client: anyio.abc.ByteStream,
    target: TunnelTarget,
    decision: NetworkDecision,
    reply: Reply,
    *,
    leftover: bytes = b"",
    held: Adopted | None = None,
    connected: Callable[[], None] | None = None,
) -> None:
    """Serve one allowed tunnel to its end. Closes `client`.

    `leftover`: bytes the client sent after its request, read already. `held`: a protocol
    that has borrowed `client`'s transport already (the HTTP fast path's), with any later
    bytes in its buffer. An opaque tunnel over plain TCP takes the transport over from it
    for the relay (no second borrow); every other path first hands the transport back to
    `client` (`held.restore()`), always before `reply` is called with a refusal or a
    failure. So `reply(Established(...))` may find the transport still borrowed: it then
    writes through `held.transport`. `connected`: called from the origin's connect callback
    when an opaque tunnel dials straight into its relay, so a reply that needs no I/O can go
    out a turn of the loop earlier; `reply` is still called after it.
    """
    replay = ReplayStream(client, leftover)
    try:
        if not interception_wanted(ctx, target.host):
            await _opaque(ctx, replay, target, decision, reply, held, connected)
            return
        _give_back(held)
        if ctx.intercept is None and interception_required(ctx, target.host):
            await reply(refuse(ctx, target.request(), Reason.MITM_REQUIRED))
            return
        await reply(Established())
        kind, sni_ok = await _inspect(
            ctx, replay, target, first_byte_wait=_first_byte_wait(ctx, target)
        )
        if not sni_ok:
            return
        if kind is FirstBytes.TLS and ctx.intercept is not None:
            await ctx.intercept(ctx, replay, target)
            return
        if ctx.config.mode is Mode.LIMITED:
            refuse(ctx, target.request(), Reason.METHOD_NOT_ALLOWED)
            return
        if interception_required(ctx, target.host):
            refuse(ctx, target.request(), Reason.MITM_REQUIRED)
            return
        try:
            origin = await open_origin(ctx, target.host, target.port, decision, tunnel=True)
        except UpstreamError as exc:
            log.info("tunnel to %s:%s failed after answering: %s", target.host, target.port, exc)
            return
        await relay(
            replay,
            origin.stream,
            idle_timeout=ctx.limits.idle_timeout,
            first_bytes=_sni_check(ctx, target) if kind is not FirstBytes.TLS else None,
            first_bytes_timeout=ctx.limits.handshake_timeout,
        )
    finally:
        if not replay.closed:  # the relay closes both ends itself
            _give_back(held)
            with anyio.CancelScope(shield=True):
                await replay.aclose()


def _give_back(held: Adopted | None) -> None:
    """The client's transport goes back to its anyio stream (no-op when it is there)."""
    if held is not None:
        held.restore()


async def _opaque(
    ctx: ProxyContext,
    replay: ReplayStream,
    target: TunnelTarget,
    decision: NetworkDecision,
    reply: Reply,
    held: Adopted | None,
    connected: Callable[[], None] | None = None,
) -> None:
    path = origin_path(ctx, target.host, target.port, decision, secure=True)
    loop = asyncio_loop()
    if isinstance(path, Direct) and loop is not None and linkable(replay, held):
        await _opaque_dialled(ctx, loop, replay, target, path, reply, held, connected)
        return
    try:
        origin = await open_origin(ctx, target.host, target.port, decision, tunnel=True)
    except UpstreamError as exc:
        _give_back(held)
        await reply(exc)
        return
    try:
        await reply(Established(origin.stream))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await origin.stream.aclose()
        raise
    # Server-first protocols get their bytes at once; the client's first bytes are inspected
    # whenever they come (a late ClientHello must not skip the SNI check). The relay closes
    # both streams.
    await relay(
        replay,
        origin.stream,
        idle_timeout=ctx.limits.idle_timeout,
        first_bytes=_sni_check(ctx, target),
        first_bytes_timeout=ctx.limits.handshake_timeout,
        held=held,
    )


async def _opaque_dialled(
    ctx: ProxyContext,
    loop: asyncio.AbstractEventLoop,
    replay: ReplayStream,
    target: TunnelTarget,
    path: Direct,
    reply: Reply,
    held: Adopted | None,
    connected: Callable[[], None] | None,
) -> None:
    """`_opaque` for a plain TCP client and a direct origin: the origin is dialled straight
    into the linked relay's protocol (`Dialled`), with no anyio stream to build and borrow."""
    try:
        _, origin = await dial_protocol(
            loop,
            path.addresses,
            path.port,
            Dialled if connected is None else functools.partial(Dialled, connected),
            timeout=ctx.limits.connect_timeout,
            label=path.label,
        )
    except UpstreamError as exc:
        _give_back(held)
        await reply(exc)
        return
    try:
        await reply(Established(origin))
    except BaseException:
        origin.close()
        raise
    await relay_dialled(
        replay,
        origin,
        idle_timeout=ctx.limits.idle_timeout,
        first_bytes=_sni_check(ctx, target),
        first_bytes_timeout=ctx.limits.handshake_timeout,
        held=held,
    )


def _sni_check(ctx: ProxyContext, target: TunnelTarget) -> FirstBytesCheck:
    """The relay's sans-IO check of the client's first bytes: a ClientHello's SNI must name
    the tunnel host; anything that is not TLS passes.

    A ClientHello still incomplete when the relay gives up waiting (end of input, or the
    handshake timeout after its first byte) passes too, as in `_inspect`: TLS then fails
    end to end.
    """

    def check(data: bytes, final: bool) -> bool | None:
        kind = classify_first_bytes(data)
        if kind is FirstBytes.OTHER:
            return True
        if kind is FirstBytes.NEED_MORE:
            return True if final else None
        try:
            hello = parse_client_hello(data)
        except ValueError:
            return True  # not a parseable hello: let TLS itself fail end to end
        if hello is None:
            return True if final or len(data) > MAX_HELLO else None
        return _sni_allowed(ctx, target, hello.sni)

    return check


def _sni_allowed(ctx: ProxyContext, target: TunnelTarget, raw_sni: str | None) -> bool:
    """No SNI, or an SNI naming the tunnel host; a mismatch is refused and audited."""
    if raw_sni is None:
        return True
    try:
        sni = canonicalize_host(raw_sni)
    except InvalidHost:
        sni = raw_sni
    if sni != target.host:
        refuse(ctx, target.request(), Reason.HOST_MISMATCH, Source.BASELINE_POLICY, Scope.DOMAIN)
        log.info("refused tunnel to %s: TLS SNI names %s (domain fronting)", target.host, sni)
        return False
    return True


def _local_address(stream: anyio.abc.ByteStream) -> tuple[str, int] | None:
    try:
        address = stream.extra(anyio.abc.SocketAttribute.local_address)
    except anyio.TypedAttributeLookupError:
        return None
    return (str(address[0]), int(address[1])) if isinstance(address, tuple) else None


def _first_byte_wait(ctx: ProxyContext, target: TunnelTarget) -> float:
    """How long an intercepting tunnel waits for the client's first byte.

    250 ms lets server-first protocols (SSH) fall back to an opaque tunnel quickly. When the
    tunnel must be intercepted anyway, or it goes to port 443 where a ClientHello is what
    clients send, a slow client (a loaded CI machine) must not silently lose interception, so
    the wait is the whole handshake timeout.
    """
    if interception_required(ctx, target.host) or target.port == 443:
        return ctx.limits.handshake_timeout
    return FIRST_BYTE_WAIT


async def _inspect(
    ctx: ProxyContext,
    replay: ReplayStream,
    target: TunnelTarget,
    *,
    first_byte_wait: float | None = FIRST_BYTE_WAIT,
) -> tuple[FirstBytes, bool]:
    """Peek the first bytes; returns their kind and whether the SNI (if any) is acceptable.

    `first_byte_wait` None: wait for the first bytes as long as the tunnel lives.
    """
    total = ctx.limits.handshake_timeout if first_byte_wait is not None else math.inf
    data = await peek(replay, 3, first_byte_timeout=first_byte_wait, total_timeout=total)
    kind = classify_first_bytes(data)
    if kind is not FirstBytes.TLS:
        return (FirstBytes.OTHER if data else FirstBytes.NEED_MORE), True
    hello = None
    with anyio.move_on_after(ctx.limits.handshake_timeout):
        while True:
            try:
                hello = parse_client_hello(replay.pending)
            except ValueError:
                return kind, True  # not a parseable hello: let TLS itself fail end to end
            if hello is not None or len(replay.pending) > MAX_HELLO:
                break
            before = len(replay.pending)
            await peek(
                replay,
                before + 1,
                first_byte_timeout=None,
                total_timeout=ctx.limits.handshake_timeout,
            )
            if len(replay.pending) == before:
                break
    if hello is None:
        return kind, True
    return kind, _sni_allowed(ctx, target, hello.sni)
