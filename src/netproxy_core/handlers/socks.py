"""SOCKS5 connection driver (SPEC §6): handshake, CONNECT via `run_tunnel`, UDP ASSOCIATE relay.

The handshake is parsed by the sans-IO `proto.socks5.Socks5Server` under
``limits.handshake_timeout``; a client that breaks the protocol, stalls or leaves gets what the
machine queued (if anything) and its connection is closed, logged at debug level only.

CONNECT: host policy first (`decide`, protocol ``socks5_tcp``), then the limited-mode guard
(port 443 goes to `run_tunnel`, which intercepts or refuses ``mitm_required``; other ports are
refused ``method_not_allowed``). An opaque tunnel is answered only after the upstream dial; the
success reply carries the upstream socket's local address (``0.0.0.0:0`` when intercepted).
Reply codes: refusal 0x02; dial failures by the errno found in the error's cause chain
(ENETUNREACH/ENETDOWN 0x03, EHOSTUNREACH/EHOSTDOWN 0x04, ECONNREFUSED 0x05, ETIMEDOUT or
connect timeout 0x06); a failure without a known errno is reported as refused (0x05).

UDP ASSOCIATE: a relay socket is bound on the listener's local IP (port 0) and its address is
the reply. Datagrams are accepted only from the control connection's peer IP and from one
source port: the one in the request when non-zero, else the first datagram's. FRAG != 0,
unparseable headers and port 0 are dropped. Each *distinct* destination (as the client spelled
it) is evaluated with `decide` (protocol ``socks5_udp``, one audit event) once per association;
the outcome is cached for the association's lifetime (bounded; the cache is reset when full, so
a destination may be evaluated again). Denied destinations are dropped. Allowed datagrams go to
the checked address (or the ``routes`` target); only answers from addresses the association
sent to are relayed back, with the destination the client asked for in the header. The
association ends when its TCP control connection closes (or idles past ``idle_timeout`` with no
datagram either way, or the proxy shuts down); every socket is closed.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field

import anyio
import anyio.abc

from ..config.model import Mode
from ..errors import InvalidHost, UpstreamError
from ..hosts import IPAddress, canonicalize_host, parse_ip
from ..policy.engine import deny, find_route
from ..policy.model import NetworkDecision, NetworkPolicyRequest, Protocol, Reason, Scope, Source
from ..proto.socks5 import (
    ConnectRequest,
    NeedData,
    ReplyCode,
    Socks5Error,
    Socks5Server,
    UdpAssociateRequest,
    build_udp_datagram,
    parse_udp_datagram,
)
from .context import ProxyContext
from .decide import Check, decide, refuse
from .tunnel import Established, TunnelTarget, mitm_unavailable, run_tunnel

__all__ = ["reply_code_for", "serve_socks_client"]

log = logging.getLogger("netproxy.proxy")

READ_SIZE = 4096
HANDSHAKE_LIMIT = 1032  # the longest legal greeting + auth + request (proto.socks5 docstring)
MAX_UDP_DESTINATIONS = 1024
_GONE = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)
_ERRNO_CODES = {
    errno.ENETUNREACH: ReplyCode.NETWORK_UNREACHABLE,
    errno.ENETDOWN: ReplyCode.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ReplyCode.HOST_UNREACHABLE,
    errno.EHOSTDOWN: ReplyCode.HOST_UNREACHABLE,
    errno.ECONNREFUSED: ReplyCode.CONNECTION_REFUSED,
    errno.ETIMEDOUT: ReplyCode.TTL_EXPIRED,
}


def reply_code_for(outcome: UpstreamError | NetworkDecision) -> ReplyCode:
    """The SOCKS5 REP for a refused or failed CONNECT (SPEC §6)."""
    if isinstance(outcome, NetworkDecision):
        return ReplyCode.NOT_ALLOWED
    if outcome.timeout:
        return ReplyCode.TTL_EXPIRED
    for exc in _causes(outcome):
        if isinstance(exc, OSError) and exc.errno in _ERRNO_CODES:
            return _ERRNO_CODES[exc.errno]
    return ReplyCode.CONNECTION_REFUSED


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes/contexts and exception-group members, breadth first."""
    seen: set[int] = set()
    queue = [exc]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            queue.extend(current.exceptions)
        queue.extend(e for e in (current.__cause__, current.__context__) if e is not None)


