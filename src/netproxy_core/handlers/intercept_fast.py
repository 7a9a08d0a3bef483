"""The fast path for requests inside an intercepted tunnel (SPEC §7.4, §16).

Most intercepted requests are simple: an origin-form request whose head arrives whole, naming
the tunnel host, with no body or a small one, answered with a `Content-Length` response.
`InnerFastPath` serves those without h11, with the same judgement of "simple" as the plain
fast path (`proto.h1_fast.simple_request` / `simple_response_length`): the request gets its
one policy decision through the same `decide()` with the same MITM hook check, the hook and
broker rewrite the headers as on the h11 path, and request and response go through in one
write each.

Everything else is the h11 session's (`HttpSession`), handed over exactly as the plain fast
path hands over (`fast_forward.py`): at a request boundary with the unread bytes; after a
decision (`serve_decided`: refusals, origin failures); or mid-response (`serve_response`:
1xx, chunked, close-delimited, odd heads, early closes), before a byte reaches the client.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.abc

from ..errors import UpstreamError
from ..net.tls import TlsStream
from ..policy.model import NetworkDecision, NetworkPolicyRequest, Protocol
from ..proto.h1_fast import (
    SimpleRequest,
    find_head_end,
    keep_alive,
    parse_response_head,
    serialize_request,
    serialize_response_head,
    simple_request,
    simple_response_length,
)
from ..proto.http_head import Forward, classify, strip_hop_by_hop
from .context import ProxyContext
from .decide import decide
from .forward import READ_SIZE, ClientGone, upstream_io
from .http import Handoff, HttpSession
from .origin import Origin, open_origin

__all__ = ["InnerFastPath"]

log = logging.getLogger("netproxy.proxy")

Headers = list[tuple[bytes, bytes]]

_CLIENT_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


@dataclass(slots=True)
class _Plan:
    request: SimpleRequest
    target: Forward


class _Fallback(Exception):
    """The origin's response is h11's to relay: `received` is what was read of it."""

    def __init__(self, received: bytes) -> None:
        self.received = received


class InnerFastPath:
    """Serves one intercepted connection's simple requests.

    Args:
        check: the MITM hook check run inside `decide` (method, target, headers).
        rewrite: the hook/broker header rewrite for an allowed request.
    """

    def __init__(
        self,
        ctx: ProxyContext,
        stream: anyio.abc.ByteStream,
        host: str,
        port: int,
        client_addr: str | None,
        *,
        check: Callable[[bytes, bytes, Headers], NetworkDecision | None],
        rewrite: Callable[[Headers], Headers],
    ) -> None:
        self.ctx = ctx
        self.stream = stream
        self.host = host
        self.port = port
        self.client_addr = client_addr
        self._check = check
        self._rewrite = rewrite
        self._origin: Origin | None = None
        self._origin_key: tuple[object, ...] | None = None
        self._origin_reusable = False
        self._hosts: dict[bytes, bool] = {}  # Host value -> names the tunnel
        self._buffer = bytearray()

    async def serve(self) -> Handoff | None:
        """Serve requests while they are simple.

        Returns:
            None when the connection is done (closed, timed out, not kept alive), or how the
            h11 session takes over (the bytes it has not seen go with it).
        """
        buffer = self._buffer
        first = True
        handoff: Handoff | None = None
        try:
            while True:
                end = find_head_end(buffer)
                if end is None:
                    if buffer:  # a partial or odd head: h11 judges it
                        handoff = self._to_session(first)
                        return handoff
                    data = await self._next_bytes(first)
                    if not data:
                        return None
                    buffer += data
                    continue
                plan = self._plan(end)
                if plan is None:
                    handoff = self._to_session(first)
                    return handoff
                del buffer[: len(plan.request.raw)]
                try:
                    served = await self._serve_one(plan)
                except ClientGone:
                    return None
                if not isinstance(served, bool):
                    handoff = served
                    return handoff
                if not served:
                    return None
                first = False
        finally:
            if handoff is None:
                await self._drop_origin()

    # --- reading the client -------------------------------------------------------------

    async def _next_bytes(self, first: bool) -> bytes:
        """The next request's first bytes; b"" on EOF, a timeout or a shutdown.

        The wait is in `ctx.idle_waits`, so a shutdown ends it at once like any idle wait.
        """
        ctx, stream = self.ctx, self.stream
        if ctx.shutting_down:
            return b""
        limits = ctx.limits
        wait = limits.handshake_timeout if first else limits.idle_timeout
        if not isinstance(stream, TlsStream):  # anyio's TLS (no native TLS on this loop)
            idle = ctx.idle_wait()
            idle.deadline = anyio.current_time() + wait
            ctx.idle_waits.add(idle)
            try:
                with idle:
                    return await stream.receive(READ_SIZE)
                return b""
            except _CLIENT_ERRORS:
                return b""
            finally:
                ctx.idle_waits.discard(idle)
        ctx.idle_waits.add(self)
        try:
            return await stream.receive_within(wait, READ_SIZE)
        except (TimeoutError, *_CLIENT_ERRORS):
            return b""
        finally:
            ctx.idle_waits.discard(self)

    def cancel(self) -> None:
        """End a wait for the next request (see `ProxyContext.idle_waits`)."""
        if isinstance(self.stream, TlsStream):
            self.stream.cancel_wait()

    def _plan(self, end: int) -> _Plan | None:
        """The request at the front of the buffer, if this path may serve it."""
        simple = simple_request(self._buffer, end, self.ctx.limits.max_header_bytes)
        if simple is None or simple.host is None or not simple.head.target.startswith(b"/"):
            return None
        if not self._names_tunnel(simple.host):
            return None  # the h11 path refuses it (host_mismatch) and audits that
        target = Forward("https", self.host, self.port, simple.head.target, simple.host, False)
        return _Plan(simple, target)

    def _names_tunnel(self, host_header: bytes) -> bool:
        """`Host` names the tunnel's host and port, judged as `HttpSession` judges it.

        The authority of ``https://<Host><target>`` ends inside `Host` or at the target's
        leading "/", so the answer depends on `Host` alone and is kept per connection.
        """
        known = self._hosts.get(host_header)
        if known is None:
            parsed = classify(b"GET", b"https://" + host_header + b"/", [])
            known = isinstance(parsed, Forward) and (parsed.host, parsed.port) == (
                self.host,
                self.port,
            )
            if len(self._hosts) < 8:
                self._hosts[host_header] = known
        return known

    # --- one request --------------------------------------------------------------------

    async def _serve_one(self, plan: _Plan) -> Handoff | bool:
        """Decide and forward one request: True = served, False = close, or a handoff."""
        ctx, head, target = self.ctx, plan.request.head, plan.target
        method = head.method.decode("ascii")
        request = NetworkPolicyRequest(
            Protocol.HTTPS, target.host, target.port, method, self.client_addr
        )
        check = functools.partial(self._check, head.method, head.target, head.headers)
        decision = await decide(ctx, request, check=check)
        if not decision.allowed:
            return self._to_session_decided(plan, decision)
        headers = self._rewrite(head.headers)
        try:
            origin = await self._origin_for(target, decision)
        except UpstreamError as exc:
            return self._to_session_decided(plan, decision, failure=exc)
        out = strip_hop_by_hop(headers)
        try:
            return await self._exchange(plan, origin, out)
        except _Fallback as fallback:
            return self._to_session_mid_response(plan, origin, out, fallback.received)
        except UpstreamError as exc:
            await self._drop_origin()
            return self._to_session_decided(plan, decision, failure=exc)

    async def _exchange(self, plan: _Plan, origin: Origin, out: Headers) -> bool:
        """Send the request and relay a `Content-Length` response (`_Fallback` otherwise)."""
        ctx, target, simple = self.ctx, plan.target, plan.request
        limit, idle = ctx.limits.max_header_bytes, ctx.limits.idle_timeout
        stream = origin.stream
        received = bytearray()
        with upstream_io(target):
            await stream.send(serialize_request(simple.head.method, target.path, out) + simple.body)
            end = None
            while end is None:
                if len(received) > limit:
                    raise _Fallback(bytes(received))
                data = await _receive(stream, idle)
                if not data:  # h11 reports the early close exactly as before
                    raise _Fallback(bytes(received))
                received += data
                end = find_head_end(received)
        head = parse_response_head(bytes(received[:end]))
        bodiless = simple.head.method == b"HEAD"
        length = simple_response_length(head, bodiless=bodiless, limit=limit)
        if head is None or length is None:
            raise _Fallback(bytes(received))
        self._origin_reusable = keep_alive(head.version, head.headers)
        if len(received) > end + length:
            self._origin_reusable = False
        pending = serialize_response_head(
            head.status, head.reason, strip_hop_by_hop(head.headers), close=not simple.keep_alive
        ) + bytes(received[end : end + length])
        remaining = end + length - len(received)
        while remaining > 0:
            if len(pending) >= READ_SIZE:
                await self._write(pending)
                pending = b""
            try:
                with upstream_io(target):
                    data = await _receive(stream, idle)
                    if not data:
                        raise UpstreamError(f"{target.host} closed the connection mid-response")
            except UpstreamError:
                if pending:
                    await self._write(pending)
                await self._drop_origin()
                return False  # the response has begun: the client connection just closes
            if len(data) > remaining:
                self._origin_reusable = False
                data = data[:remaining]
            pending += data
            remaining -= len(data)
        await self._write(pending)
        if not self._origin_reusable:
            await self._drop_origin()
        return simple.keep_alive

    async def _write(self, data: bytes) -> None:
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            raise ClientGone from None

    # --- handing over to h11 --------------------------------------------------------------

    def _unread(self, plan: _Plan | None = None) -> bytes:
        """What h11 has to read: the current request (if taken) and everything after it."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return (plan.request.raw if plan is not None else b"") + rest

    def _to_session(self, first: bool) -> Handoff:
        data = self._unread()

        async def resume(session: HttpSession) -> None:
            session.conn.receive_data(data)
            await session.serve(first=first)

        return resume

    def _to_session_decided(
        self, plan: _Plan, decision: NetworkDecision, *, failure: UpstreamError | None = None
    ) -> Handoff:
        data = self._unread(plan)
        headers = self._rewrite(plan.request.head.headers) if decision.allowed else None

        async def resume(session: HttpSession) -> None:
            session.conn.receive_data(data)
            await session.serve_decided(plan.target, decision, failure=failure, headers=headers)

        return resume

    def _to_session_mid_response(
        self, plan: _Plan, origin: Origin, out: Headers, received: bytes
    ) -> Handoff:
        data = self._unread(plan)
        key = self._origin_key
        assert key is not None
        self._origin = self._origin_key = None  # the session owns it now
        sent = (plan.request.head.method, plan.target.path, out, plan.request.body)

        async def resume(session: HttpSession) -> None:
            session.conn.receive_data(data)
            await session.serve_response(plan.target, origin, key, sent, received)

        return resume

    # --- the origin ---------------------------------------------------------------------

    async def _origin_for(self, target: Forward, decision: NetworkDecision) -> Origin:
        key = (target.scheme, target.host, target.port, decision.addresses)
        if self._origin is not None and self._origin_key == key and self._origin_reusable:
            return self._origin
        await self._drop_origin()
        origin = await open_origin(self.ctx, target.host, target.port, decision, tls=True)
        self._origin, self._origin_key, self._origin_reusable = origin, key, True
        return origin

    async def _drop_origin(self) -> None:
        if self._origin is not None:
            origin, self._origin, self._origin_key = self._origin, None, None
            with anyio.CancelScope(shield=True):
                await origin.stream.aclose()


async def _receive(stream: anyio.abc.ByteStream, idle: float) -> bytes:
    """The origin's next bytes (b"" at EOF); `TimeoutError` after `idle` seconds."""
    try:
        if isinstance(stream, TlsStream):
            return await stream.receive_within(idle, READ_SIZE)
        with anyio.fail_after(idle):
            return await stream.receive(READ_SIZE)
    except anyio.EndOfStream:
        return b""
