"""The fast path for requests inside an intercepted tunnel (SPEC §7.4, §16).

Most intercepted requests are simple: an origin-form request whose head arrives whole, naming
the tunnel host, with no body or a small one, answered with a `Content-Length` response.
`InnerFastPath` serves those without h11, with the same judgement of "simple" as the plain
fast path (`proto.h1_fast.simple_request` / `simple_response`): the request gets its
one policy decision through the same `decide()` with the same MITM hook check, the hook and
broker rewrite the headers as on the h11 path, and request and response go through in one
write each.

Once a request was served and the origin connection is open, the next ones are served from
the TLS streams' callbacks (`_Callbacks`): a request is decided with `decide_now` (same
evaluation, same one audit event) and forwarded, and the response relayed, with no task
waking per request. Whatever needs I/O or care (the decider, DNS, a new origin connection,
a refusal, a fallback, a timeout) goes back to the task at that point, as it would have gone
without callbacks.

Everything else is the h11 session's (`HttpSession`), handed over exactly as the plain fast
path hands over (`fast_forward.py`): at a request boundary with the unread bytes; after a
decision (`serve_decided`: refusals, origin failures); or mid-response (`serve_response`:
1xx, chunked, close-delimited, odd heads, early closes), before a byte reaches the client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.abc

from ..errors import UpstreamError
from ..net.tls import TlsStream
from ..policy.model import NetworkDecision, NetworkPolicyRequest, Protocol
from ..proto.h1_fast import (
    SimpleRequest,
    find_head_end,
    serialize_request,
    simple_request,
    simple_response,
)
from ..proto.http_head import Forward, classify, strip_hop_by_hop
from .context import ProxyContext
from .decide import decide, decide_now
from .forward import READ_SIZE, ClientGone, upstream_io
from .http import Handoff, HttpSession
from .origin import Origin, open_origin

__all__ = ["InnerFastPath"]

log = logging.getLogger("netproxy.proxy")

Headers = list[tuple[bytes, bytes]]

_CLIENT_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class _Plan:
    """A request this path serves; its `Forward` target is made only when asked for."""

    __slots__ = ("_target", "authority", "host", "port", "request")

    def __init__(self, request: SimpleRequest, authority: bytes, host: str, port: int) -> None:
        self.request = request
        self.authority = authority  # the Host field, which names `host` and `port`
        self.host = host
        self.port = port
        self._target: Forward | None = None

    @property
    def target(self) -> Forward:
        if self._target is None:
            path = self.request.head.target
            self._target = Forward("https", self.host, self.port, path, self.authority, False)
        return self._target


@dataclass(slots=True)
class _Decided:
    """A request decided in a callback that the task forwards (the origin needs opening)."""

    plan: _Plan
    decision: NetworkDecision


@dataclass(slots=True)
class _Failed:
    """The origin failed a request decided in a callback before its response began."""

    plan: _Plan
    decision: NetworkDecision
    error: UpstreamError


# What the callbacks leave to the task: True = read on, None = close, or what to do next.
_Next = Handoff | _Decided | _Failed | bool | None


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
        self._requests: dict[bytes, NetworkPolicyRequest] = {}  # by method
        self._buffer = bytearray()
        self._callbacks = _Callbacks(self, stream) if isinstance(stream, TlsStream) else None

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
                try:
                    if end is not None:
                        plan = self._plan(end)
                        if plan is None:
                            handoff = self._to_session(first)
                            return handoff
                        del buffer[: len(plan.request.raw)]
                        served = await self._serve_one(plan)
                    elif buffer:  # a partial or odd head: h11 judges it
                        handoff = self._to_session(first)
                        return handoff
                    elif first or self._callbacks is None:
                        data = await self._next_bytes(first)
                        if not data:
                            return None
                        buffer += data
                        continue
                    else:
                        served = await self._from_callbacks(self._callbacks)
                except ClientGone:
                    return None
                if not isinstance(served, bool):
                    handoff = served
                    return handoff
                if not served:
                    return None
                first = False
        finally:  # an origin the session relays from is no longer ours (`_origin` is None)
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
        return _Plan(simple, simple.host, self.host, self.port)

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

    def _request(self, plan: _Plan) -> NetworkPolicyRequest:
        """The policy request: the same for every request with this method (it is immutable)."""
        method = plan.request.head.method
        request = self._requests.get(method)
        if request is None:
            request = NetworkPolicyRequest(
                Protocol.HTTPS, self.host, self.port, method.decode("ascii"), self.client_addr
            )
            if len(self._requests) < 8:
                self._requests[method] = request
        return request

    def _check_for(self, plan: _Plan) -> Callable[[], NetworkDecision | None]:
        head = plan.request.head
        return functools.partial(self._check, head.method, head.target, head.headers)

    async def _serve_one(self, plan: _Plan) -> Handoff | bool:
        """Decide and forward one request: True = served, False = close, or a handoff."""
        decision = await decide(self.ctx, self._request(plan), check=self._check_for(plan))
        return await self._forward(plan, decision)

    async def _from_callbacks(self, callbacks: _Callbacks) -> Handoff | bool:
        """Serve from the callbacks until they need the task, then do what they leave."""
        step = await callbacks.run()
        if isinstance(step, bool):
            return step
        if step is None:
            return False
        if isinstance(step, _Decided):
            return await self._forward(step.plan, step.decision)
        if isinstance(step, _Failed):
            await self._drop_origin()
            return self._to_session_decided(step.plan, step.decision, failure=step.error)
        return step

    async def _forward(self, plan: _Plan, decision: NetworkDecision) -> Handoff | bool:
        """Forward a decided request (see `_serve_one`)."""
        target = plan.target
        if not decision.allowed:
            return self._to_session_decided(plan, decision)
        headers = self._rewrite(plan.request.head.headers)
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
        response = simple_response(
            received,
            end,
            bodiless=simple.head.method == b"HEAD",
            limit=limit,
            close=not simple.keep_alive,
        )
        if response is None:
            raise _Fallback(bytes(received))
        length = response.length
        self._origin_reusable = response.keep_alive and len(received) <= end + length
        pending = response.head + bytes(received[end : end + length])
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
        if self._origin_usable(key):
            assert self._origin is not None
            return self._origin
        await self._drop_origin()
        origin = await open_origin(self.ctx, target.host, target.port, decision, tls=True)
        self._origin, self._origin_key, self._origin_reusable = origin, key, True
        return origin

    def _origin_usable(self, key: tuple[object, ...]) -> bool:
        """The open origin connection may carry the next request to `key`: reusable, and
        (when that can be seen) neither closed nor holding bytes nobody asked for."""
        origin = self._origin
        if origin is None or self._origin_key != key or not self._origin_reusable:
            return False
        stream = origin.stream
        return not isinstance(stream, TlsStream) or stream.idle

    async def _drop_origin(self) -> None:
        if self._origin is not None:
            origin, self._origin, self._origin_key = self._origin, None, None
            with anyio.CancelScope(shield=True):
                await origin.stream.aclose()


# `_Callbacks` states: waiting for a request, for the response head, for the body.
_IDLE: Final = 0
_HEAD: Final = 1
_BODY: Final = 2
_OFF: Final = 3


class _Callbacks:
    """Serves one intercepted connection's simple requests from the streams' callbacks.

    `run` returns to the task (see `_Next`) at the first thing a callback must not do: I/O
    (`decide_now` gives no answer), a refusal, an origin connection to open, a response h11
    must relay, a timeout, a closed connection or a shutdown. Every byte a callback has not
    taken stays in the streams or in the fast path's buffer, so the task goes on exactly where
    the callbacks stopped. One timer serves the connection; a new deadline just moves
    `deadline`, and the timer re-arms itself when it fires early.
    """

    __slots__ = (
        "bodiless",
        "client",
        "deadline",
        "decision",
        "fast",
        "future",
        "idle",
        "keep",
        "limit",
        "loop",
        "origin",
        "out",
        "plan",
        "received",
        "remaining",
        "state",
        "timer",
    )

    def __init__(self, fast: InnerFastPath, client: TlsStream) -> None:
        self.fast = fast
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.state = _OFF
        self.future: asyncio.Future[_Next] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.idle = 0.0  # the idle timeout and head size limit, read per request
        self.limit = 0
        # The exchange in flight (states _HEAD and _BODY).
        self.origin: TlsStream | None = None
        self.plan: _Plan | None = None
        self.decision: NetworkDecision | None = None
        self.out: Headers = []
        self.received = bytearray()
        self.remaining = 0
        self.bodiless = False
        self.keep = True  # the origin connection stays reusable

    async def run(self) -> _Next:
        ctx = self.fast.ctx
        if ctx.shutting_down:
            return None
        loop = self.loop
        future: asyncio.Future[_Next] = loop.create_future()
        self.future = future
        self.state = _IDLE
        limits = ctx.limits
        self.idle, self.limit = limits.idle_timeout, limits.max_header_bytes
        self.deadline = loop.time() + self.idle
        self.timer = loop.call_at(self.deadline, self._on_timer)
        ctx.idle_waits.add(self)
        self.client.set_listener(self._on_client)
        try:
            self._on_client()  # bytes may be waiting already
            return await future
        finally:
            ctx.idle_waits.discard(self)
            self.client.set_listener(None)
            if self.origin is not None:  # cancelled mid-exchange: the origin is spoilt
                self.origin.set_listener(None)
                self.fast._origin_reusable = False
            if self.timer is not None:
                self.timer.cancel()
            self._clear()
            self.state = _OFF
            self.future = None

    def cancel(self) -> None:
        """End the wait for the next request (a shutdown; see `ProxyContext.idle_waits`);
        an exchange in flight completes first."""
        if self.state == _IDLE:
            self._finish(None)

    def _finish(self, step: _Next) -> None:
        self.state = _OFF  # no callback acts again before the task has done `step`
        future = self.future
        if future is not None and not future.done():
            future.set_result(step)

    def _clear(self) -> None:
        self.origin = self.plan = self.decision = None
        self.out = []
        self.received = bytearray()

    # --- the client ---------------------------------------------------------------------

    def _on_client(self) -> None:
        try:
            if self.state == _IDLE:
                self._next_request()
            elif self.state == _BODY:
                self._relay_body()  # the client may have drained its writes
        except BaseException as exc:  # never into the event loop's TLS machinery
            self._fail(exc)

    def _next_request(self) -> None:
        fast, client = self.fast, self.client
        buffer = fast._buffer
        data = client.take()
        if data:
            buffer += data
        elif not buffer:
            if client.ended:
                self._finish(None)
            return
        end = find_head_end(buffer)
        if end is None:
            self._finish(True)  # a partial or odd head: the task hands it to h11
            return
        plan = fast._plan(end)
        if plan is None:
            self._finish(True)
            return
        ctx = fast.ctx
        decision = decide_now(ctx, fast._request(plan), check=fast._check_for(plan))
        if decision is None:  # I/O needed: nothing was audited, the task decides it
            self._finish(True)
            return
        del buffer[: len(plan.request.raw)]
        if not decision.allowed:
            self._finish(fast._to_session_decided(plan, decision))
            return
        origin = fast._origin
        if origin is None or not isinstance(origin.stream, TlsStream):
            self._finish(_Decided(plan, decision))
            return
        if not fast._origin_usable(("https", fast.host, fast.port, decision.addresses)):
            self._finish(_Decided(plan, decision))
            return
        stream = origin.stream
        head = plan.request.head
        out = strip_hop_by_hop(fast._rewrite(head.headers))
        try:
            stream.write(serialize_request(head.method, head.target, out) + plan.request.body)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._finish(_Failed(plan, decision, _upstream_error(plan.target, exc)))
            return
        self.state = _HEAD
        self.origin, self.plan, self.decision, self.out = stream, plan, decision, out
        self.bodiless = head.method == b"HEAD"
        self.keep = True
        limits = ctx.limits  # read once per request: a reload applies from the next one
        self.idle, self.limit = limits.idle_timeout, limits.max_header_bytes
        self.deadline = self.loop.time() + self.idle
        stream.set_listener(self._on_origin)

    # --- the origin ---------------------------------------------------------------------

    def _on_origin(self) -> None:
        try:
            if self.state == _HEAD:
                self._response_head()
            elif self.state == _BODY:
                self._relay_body()
        except BaseException as exc:
            self._fail(exc)

    def _response_head(self) -> None:
        origin, plan, received = self.origin, self.plan, self.received
        assert origin is not None and plan is not None
        data = origin.take()
        if data:
            received += data
            self.deadline = self.loop.time() + self.idle
        end = find_head_end(received)
        if end is None:
            if len(received) > self.limit or origin.ended:
                self._fallback()  # h11 reports an early close or an odd head as before
            return
        response = simple_response(
            received,
            end,
            bodiless=self.bodiless,
            limit=self.limit,
            close=not plan.request.keep_alive,
        )
        if response is None:
            self._fallback()
            return
        length = response.length
        self.keep = response.keep_alive and len(received) <= end + length
        body = bytes(received[end : end + length])
        self.received = bytearray()
        self.remaining = length - len(body)
        if not self._to_client(response.head + body):
            return
        if self.remaining:
            self.state = _BODY
        else:
            self._done()

    def _relay_body(self) -> None:
        origin, client = self.origin, self.client
        assert origin is not None
        while self.remaining and not client.write_blocked:  # else: wait for the client
            data = origin.take()
            if not data:
                if origin.ended:  # the response has begun: the client connection just closes
                    self._drop_origin()
                    self._finish(None)
                return
            self.deadline = self.loop.time() + self.idle
            if len(data) > self.remaining:
                self.keep = False
                data = data[: self.remaining]
            self.remaining -= len(data)
            if not self._to_client(data):
                return
        if not self.remaining:
            self._done()

    def _to_client(self, data: bytes) -> bool:
        try:
            self.client.write(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._drop_origin()
            self._finish(None)
            return False
        return True

    def _done(self) -> None:
        """The response is relayed: on to the next request, if the connection goes on."""
        plan, origin = self.plan, self.origin
        assert plan is not None and origin is not None
        origin.set_listener(None)
        if not self.keep:
            self._drop_origin()
        self._clear()
        ctx = self.fast.ctx
        if not plan.request.keep_alive or ctx.shutting_down:
            self._finish(None)
            return
        self.state = _IDLE
        self.deadline = self.loop.time() + self.idle
        self._next_request()  # pipelined bytes may be waiting

    def _fallback(self) -> None:
        """h11 relays the response: the origin, the request and what came of the answer go."""
        fast, plan = self.fast, self.plan
        assert plan is not None and fast._origin is not None and self.origin is not None
        self.origin.set_listener(None)
        step = fast._to_session_mid_response(plan, fast._origin, self.out, bytes(self.received))
        self._clear()
        self._finish(step)

    def _drop_origin(self) -> None:
        """Close the origin connection (the fast path's) from a callback."""
        fast = self.fast
        if self.origin is not None:
            self.origin.set_listener(None)
        if fast._origin is not None:
            stream = fast._origin.stream
            fast._origin = fast._origin_key = None
            if isinstance(stream, TlsStream):
                stream.abort()
        self.origin = None

    def _fail(self, exc: BaseException) -> None:
        self.state = _OFF
        future = self.future
        if future is not None and not future.done():
            future.set_exception(exc)

    def _on_timer(self) -> None:
        self.timer = None
        if self.future is None or self.future.done():
            return
        now = self.loop.time()
        if self.state == _BODY and self.client.write_blocked:
            self.deadline = now + self.idle  # a slow client is no fault
        if now < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        if self.state == _IDLE:
            self._finish(None)
        elif self.state == _HEAD:
            assert self.plan is not None and self.decision is not None and self.origin is not None
            self.origin.set_listener(None)
            error = _upstream_error(self.plan.target, TimeoutError())
            self._finish(_Failed(self.plan, self.decision, error))
        else:
            self._drop_origin()
            self._finish(None)


def _upstream_error(target: Forward, exc: BaseException) -> UpstreamError:
    """`exc` as `upstream_io` reports it."""
    try:
        with upstream_io(target):
            raise exc
    except UpstreamError as error:
        return error
    raise AssertionError("upstream_io maps every origin error")  # pragma: no cover


async def _receive(stream: anyio.abc.ByteStream, idle: float) -> bytes:
    """The origin's next bytes (b"" at EOF); `TimeoutError` after `idle` seconds."""
    try:
        if isinstance(stream, TlsStream):
            return await stream.receive_within(idle, READ_SIZE)
        with anyio.fail_after(idle):
            return await stream.receive(READ_SIZE)
    except anyio.EndOfStream:
        return b""