async def serve_socks_client(
    ctx: ProxyContext, stream: anyio.abc.ByteStream, client_addr: str | None
) -> None:
    """Serve one accepted SOCKS5 connection until it (or its tunnel/association) ends."""
    machine = Socks5Server(
        auth_token=ctx.config.proxy_auth_token,
        udp_enabled=ctx.config.enable_socks5_udp,
        max_buffer=HANDSHAKE_LIMIT,
    )
    try:
        request = await _handshake(ctx, stream, machine)
        if request is None:
            return
        if isinstance(request, ConnectRequest):
            await _connect(ctx, stream, machine, request, client_addr)
        else:
            await _associate(ctx, stream, machine, request, client_addr)
    except Socks5Error as exc:
        log.debug("SOCKS5 client %s: %s", client_addr, exc)
        with suppress(*_GONE):
            if out := machine.data_to_send():
                await stream.send(out)
    except TimeoutError:
        log.debug("SOCKS5 client %s: timed out (handshake_timeout)", client_addr)
    except _GONE as exc:
        log.debug("SOCKS5 client %s went away: %s", client_addr, type(exc).__name__)
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()


async def _handshake(
    ctx: ProxyContext, stream: anyio.abc.ByteStream, machine: Socks5Server
) -> ConnectRequest | UdpAssociateRequest | None:
    """Run greeting, authentication and request; None when shut down meanwhile."""
    with anyio.fail_after(ctx.limits.handshake_timeout), ctx.idle_wait() as idle:
        ctx.idle_waits.add(idle)
        try:
            while True:
                event = machine.next_event()
                if out := machine.data_to_send():
                    await stream.send(out)
                if not isinstance(event, NeedData):
                    return event
                try:
                    data = await stream.receive(READ_SIZE)
                except anyio.EndOfStream:
                    data = b""
                machine.receive_data(data)
        finally:
            ctx.idle_waits.discard(idle)
    return None


async def _answer(
    stream: anyio.abc.ByteStream,
    machine: Socks5Server,
    code: ReplyCode,
    bound: tuple[str, int] = ("0.0.0.0", 0),
) -> None:
    machine.send_reply(code, bound[0], bound[1])
    await stream.send(machine.data_to_send())


def _local_address(stream: anyio.TypedAttributeProvider | None) -> tuple[str, int] | None:
    if stream is None:
        return None
    try:
        address = stream.extra(anyio.abc.SocketAttribute.local_address)
    except anyio.TypedAttributeLookupError:
        return None
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    return None


async def _connect(
    ctx: ProxyContext,
    stream: anyio.abc.ByteStream,
    machine: Socks5Server,
    request: ConnectRequest,
    client_addr: str | None,
) -> None:
    policy_request = NetworkPolicyRequest(
        Protocol.SOCKS5_TCP, request.host, request.port, None, client_addr
    )
    # The limited-mode port guard runs inside `decide`: one connection, one event (SPEC §4.2).
    limited = ctx.config.mode is Mode.LIMITED and request.port != 443
    check = _method_not_allowed if limited else _mitm_unavailable(ctx, request.host)
    decision = await decide(ctx, policy_request, check=check)
    if not decision.allowed:
        await _answer(stream, machine, ReplyCode.NOT_ALLOWED)
        return
    host = canonicalize_host(request.host)  # valid: the policy allowed it
    target = TunnelTarget(host, request.port, Protocol.SOCKS5_TCP, client_addr)

    async def reply(outcome: Established | UpstreamError | NetworkDecision) -> None:
        if isinstance(outcome, Established):
            bound = outcome.local_addr or ("0.0.0.0", 0)
            await _answer(stream, machine, ReplyCode.SUCCEEDED, bound)
            return
        if isinstance(outcome, UpstreamError):
            log.info("SOCKS5 CONNECT %s:%s failed: %s", host, request.port, outcome)
        await _answer(stream, machine, reply_code_for(outcome))

    await run_tunnel(ctx, stream, target, decision, reply, leftover=machine.leftover)


