"""The plain-HTTP forwarding fast path (SPEC §5, §16): same contract, far less work per request.

Most proxied requests are the simple kind: an absolute-form ``http://`` request whose head
arrives whole, with no body or a small one, answered with a `Content-Length` response. For
those, `serve_http_connection` skips h11 and anyio's per-call stream machinery: it borrows
both sockets' transports (`net.adopt`), parses heads with the strict h11-subset parser in
`proto.h1_fast`, makes the request's one policy decision through the same evaluation as
`decide()`, and relays the response from the origin's data callback straight into the
client's transport (`fast_links`). After the first response, the next request on a kept
origin connection is served from the callbacks alone when it needs no I/O (`decide_now`).

A simple CONNECT is decided here too; its tunnel then runs as on the h11 path
(`tunnel.run_tunnel`), the relay taking the borrowed transport over, with only the `200`
written directly.

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
from ..net.adopt import adoptable, write_now
from ..policy.model import NetworkDecision, NetworkPolicyRequest, Protocol
from ..proto.h1_fast import (
    RequestHead,
    SimpleRequest,
    find_head_end,
    serialize_response_head,
    simple_request,
)
from ..proto.http_head import Connect, Forward, classify
from .context import ProxyContext
from .decide import decide, decide_now
from .fast_links import ClientSide, OriginLink, Outcome, end_wait
from .forward import ClientGone, origin_request, origin_request_head
from .http import Handoff, HttpSession, serve_http_client
from .origin import Origin, open_origin
from .tunnel import Established, TunnelTarget, mitm_unavailable, run_tunnel

__all__ = ["serve_http_connection"]

log = logging.getLogger("netproxy.proxy")


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


# One tool opens tunnel after tunnel with byte-identical CONNECT heads. Parsing and
# classifying a head are pure functions of its bytes (and the size limit), so each distinct
# head is parsed once: the results are shared and never mutated. Bounded in entries and in
# head size (a longer head is parsed every time).
CONNECT_MEMO_ENTRIES: Final = 256
CONNECT_MEMO_HEAD: Final = 512
_connect_heads: dict[tuple[bytes, int], tuple[SimpleRequest, Connect] | None] = {}


def connect_head(buffer: bytearray, end: int, limit: int) -> tuple[SimpleRequest, Connect] | None:
    """The simple CONNECT whose head is `buffer[:end]` and its target; None leaves it to h11."""
    wire = bytes(buffer[:end])
    key = (wire, limit)
    try:
        return _connect_heads[key]
    except KeyError:
        pass
    parsed: tuple[SimpleRequest, Connect] | None = None
    simple = simple_request(wire, end, limit, connect=True)
    if simple is not None:
        head = simple.head
        target = classify(head.method, head.target, head.headers)
        if isinstance(target, Connect):
            parsed = (simple, target)
    if end <= CONNECT_MEMO_HEAD:
        if len(_connect_heads) >= CONNECT_MEMO_ENTRIES:
            _connect_heads.clear()
        _connect_heads[key] = parsed
    return parsed


@dataclass(slots=True)
class _Plan:
    request: SimpleRequest
    target: Forward

    @property
    def head(self) -> RequestHead:
        return self.request.head


@dataclass(slots=True)
class _Tunnel:
    """A CONNECT the fast path decided, and its tunnel (`run_tunnel`).

    An allowed CONNECT keeps the client's transport borrowed (`held`): an opaque tunnel's
    relay takes it over from there, and every other path hands it back to the anyio stream
    first. Only the `200` is written here — on an opaque tunnel from the origin's connect
    callback (`run_tunnel`'s `connected`), a turn of the loop before the task could; a
    refusal or a failed dial is answered by an h11 session that has read the request,
    exactly as on the h11 path.
    """

    request: SimpleRequest
    target: Connect
    decision: NetworkDecision
    leftover: bytes  # what the client sent after the CONNECT head
    held: ClientSide  # still holds the client's transport when the CONNECT is allowed

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
        answered = False  # the `200` went out from the origin's connect callback

        def write_held() -> bool:
            """Write the `200` through the borrowed transport, if it is still open."""
            held = self.held
            if held.lost or held.transport.is_closing():
                return False
            held.transport.write(established)
            return True

        def connected() -> None:
            nonlocal answered
            answered = self.held.adopted and write_held()

        async def reply(outcome: Established | UpstreamError | NetworkDecision) -> None:
            if answered:  # (a dial deadline met as the connection came: the 200 stands)
                if not isinstance(outcome, Established):
                    raise ClientGone
                return
            if not isinstance(outcome, Established):
                await answering().answer_tunnel(self.target, outcome)
                return
            if self.held.adopted:  # run_tunnel has not handed the transport back
                if not write_held():
                    raise ClientGone
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
            await run_tunnel(
                ctx,
                stream,
                tunnel,
                self.decision,
                reply,
                leftover=self.leftover,
                held=self.held,
                connected=connected,
            )
        except ClientGone:
            return


@dataclass(slots=True)
class _Exchange:
    """A request on its way through an origin link."""

    plan: _Plan
    decision: NetworkDecision
    link: OriginLink
    reused: bool  # the link served a request before (a close may be a stale keep-alive)


# What the session's task does next; the callbacks hand it one when they cannot go on.
@dataclass(slots=True)
class _Planned:
    """A request taken from the buffer, with its decision if one was made (None: not yet)."""

    plan: _Plan
    decision: NetworkDecision | None


@dataclass(slots=True)
class _Exchanged:
    exchange: _Exchange
    outcome: Outcome


class _Boundary(Enum):
    NEXT = auto()  # at a request boundary: read what comes next
    CLOSE = auto()  # the connection is done


# An exception is a bug met in a callback, raised in the task as it would have been there.
_Step = Handoff | _Tunnel | _Planned | _Exchanged | _Boundary | Exception


class _FastSession:
    """Serves requests on the fast path; returns how the h11 session takes over, if it must.

    The task handles whatever needs I/O or h11 (the first request, dials, decider calls,
    lookups, hand-overs). Once a response is relayed, the protocol callbacks go on by
    themselves while the next request can be served without I/O — decided by `decide_now`,
    sent on the kept origin connection — and wake the task with the next `_Step` otherwise.
    One idle clock per connection (`_tick`) times out both a quiet client and a quiet origin.
    """

    def __init__(
        self, ctx: ProxyContext, stream: anyio.abc.ByteStream, client_addr: str | None
    ) -> None:
        self.ctx = ctx
        self.client = ClientSide(stream)
        self.client_addr = client_addr
        self.origin: OriginLink | None = None
        self.loop = self.client.loop
        self.current: _Exchange | None = None
        self.step: _Step | None = None  # handed to the task by the callbacks
        self.wake: asyncio.Future[None] | None = None  # the task sleeps on it
        self.waiting = False  # the callbacks await the next request
        self.idle_since = 0.0
        self.idle = ctx.limits.idle_timeout
        self.timer: asyncio.TimerHandle | None = None
        self.asked: NetworkPolicyRequest | None = None  # the last policy request, reused
        self.asked_method = b""

    async def serve(self) -> Handoff | _Tunnel | None:
        client = self.client
        client.adopt()
        first = True
        step: _Step = _Boundary.NEXT
        handoff: Handoff | _Tunnel | None = None
        try:
            while True:
                if step is _Boundary.NEXT:
                    step = await self._next_request(first)
                elif isinstance(step, _Planned):
                    first = False
                    step = await self._serve_one(step.plan, step.decision)
                elif isinstance(step, _Exchanged):
                    step = await self._after(step.exchange, step.outcome)
                elif step is _Boundary.CLOSE:
                    return None
                elif isinstance(step, Exception):
                    raise step
                else:
                    handoff = step
                    return handoff
        finally:
            self._detach()
            self._park_origin()
            if handoff is None and client.transport.get_write_buffer_size():
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(self.ctx.limits.idle_timeout),
                ):
                    await client.drain()
            if not (isinstance(handoff, _Tunnel) and handoff.decision.allowed):
                client.restore()  # (an allowed tunnel takes the borrowed transport over)

    async def _next_request(self, first: bool) -> _Step:
        """What the bytes at the front of the buffer call for, waiting for them if need be."""
        client = self.client
        while True:
            end = find_head_end(client.buffer)
            if end is None:
                if client.buffer:  # a partial, bare-LF or oversized head: h11 judges it
                    return self._to_session(first, head_started=True)
                if client.eof or client.lost or not await self._wait_for_input(first):
                    return _Boundary.CLOSE
                continue
            if client.buffer.startswith(b"CONNECT "):
                return await self._tunnel(end) or self._to_session(first, head_started=False)
            plan = self._plan(end)
            if plan is None:
                return self._to_session(first, head_started=False)
            return _Planned(plan, None)

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

    def _policy_request(self, plan: _Plan) -> NetworkPolicyRequest:
        """What the policy is asked; the same (immutable) object while method and host repeat."""
        target, method = plan.target, plan.head.method
        asked = self.asked
        if (
            asked is None
            or asked.host != target.host
            or asked.port != target.port
            or self.asked_method != method
        ):
            asked = NetworkPolicyRequest(
                Protocol.HTTP, target.host, target.port, method.decode("ascii"), self.client_addr
            )
            self.asked, self.asked_method = asked, method
        return asked

    async def _tunnel(self, end: int) -> _Tunnel | None:
        """Decide a simple CONNECT at the front of the buffer (its tunnel runs later)."""
        ctx, client = self.ctx, self.client
        if ctx.config.proxy_auth_token:
            return None
        parsed = connect_head(client.buffer, end, ctx.limits.max_header_bytes)
        if parsed is None:
            return None  # not simple, or not a valid CONNECT: h11's path refuses and audits it
        simple, target = parsed
        client.consume(len(simple.raw))
        tunnel = TunnelTarget(target.host, target.port, Protocol.HTTPS_CONNECT, self.client_addr)
        check = mitm_unavailable(ctx, target.host)
        decision = await decide(ctx, tunnel.request("CONNECT"), check=check)
        return _Tunnel(simple, target, decision, client.consume(len(client.buffer)), client)

    async def _serve_one(self, plan: _Plan, decision: NetworkDecision | None) -> _Step:
        """Decide (unless decided) and forward one request."""
        if decision is None:
            decision = await decide(self.ctx, self._policy_request(plan))
        if not decision.allowed:
            return self._to_session_decided(plan, decision)
        return await self._forward(plan, decision)

    async def _forward(
        self, plan: _Plan, decision: NetworkDecision, *, fresh: bool = False
    ) -> _Step:
        """Send an allowed request to its origin; the callbacks relay the response."""
        try:
            link, reused = await self._origin_for(plan.target, decision, fresh=fresh)
        except UpstreamError as exc:
            return self._to_session_decided(plan, decision, failure=exc)
        if isinstance(link, Origin):  # not a borrowable stream (e.g. TLS to a proxy)
            return self._to_session_decided(plan, decision, origin=link)
        self._start(plan, decision, link, reused)
        return await self._sleep()

    async def _after(self, exchange: _Exchange, outcome: Outcome) -> _Step:
        """The task's part once an exchange ended: retry, close, or hand over to h11."""
        plan, link, decision = exchange.plan, exchange.link, exchange.decision
        # A kept connection the origin closed as we reused it: once more on a new one, for a
        # request that is safe to repeat (RFC 9112 §9.3.1).
        if (
            exchange.reused
            and outcome is Outcome.FALLBACK
            and link.closed_unanswered()
            and plan.head.method in _RETRYABLE
            and not plan.request.body
        ):
            return await self._forward(plan, decision, fresh=True)
        if outcome is Outcome.DONE:
            if not link.reusable:
                self._drop_origin()
            if self.client.lost or not plan.request.keep_alive:
                return _Boundary.CLOSE
            return _Boundary.NEXT
        if outcome is Outcome.FALLBACK:
            return self._to_session_mid_response(plan, link)
        self._drop_origin()
        if outcome is Outcome.TIMEOUT and not link.started:
            label = format_host_port(plan.target.host, plan.target.port)
            failure = UpstreamError(f"{label} did not answer in time", timeout=True)
            return self._to_session_decided(plan, decision, failure=failure)
        return _Boundary.CLOSE  # BROKEN, CLIENT_GONE, or a timeout after the response began

    # --- the callback-driven steady state ---------------------------------------------------

    def _start(
        self, plan: _Plan, decision: NetworkDecision, link: OriginLink, reused: bool
    ) -> None:
        """Send the request on `link`; `_exchanged` gets the outcome."""
        head = plan.head
        via = link.origin.via
        outgoing = origin_request_head(head.method, head.headers, plan.target, via)
        outgoing += plan.request.body
        self.current = _Exchange(plan, decision, link, reused)
        limits = self.ctx.limits
        self.idle = limits.idle_timeout
        self._arm()
        link.begin(
            self.client,
            outgoing,
            self._exchanged,
            bodiless=head.method == b"HEAD",
            close=not plan.request.keep_alive,
            limit=limits.max_header_bytes,
        )

    def _exchanged(self, outcome: Outcome) -> None:
        exchange, self.current = self.current, None
        assert exchange is not None
        if (
            outcome is Outcome.DONE
            and exchange.link.reusable
            and exchange.plan.request.keep_alive
            and not self.client.lost
            and self.wake is not None  # the task sleeps: the callbacks may go on
        ):
            self._next_in_callbacks()
        else:
            self._resume_task(_Exchanged(exchange, outcome))

    def _next_in_callbacks(self) -> None:
        """Serve the next request from here if it needs no I/O; else wake the task."""
        try:
            self._serve_next()
        except Exception as exc:  # the task must not sleep on: it raises this and closes
            self._resume_task(exc)

    def _serve_next(self) -> None:
        ctx, client = self.ctx, self.client
        buffer = client.buffer
        end = find_head_end(buffer) if buffer else None
        if end is None:
            if buffer or client.eof or client.lost or ctx.shutting_down:
                self._resume_task(_Boundary.NEXT)
                return
            self.waiting = True
            self.idle_since = self.loop.time()
            self.idle = ctx.limits.idle_timeout
            client.on_bytes = self._bytes_arrived
            ctx.idle_waits.add(self)
            self._arm()
            return
        plan = None if buffer.startswith(b"CONNECT ") else self._plan(end)
        if plan is None:
            self._resume_task(_Boundary.NEXT)
            return
        decision = decide_now(ctx, self._policy_request(plan))
        link = None if decision is None else self._kept_origin(plan.target, decision)
        if decision is None or link is None or not decision.allowed:
            self._resume_task(_Planned(plan, decision))
            return
        self._start(plan, decision, link, reused=True)

    def _bytes_arrived(self) -> None:
        if self.waiting:
            self._stop_waiting()
            self._next_in_callbacks()

    def _stop_waiting(self) -> None:
        self.waiting = False
        self.client.on_bytes = None
        self.ctx.idle_waits.discard(self)

    def cancel(self) -> None:
        """End the callbacks' wait for the next request (shutdown: `ProxyContext.idle_waits`)."""
        if self.waiting:
            self._stop_waiting()
            self._resume_task(_Boundary.CLOSE)

    def _arm(self) -> None:
        if self.timer is None:
            self.timer = self.loop.call_at(self.loop.time() + self.idle, self._tick)

    def _tick(self) -> None:
        """The idle clock: a quiet origin mid-exchange, or a quiet client between requests."""
        self.timer = None
        now = self.loop.time()
        exchange = self.current
        if exchange is not None:
            link = exchange.link
            if self.client.write_paused:  # a slow client is not an idle origin
                link.last = now
            due = link.last + self.idle
            if now >= due:
                link.finish(Outcome.TIMEOUT)
                return
        elif self.waiting:
            due = self.idle_since + self.idle
            if now >= due:
                self._stop_waiting()
                self._resume_task(_Boundary.CLOSE)
                return
        else:
            return
        self.timer = self.loop.call_at(due, self._tick)

    def _resume_task(self, step: _Step) -> None:
        self.step = step
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _sleep(self) -> _Step:
        """Let the callbacks drive until they hand the task a step."""
        if self.step is None:
            self.wake = self.loop.create_future()
            try:
                await self.wake
            finally:
                self.wake = None
        step, self.step = self.step, None
        assert step is not None
        return step

    def _detach(self) -> None:
        """The task ends: no callback may drive this connection any more."""
        if self.waiting:
            self._stop_waiting()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        exchange, self.current = self.current, None
        if exchange is not None:  # cancelled mid-exchange: the connection's state is unknown
            exchange.link.abandon()

    # --- origin connections -----------------------------------------------------------------

    def _kept_origin(self, target: Forward, decision: NetworkDecision) -> OriginLink | None:
        """This connection's own origin link, if it fits `target` and is idle and usable."""
        kept = self.origin
        if kept is not None and kept.key == _origin_key(target, decision) and kept.usable():
            return kept
        return None

    async def _origin_for(
        self, target: Forward, decision: NetworkDecision, *, fresh: bool = False
    ) -> tuple[OriginLink | Origin, bool]:
        """The origin connection for `target` and whether it served a request before."""
        if not fresh:
            kept = self._kept_origin(target, decision)
            if kept is not None:
                return kept, True
        self._drop_origin()
        key = _origin_key(target, decision)
        rules = self.ctx.state.rules
        pooled = None if fresh else self.ctx.origin_pool.take(key, rules)
        if isinstance(pooled, OriginLink):
            pooled.parked = None
            self.origin = pooled
            return pooled, True
        origin = await open_origin(self.ctx, target.host, target.port, decision)
        if not adoptable(origin.stream):
            return origin, False
        link = OriginLink(origin, key, rules)
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

    def _to_session_mid_response(self, plan: _Plan, link: OriginLink) -> Handoff:
        data = self._take_input(plan)
        # What was sent (`origin_request_head`), as the h11 session's origin side takes it.
        path, headers = origin_request(
            plan.head.headers, plan.target, link.origin.via, upgrade=False
        )
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

        A timer and the client's own waiter (no cancel scope); it is in `ctx.idle_waits`,
        so a shutdown ends it at once like any idle wait.
        """
        ctx, client = self.ctx, self.client
        if ctx.shutting_down:
            return False
        limits = ctx.limits
        wait = limits.handshake_timeout if first else limits.idle_timeout
        loop = client.loop
        waiter = client.waiter = loop.create_future()
        timer = loop.call_later(wait, end_wait, waiter)
        ctx.idle_waits.add(client)
        try:
            return await waiter is None
        finally:
            timer.cancel()
            ctx.idle_waits.discard(client)
            client.waiter = None


_RETRYABLE: Final = frozenset({b"GET", b"HEAD", b"OPTIONS"})


def _origin_key(target: Forward, decision: NetworkDecision) -> tuple[object, ...]:
    """Origin connections are reused per scheme, host, port and checked addresses."""
    return (target.scheme, target.host, target.port, decision.addresses)
