"""The plain-HTTP forwarding fast path (SPEC §5, §16): same contract, far less work per request.

Most proxied requests are the simple kind: an absolute-form ``http://`` request whose head
arrives whole, with no body or a small one, answered with a `Content-Length` response. For
those, `serve_http_connection` skips h11 and anyio's per-call stream machinery: it borrows
both sockets' transports (`net.adopt`), parses heads with the strict h11-subset parser in
`proto.h1_fast`, makes the request's one policy decision through the same `decide()`, and
relays the response from the origin's data callback straight into the client's transport.

A simple CONNECT is decided here too; its tunnel then runs on the anyio stream as on the h11
path (`tunnel.run_tunnel`), with only the `200` written directly.

Everything else goes to the h11 path (`HttpSession`), which answers exactly as before:
- before a decision (a partial or malformed head, a body still arriving, Upgrade, Expect,
  Transfer-Encoding, proxy auth, MITM-hooked hosts, the unix-socket header, …) the
  connection is handed over with every byte it sent;
- after a decision (a refusal, an origin that cannot be dialled or borrowed) the session is
  given the request and the decision, so nothing is decided or audited twice;
- mid-response (1xx, chunked or close-delimited framing, anything h11 must judge) the
  session gets the origin connection and the bytes read so far — nothing has reached the
  client yet — and relays the response itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

import anyio
import anyio.abc

from ..errors import UpstreamError
from ..hosts import format_host_port
from ..net.adopt import Adopted, adoptable, write_now
from ..policy.model import NetworkDecision, NetworkPolicyRequest, Protocol
from ..proto.h1_fast import (
    RequestHead,
    SimpleRequest,
    find_head_end,
    keep_alive,
    parse_response_head,
    serialize_request,
    serialize_response_head,
    simple_request,
    simple_response_length,
)
from ..proto.http_head import Connect, Forward, classify, strip_hop_by_hop
from .context import ProxyContext
from .decide import decide
from .forward import ClientGone, origin_request
from .http import Handoff, HttpSession, serve_http_client
from .origin import Origin, open_origin
from .origin_pool import OriginPool
from .tunnel import Established, TunnelTarget, mitm_unavailable, run_tunnel

__all__ = ["serve_http_connection"]

log = logging.getLogger("netproxy.proxy")

READ_PAUSE: Final = 1 << 18  # stop reading a client that has this much unconsumed input


async def serve_http_connection(
    ctx: ProxyContext, stream: anyio.abc.ByteStream, client_addr: str | None
) -> None:
    """Serve one accepted HTTP-listener connection, fast path first, until it closes."""
    if not adoptable(stream):
        await serve_http_client(ctx, stream, client_addr)
        return
    handoff = await _FastSession(ctx, stream, client_addr).serve()
    if isinstance(handoff, _Tunnel):
        await handoff.run(ctx, stream, client_addr)
    elif handoff is not None:
        await serve_http_client(ctx, stream, client_addr, resume=handoff)


@dataclass(slots=True)
class _Plan:
    request: SimpleRequest
    target: Forward

    @property
    def head(self) -> RequestHead:
        return self.request.head


@dataclass(slots=True)
class _Tunnel:
    """A CONNECT the fast path decided; its tunnel runs once the client stream is anyio's again.

    Only the `200` is written here; a refusal or a failed dial is answered by an h11 session
    that has read the request, exactly as on the h11 path.
    """

    request: SimpleRequest
    target: Connect
    decision: NetworkDecision
    leftover: bytes  # what the client sent after the CONNECT head

    async def run(
        self, ctx: ProxyContext, stream: anyio.abc.ByteStream, client_addr: str | None
    ) -> None:
        session: HttpSession | None = None

        def answering() -> HttpSession:
            nonlocal session
            if session is None:
                session = HttpSession(ctx, stream, client_addr)
                session.take_request(self.request.raw)
            return session

        established = serialize_response_head(
            200, b"Connection established", [], close=not self.request.keep_alive
        )

        async def reply(outcome: Established | UpstreamError | NetworkDecision) -> None:
            if not isinstance(outcome, Established):
                await answering().answer_tunnel(self.target, outcome)
                return
            if write_now(stream, established):
                return
            try:
                await stream.send(established)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                raise ClientGone from None

        try:
            if not self.decision.allowed:
                await answering().answer_tunnel(self.target, self.decision)
                return
            host, port = self.target.host, self.target.port
            tunnel = TunnelTarget(host, port, Protocol.HTTPS_CONNECT, client_addr)
            await run_tunnel(ctx, stream, tunnel, self.decision, reply, leftover=self.leftover)
        except ClientGone:
            return


class _Outcome(Enum):
    DONE = auto()  # response relayed in full
    FALLBACK = auto()  # nothing sent to the client; h11 must judge the response
    TIMEOUT = auto()  # the origin went quiet for `idle_timeout`
    BROKEN = auto()  # the origin failed after the response began: close the client
    CLIENT_GONE = auto()


class _Client(Adopted):
    """The client's side: buffered input and a waiter the session task sleeps on."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        super().__init__(stream)
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[object] | None = None
        self.exchange: _OriginLink | None = None
        self.reading_paused = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_PAUSE and not self.reading_paused:
            self.set_reading(False)
            self.reading_paused = True
        self.on_input()

    def consume(self, n: int) -> bytes:
        taken = bytes(self.buffer[:n])
        del self.buffer[:n]
        if self.reading_paused and len(self.buffer) <= READ_PAUSE // 2:
            self.set_reading(True)
            self.reading_paused = False
        return taken

    def on_input(self) -> None:
        self._wake()
        if self.lost and self.exchange is not None:
            self.exchange.finish(_Outcome.CLIENT_GONE)

    def on_write_paused(self) -> None:
        if self.exchange is not None:
            self.exchange.set_reading(False)

    def on_writable(self) -> None:
        if self.exchange is not None:
            self.exchange.set_reading(True)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def cancel(self) -> None:
        """End a wait for the next request (shutdown: see `ProxyContext.idle_waits`)."""
        if self.waiter is not None:
            _end_wait(self.waiter)

    async def wait(self) -> None:
        """Sleep until input, EOF, loss or a drained writer."""
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def drain(self) -> None:
        """Wait until every byte written has left for the kernel (anyio closes by abort)."""
        if self.lost or not self.transport.get_write_buffer_size():
            return
        self.transport.set_write_buffer_limits(0)  # pauses us until the buffer is empty
        while self.write_paused and not self.lost:
            await self.wait()