def _mitm_unavailable(ctx: ProxyContext, raw_host: str) -> Check | None:
    try:
        return mitm_unavailable(ctx, canonicalize_host(raw_host))
    except InvalidHost:
        return None  # `decide` refuses it as invalid_host


def _method_not_allowed() -> NetworkDecision:
    """Limited mode: SOCKS5 TCP to a port other than 443 (SPEC §4.5)."""
    return deny(Reason.METHOD_NOT_ALLOWED, Source.MODE_GUARD, Scope.NON_DOMAIN)


# --- UDP ASSOCIATE ------------------------------------------------------------------------


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.partition("%")[0]) == ipaddress.ip_address(
            b.partition("%")[0]
        )
    except ValueError:
        return False


@dataclass(slots=True, eq=False)
class _Association:
    """One UDP association's state (sockets are owned by `_associate`)."""

    ctx: ProxyContext
    relay: anyio.abc.UDPSocket
    client_ip: str
    client_port: int | None
    client_addr: str | None
    last: float = field(default_factory=time.monotonic)
    # (host as sent, port) -> (IP to send to, port), or None when denied
    targets: dict[tuple[str, int], tuple[str, int] | None] = field(default_factory=dict)
    # (IP sent to, port) -> (host as sent, port): answers are relayed only from these
    origins: dict[tuple[IPAddress, int], tuple[str, int]] = field(default_factory=dict)
    outbound: dict[int, anyio.abc.UDPSocket] = field(default_factory=dict)

    async def from_client(self, tg: anyio.abc.TaskGroup) -> None:
        async for data, source in self.relay:
            if not _same_ip(source[0], self.client_ip):
                continue
            if self.client_port is None:
                self.client_port = source[1]
            elif source[1] != self.client_port:
                continue
            try:
                datagram = parse_udp_datagram(data)
            except Socks5Error as exc:
                log.debug("SOCKS5 UDP from %s dropped: %s", self.client_addr, exc)
                continue
            if datagram.frag != 0 or datagram.port == 0:
                continue
            self.last = time.monotonic()
            key = (datagram.host, datagram.port)
            if key not in self.targets:
                if len(self.targets) >= MAX_UDP_DESTINATIONS:
                    self.targets.clear()
                    self.origins.clear()
                self.targets[key] = await self._evaluate(*key)
            target = self.targets[key]
            if target is None:
                continue
            ip = ipaddress.ip_address(target[0])
            self.origins[(ip, target[1])] = key
            sock = await self._outbound(ip.version, tg)
            with suppress(OSError):
                await sock.sendto(datagram.payload, str(ip), target[1])

    async def _evaluate(self, host: str, port: int) -> tuple[str, int] | None:
        ctx = self.ctx
        request = NetworkPolicyRequest(Protocol.SOCKS5_UDP, host, port, None, self.client_addr)
        decision = await decide(ctx, request)
        if not decision.allowed:
            return None
        try:
            canonical = canonicalize_host(host)
        except InvalidHost:  # pragma: no cover - an invalid host is never allowed
            return None
        if ctx.config.mode is Mode.LIMITED:
            refuse(
                ctx,
                NetworkPolicyRequest(Protocol.SOCKS5_UDP, canonical, port, None, self.client_addr),
                Reason.METHOD_NOT_ALLOWED,
            )
            return None
        route = find_route(ctx.state.rules, canonical, port)
        if route is None:
            return (str(decision.addresses[0]), port) if decision.addresses else None
        ip = parse_ip(route[0])
        if ip is None:
            answers = await ctx.resolver.resolve(route[0], route[1])
            ip = answers[0] if answers else None
        return (str(ip), route[1]) if ip is not None else None

    async def _outbound(self, version: int, tg: anyio.abc.TaskGroup) -> anyio.abc.UDPSocket:
        sock = self.outbound.get(version)
        if sock is None:
            if version == 4:
                sock = await anyio.create_udp_socket(socket.AF_INET, local_host="0.0.0.0")
            else:
                sock = await anyio.create_udp_socket(socket.AF_INET6, local_host="::")
            self.outbound[version] = sock
            tg.start_soon(self._from_destinations, sock)
        return sock

    async def _from_destinations(self, sock: anyio.abc.UDPSocket) -> None:
        with suppress(*_GONE):
            async for data, source in sock:
                try:
                    key = (ipaddress.ip_address(source[0].partition("%")[0]), source[1])
                except ValueError:
                    continue
                wanted = self.origins.get(key)
                if wanted is None or self.client_port is None:
                    continue
                self.last = time.monotonic()
                with suppress(OSError, ValueError):
                    packet = build_udp_datagram(wanted[0], wanted[1], data)
                    await self.relay.sendto(packet, self.client_ip, self.client_port)

    async def watch_idle(self) -> None:
        timeout = self.ctx.limits.idle_timeout
        while (remaining := self.last + timeout - time.monotonic()) > 0:
            await anyio.sleep(remaining)


async def _associate(
    ctx: ProxyContext,
    stream: anyio.abc.ByteStream,
    machine: Socks5Server,
    request: UdpAssociateRequest,
    client_addr: str | None,
) -> None:
    if ctx.config.mode is Mode.LIMITED:
        policy_request = NetworkPolicyRequest(
            Protocol.SOCKS5_UDP, request.host, request.port, None, client_addr
        )
        refuse(ctx, policy_request, Reason.METHOD_NOT_ALLOWED)
        await _answer(stream, machine, ReplyCode.NOT_ALLOWED)
        return
    try:
        local_ip = str(stream.extra(anyio.abc.SocketAttribute.local_address)[0])
        peer_ip = str(stream.extra(anyio.abc.SocketAttribute.remote_address)[0])
    except (anyio.TypedAttributeLookupError, IndexError, TypeError):
        await _answer(stream, machine, ReplyCode.GENERAL_FAILURE)
        return
    try:
        relay_sock = await anyio.create_udp_socket(local_host=local_ip, local_port=0)
    except OSError as exc:
        log.warning("SOCKS5 UDP ASSOCIATE: cannot bind a relay socket on %s: %s", local_ip, exc)
        await _answer(stream, machine, ReplyCode.GENERAL_FAILURE)
        return
    association = _Association(ctx, relay_sock, peer_ip, request.port or None, client_addr)
    try:
        bound = _local_address(relay_sock) or (local_ip, 0)
        await _answer(stream, machine, ReplyCode.SUCCEEDED, bound)
        with ctx.idle_wait() as idle:
            ctx.idle_waits.add(idle)
            try:
                async with anyio.create_task_group() as tg:

                    async def until_closed() -> None:
                        with suppress(*_GONE):
                            while await stream.receive(READ_SIZE):
                                pass  # the control connection carries nothing after the reply
                        tg.cancel_scope.cancel()

                    async def until_idle() -> None:
                        await association.watch_idle()
                        tg.cancel_scope.cancel()

                    tg.start_soon(until_closed)
                    tg.start_soon(until_idle)
                    await association.from_client(tg)
                    tg.cancel_scope.cancel()
            finally:
                ctx.idle_waits.discard(idle)
    finally:
        with anyio.CancelScope(shield=True):
            for sock in (relay_sock, *association.outbound.values()):
                await sock.aclose()