class _OriginLink(Adopted):
    """One origin connection: relays a response head and body into the client's transport."""

    def __init__(self, origin: Origin, key: tuple[object, ...], rules: object) -> None:
        super().__init__(origin.stream)
        self.origin = origin
        self.key = key
        self.rules = rules  # the compiled rules it was opened under (see `OriginPool`)
        self.parked: OriginPool | None = None
        self.reusable = True
        self.client: _Client | None = None
        self.done: asyncio.Future[_Outcome] | None = None
        self.remaining = 0
        self.in_body = False
        self.started = False
        self.bodiless = False
        self.close_client = False
        self.limit = 0
        self.idle = 0.0
        self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    async def exchange(
        self,
        client: _Client,
        request: bytes,
        *,
        bodiless: bool,
        close: bool,
        limit: int,
        idle: float,
    ) -> _Outcome:
        """Send `request` and relay its response; `close` = the client connection ends after."""
        loop = self.loop
        self.client, client.exchange = client, self
        self.done = loop.create_future()
        self.remaining, self.in_body, self.started = 0, False, False
        self.bodiless, self.close_client, self.limit, self.idle = bodiless, close, limit, idle
        self.last = loop.time()
        self.timer = loop.call_later(idle, self._check_idle)
        try:
            if client.lost:
                return _Outcome.CLIENT_GONE
            self.transport.write(request)
            outcome = await self.done
        except BaseException:  # cancelled mid-exchange: the connection's state is unknown
            self.reusable = False
            raise
        finally:
            self.timer.cancel()
            client.exchange = self.client = self.done = None
            if client.write_paused:
                self.set_reading(True)
        return outcome

    def data_received(self, data: bytes) -> None:
        client, done = self.client, self.done
        if client is None:  # bytes between exchanges: the connection is not reusable
            self._unusable()
            return
        if done is None or done.done():  # after the outcome: kept for h11 (FALLBACK) or dropped
            self.buffer += data
            self.reusable = False
            return
        self.last = self.loop.time()
        if self.in_body:
            n = len(data)
            if n < self.remaining:
                self.remaining -= n
                client.transport.write(data)
                return
            if n > self.remaining:
                self.reusable = False
                data = data[: self.remaining]
            self.remaining = 0
            client.transport.write(data)
            self.finish(_Outcome.DONE)
            return
        self.buffer += data
        self._on_head()

    def _on_head(self) -> None:
        client = self.client
        assert client is not None
        end = find_head_end(self.buffer)
        if end is None:
            if len(self.buffer) > self.limit:
                self.finish(_Outcome.FALLBACK)
            return
        head = parse_response_head(bytes(self.buffer[:end]))
        length = simple_response_length(head, bodiless=self.bodiless, limit=self.limit)
        if head is None or length is None:
            self.finish(_Outcome.FALLBACK)
            return
        if not keep_alive(head.version, head.headers):
            self.reusable = False
        out = serialize_response_head(
            head.status, head.reason, strip_hop_by_hop(head.headers), close=self.close_client
        )
        body = bytes(self.buffer[end : end + length])
        if len(self.buffer) > end + length:
            self.reusable = False
        self.buffer.clear()
        self.started = True
        client.transport.write(out + body)
        self.remaining = length - len(body)
        if self.remaining:
            self.in_body = True
        else:
            self.finish(_Outcome.DONE)

    def finish(self, outcome: _Outcome) -> None:
        done = self.done
        if done is None or done.done():
            return
        if outcome is not _Outcome.DONE:
            self.reusable = False
        self.in_body = False
        if outcome is _Outcome.FALLBACK and not self.lost:
            self.set_reading(False)  # what follows is h11's to read
        done.set_result(outcome)

    def on_input(self) -> None:  # EOF or loss (data goes through data_received)
        if self.client is None:
            self._unusable()
        elif self.in_body:
            self.finish(_Outcome.BROKEN)
        elif self.done is not None:
            self.finish(_Outcome.FALLBACK)  # h11 reports the early close exactly as before

    def _check_idle(self) -> None:
        loop = self.loop
        client = self.client
        if client is None or self.done is None or self.done.done():
            return
        now = loop.time()
        if client.write_paused:  # a slow client is not an idle origin
            self.last = now
        if now - self.last >= self.idle:
            self.finish(_Outcome.TIMEOUT)
        else:
            self.timer = loop.call_later(self.last + self.idle - now, self._check_idle)

    def _unusable(self) -> None:
        self.reusable = False
        if self.parked is not None:
            self.parked.discard(self.key, self)

    def usable(self) -> bool:
        """Idle and fit for another request."""
        return self.reusable and not (self.lost or self.eof or self.buffer) and self.client is None

    def close(self) -> None:
        """Close the origin connection (it is ours alone: no anyio stream uses it again)."""
        self.parked = None
        if self.saved is not None:
            self.saved = None
            self.transport.abort()


class _FastSession:
    """Serves requests on the fast path; returns how the h11 session takes over, if it must."""

    def __init__(
        self, ctx: ProxyContext, stream: anyio.abc.ByteStream, client_addr: str | None
    ) -> None:
        self.ctx = ctx
        self.client = _Client(stream)
        self.client_addr = client_addr
        self.origin: _OriginLink | None = None

    async def serve(self) -> Handoff | _Tunnel | None:
        client = self.client
        client.adopt()
        first = True
        handoff: Handoff | _Tunnel | None = None
        try:
            while True:
                end = find_head_end(client.buffer)
                if end is None:
                    if client.buffer:  # a partial, bare-LF or oversized head: h11 judges it
                        handoff = self._to_session(first, head_started=True)
                        return handoff
                    if client.eof or client.lost or not await self._wait_for_input(first):
                        return None
                    continue
                if client.buffer.startswith(b"CONNECT "):
                    handoff = await self._tunnel(end) or self._to_session(first, head_started=False)
                    return handoff
                plan = self._plan(end)
                if plan is None:
                    handoff = self._to_session(first, head_started=False)
                    return handoff
                served = await self._serve_one(plan)
                if not isinstance(served, bool):
                    handoff = served
                    return handoff
                if not served or not plan.request.keep_alive:
                    return None
                first = False
        finally:
            self._park_origin()
            if handoff is None and client.transport.get_write_buffer_size():
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(self.ctx.limits.idle_timeout),
                ):
                    await client.drain()
            client.restore()

    # --- one request ------------------------------------------------------------------------

    def _plan(self, end: int) -> _Plan | None:
        """The request at the front of the buffer, if the fast path may serve it."""
        ctx, client = self.ctx, self.client
        config = ctx.config
        if config.proxy_auth_token or (
            ctx.broker is not None and config.dangerously_allow_plaintext_credential_injection
        ):
            return None
        simple = simple_request(client.buffer, end, config.limits.max_header_bytes)
        if simple is None:
            return None
        head = simple.head
        target = classify(head.method, head.target, head.headers)
        if not isinstance(target, Forward) or target.scheme != "http":
            return None
        if ctx.state.rules.is_hooked(target.host):
            return None
        client.consume(len(simple.raw))
        return _Plan(simple, target)

    async def _tunnel(self, end: int) -> _Tunnel | None:
        """Decide a simple CONNECT at the front of the buffer (its tunnel runs later)."""
        ctx, client = self.ctx, self.client
        if ctx.config.proxy_auth_token:
            return None
        simple = simple_request(client.buffer, end, ctx.limits.max_header_bytes, connect=True)
        if simple is None:
            return None
        head = simple.head
        target = classify(head.method, head.target, head.headers)
        if not isinstance(target, Connect):
            return None  # h11's path refuses it and audits that
        client.consume(len(simple.raw))
        tunnel = TunnelTarget(target.host, target.port, Protocol.HTTPS_CONNECT, self.client_addr)
        check = mitm_unavailable(ctx, target.host)
        decision = await decide(ctx, tunnel.request("CONNECT"), check=check)
        return _Tunnel(simple, target, decision, client.consume(len(client.buffer)))

    async def _serve_one(self, plan: _Plan) -> Handoff | bool:
        """Decide and forward one request: True = served, False = close, or a handoff."""
        ctx, head, target = self.ctx, plan.head, plan.target
        request = NetworkPolicyRequest(
            Protocol.HTTP, target.host, target.port, head.method.decode("ascii"), self.client_addr
        )
        decision = await decide(ctx, request)
        if not decision.allowed:
            return self._to_session_decided(plan, decision)
        limits = ctx.limits
        fresh = False
        while True:
            try:
                link, reused = await self._origin_for(target, decision, fresh=fresh)
            except UpstreamError as exc:
                return self._to_session_decided(plan, decision, failure=exc)
            if isinstance(link, Origin):  # not a borrowable stream (e.g. TLS to a proxy)
                return self._to_session_decided(plan, decision, origin=link)
            path, headers = origin_request(head.headers, target, link.origin.via, upgrade=False)
            outgoing = serialize_request(head.method, path, headers) + plan.request.body
            outcome = await link.exchange(
                self.client,
                outgoing,
                bodiless=head.method == b"HEAD",
                close=not plan.request.keep_alive,
                limit=limits.max_header_bytes,
                idle=limits.idle_timeout,
            )
            # A kept connection the origin closed as we reused it: once more on a new one,
            # for a request that is safe to repeat (RFC 9112 §9.3.1).
            if not (reused and outcome is _Outcome.FALLBACK and _closed_unanswered(link)):
                break
            if head.method not in _RETRYABLE or plan.request.body:
                break
            fresh = True
        if outcome is _Outcome.DONE:
            if not link.reusable:
                self._drop_origin()
            return not self.client.lost
        if outcome is _Outcome.FALLBACK:
            return self._to_session_mid_response(plan, link, path, headers)
        self._drop_origin()
        if outcome is _Outcome.TIMEOUT and not link.started:
            label = format_host_port(target.host, target.port)
            failure = UpstreamError(f"{label} did not answer in time", timeout=True)
            return self._to_session_decided(plan, decision, failure=failure)
        return False  # BROKEN, CLIENT_GONE, or a timeout after the response began

    async def _origin_for(
        self, target: Forward, decision: NetworkDecision, *, fresh: bool = False
    ) -> tuple[_OriginLink | Origin, bool]:
        """The origin connection for `target` and whether it served a request before."""
        key = (target.scheme, target.host, target.port, decision.addresses)
        kept = self.origin
        if not fresh and kept is not None and kept.key == key and kept.usable():
            return kept, True
        self._drop_origin()
        rules = self.ctx.state.rules
        pooled = None if fresh else self.ctx.origin_pool.take(key, rules)
        if isinstance(pooled, _OriginLink):
            pooled.parked = None
            self.origin = pooled
            return pooled, True
        origin = await open_origin(self.ctx, target.host, target.port, decision)
        if not adoptable(origin.stream):
            return origin, False
        link = _OriginLink(origin, key, rules)
        link.adopt()
        self.origin = link
        return link, False

    def _drop_origin(self) -> None:
        if self.origin is not None:
            origin, self.origin = self.origin, None
            origin.close()

    def _park_origin(self) -> None:
        """Leave an idle origin connection for the next client (`OriginPool`), or close it."""
        link, self.origin = self.origin, None
        if link is None:
            return
        if self.ctx.origin_pool.give(link.key, link):
            link.parked = self.ctx.origin_pool
        else:
            link.close()

    # --- handing over to h11 ----------------------------------------------------------------

    def _to_session(self, first: bool, *, head_started: bool) -> Handoff:
        """The connection goes to h11 at a request boundary, unread bytes and all."""
        deadline = None
        if head_started:  # the rest of a started head is due within the handshake timeout
            deadline = anyio.current_time() + self.ctx.limits.handshake_timeout

        async def resume(session: HttpSession) -> None:
            await session.serve(first=first, head_deadline=deadline)

        return resume

    def _take_input(self, plan: _Plan) -> bytes:
        """The request plus everything the client sent after it, for h11."""
        rest = self.client.consume(len(self.client.buffer))
        return plan.request.raw + rest

    def _to_session_decided(
        self,
        plan: _Plan,
        decision: NetworkDecision,
        *,
        origin: Origin | None = None,
        failure: UpstreamError | None = None,
    ) -> Handoff:
        data = self._take_input(plan)

        async def resume(session: HttpSession) -> None:
            session.conn.receive_data(data)
            await session.serve_decided(plan.target, decision, origin=origin, failure=failure)

        return resume

    def _to_session_mid_response(
        self, plan: _Plan, link: _OriginLink, path: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Handoff:
        data = self._take_input(plan)
        received = bytes(link.buffer)
        link.buffer.clear()
        link.restore()
        self.origin = None

        async def resume(session: HttpSession) -> None:
            session.conn.receive_data(data)
            await session.serve_response(
                plan.target,
                link.origin,
                link.key,
                (plan.head.method, path, headers, plan.request.body),
                received,
            )

        return resume

    async def _wait_for_input(self, first: bool) -> bool:
        """Wait for the next request's first bytes; False on timeout or shutdown.

        A timer and the client's own waiter (no cancel scope: this runs per request); it is
        in `ctx.idle_waits`, so a shutdown ends it at once like any idle wait.
        """
        ctx, client = self.ctx, self.client
        if ctx.shutting_down:
            return False
        limits = ctx.limits
        wait = limits.handshake_timeout if first else limits.idle_timeout
        loop = client.loop
        waiter = client.waiter = loop.create_future()
        timer = loop.call_later(wait, _end_wait, waiter)
        ctx.idle_waits.add(client)
        try:
            return await waiter is None
        finally:
            timer.cancel()
            ctx.idle_waits.discard(client)
            client.waiter = None


_RETRYABLE: Final = frozenset({b"GET", b"HEAD", b"OPTIONS"})


def _closed_unanswered(link: _OriginLink) -> bool:
    """The origin closed the connection without a byte of response."""
    return not link.buffer and (link.eof or link.lost)


def _end_wait(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(False)
