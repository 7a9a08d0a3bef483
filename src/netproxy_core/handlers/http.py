"""The per-connection HTTP proxy request loop (SPEC §5): read, check, dispatch, answer.

`HttpSession` is the h11 server for one client: it reads request heads (408 / 414 / 431 / 400
on bad ones), makes one policy decision per request, answers refusals, hands CONNECT to
`tunnel.run_tunnel` and allowed requests to `forward.OriginForwarder`. Its public writing helpers
(`send`, `write`, `respond`, `send_simple`, `upstream_failed`, `drain`, `next_event`) are
used by `forward.py` and `unix.py`.

The same loop serves requests inside an intercepted TLS tunnel (`inner=InnerTarget`), where
every request must name the tunnel host and is forwarded over verified TLS (SPEC §7.4).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc
import h11

from ..config.model import Mode
from ..errors import ClientProtocolError, UpstreamError
from ..policy.blocked import render_blocked
from ..policy.engine import deny
from ..policy.model import NetworkDecision, NetworkPolicyRequest, Protocol, Reason, Scope, Source
from ..proto.http_head import (
    TE_AND_CL,
    Connect,
    Forward,
    Reject,
    check_proxy_auth,
    classify,
    has_content_length,
    header_value,
    oversize_request,
    protocol_error_text,
    status_phrase,
    target_authority,
)
from .context import ProxyContext
from .decide import Check, decide, refuse
from .forward import READ_SIZE, ClientGone, OriginForwarder
from .origin import Origin
from .tunnel import Established, TunnelTarget, mitm_unavailable, run_tunnel
from .unix import UNIX_SOCKET_HEADER, serve_unix_request

__all__ = ["Handoff", "InnerTarget", "RequestHook", "serve_http_client"]

log = logging.getLogger("netproxy.proxy")

MAX_DRAIN = 1 << 20  # body bytes we read and discard after a refusal before closing instead

# Applied to an allowed inner request before forwarding: returns new headers or a refusal.
RequestHook = Callable[
    [h11.Request, "InnerTarget"], Awaitable["list[tuple[bytes, bytes]] | NetworkDecision"]
]


@dataclass(frozen=True, slots=True)
class InnerTarget:
    """The tunnel an intercepted connection belongs to."""

    host: str
    port: int
    client_addr: str | None
    hook: RequestHook | None = None
    # Run inside `decide` after the local re-check, before the limited-mode method guard
    # (SPEC §7.4 step 3): a refusal it returns is the request's one audited decision.
    check: Callable[[h11.Request, InnerTarget], NetworkDecision | None] | None = None


class HttpSession:
    """One client connection: reads requests, decides, forwards, answers."""

    def __init__(
        self,
        ctx: ProxyContext,
        stream: anyio.abc.ByteStream,
        client_addr: str | None,
        inner: InnerTarget | None = None,
    ) -> None:
        self.ctx = ctx
        self.stream = stream
        self.client_addr = client_addr
        self.inner = inner
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=ctx.limits.max_header_bytes
        )
        self.origins = OriginForwarder(self)
        self._head_bytes = 0
        self._head_newline = False
        self._line_bytes = 0  # bytes of the request line seen so far (414 detection)
        self._raw_head: list[bytes] = []  # bytes read for the current head (error recovery)

    def __repr__(self) -> str:
        return (
            f"<HttpSession client={self.client_addr} state={self.conn.their_state}"
            f"{' inner=' + self.inner.host if self.inner else ''}>"
        )

    # --- reading ------------------------------------------------------------------------

    async def _receive(self) -> bytes:
        try:
            return await self.stream.receive(READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return b""

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        """The client's next h11 event, reading as needed (a broken connection reads as EOF)."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self._receive()
            if self.conn.their_state is h11.IDLE:
                self._head_bytes += len(data)
                self._note_line(data)
                self._raw_head.append(data)
            self.conn.receive_data(data)

    def _note_line(self, data: bytes) -> None:
        if not self._head_newline:
            end = data.find(b"\n")
            self._line_bytes += len(data) if end < 0 else end
            self._head_newline = end >= 0

    async def _read_head(
        self, first: bool, deadline: float | None = None
    ) -> h11.Event | type[h11.PAUSED] | None:
        """The next request head; None when the connection should just close.

        `deadline` bounds a head whose first bytes were read before this session took over.
        """
        ctx, limits = self.ctx, self.ctx.limits
        self._head_bytes, self._head_newline, self._line_bytes = 0, False, 0
        pipelined = self.conn.trailing_data[0]
        self._raw_head = [pipelined] if pipelined else []
        if pipelined:
            self._head_bytes = len(pipelined)
            self._note_line(pipelined)
        event = self.conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        wait = limits.handshake_timeout if first else limits.idle_timeout
        data: bytes | None = None
        # One scope is both the idle deadline and the shutdown cancel (cheaper than two).
        idle = ctx.idle_wait()
        idle.deadline = anyio.current_time() + wait if deadline is None else deadline
        ctx.idle_waits.add(idle)
        try:
            with idle:
                data = await self._receive()
        finally:
            ctx.idle_waits.discard(idle)
        if data is None:
            if idle.cancelled_caught and not ctx.shutting_down:
                raise TimeoutError
            return None
        self._head_bytes = len(data)
        self._note_line(data)
        self._raw_head.append(data)
        self.conn.receive_data(data)
        event = self.conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]  # the whole head came in one read
        if deadline is None:
            deadline = anyio.current_time() + limits.handshake_timeout
        with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
            return await self.next_event()

    # --- the loop -----------------------------------------------------------------------

    async def serve(self, *, first: bool = True, head_deadline: float | None = None) -> None:
        """Serve requests until the connection should close.

        `first` says no request was served on this connection yet (the handshake timeout
        applies), `head_deadline` bounds a request head whose first bytes are in `conn`.
        """
        try:
            while True:
                try:
                    try:
                        event = await self._read_head(first, head_deadline)
                    except h11.RemoteProtocolError as exc:
                        event = self._recover_head(exc)
                except TimeoutError:
                    if self._head_bytes:
                        await self.send_simple(408, "request head not received in time")
                    return
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    if status == 501 and has_content_length(b"".join(self._raw_head)):
                        await self.send_simple(400, TE_AND_CL)
                        return
                    if self._line_bytes > self.ctx.limits.max_header_bytes or (
                        status == 431 and not self._head_newline
                    ):
                        status = 414
                    await self.send_simple(status, protocol_error_text(status, exc))
                    return
                if not isinstance(event, h11.Request):
                    return
                oversize = oversize_request(
                    event.method, event.target, event.headers, self.ctx.limits.max_header_bytes
                )
                if oversize is not None:
                    await self.send_simple(oversize, protocol_error_text(oversize, None))
                    return
                if not await self._handle(event) or not self._next_cycle():
                    return
                first, head_deadline = False, None
        except ClientGone:
            return
        finally:
            await self.origins.close()

    def _next_cycle(self) -> bool:
        """Ready for the next request on this connection; False = close it."""
        if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
            return False
        self.conn.start_next_cycle()
        return True

    # --- taking over from the fast path (`fast_forward.py`) --------------------------------

    async def serve_decided(
        self,
        target: Forward,
        decision: NetworkDecision,
        *,
        origin: Origin | None = None,
        failure: UpstreamError | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer a request already in `conn` that a fast path decided, then serve on.

        `failure` is the origin's failure to answer; `origin` a connection already opened;
        `headers` the request's after a MITM hook or broker rewrite.
        """
        request = self.conn.next_event()
        assert isinstance(request, h11.Request), request  # the fast path's heads are h11's
        if headers is None:
            headers = list(request.headers)
        method = request.method.decode("ascii")
        protocol = Protocol.HTTP if self.inner is None else Protocol.HTTPS

        async def answer() -> bool:
            if failure is not None:
                await self.upstream_failed(failure)
                return False
            if not decision.allowed:
                return await self._refused(decision, target, protocol, method)
            if origin is not None:
                key = (target.scheme, target.host, target.port, decision.addresses)
                self.origins.install(origin, key, self.origins.new_client())
            return await self.origins.forward(request, headers, target, decision, upgrade=False)

        await self._continue(answer)

    async def serve_response(
        self,
        target: Forward,
        origin: Origin,
        key: tuple[object, ...],
        sent: tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes],
        received: bytes,
    ) -> None:
        """Relay a response the fast path could not: the request in `conn` was `sent`
        (method, target, headers, body) over `origin`, which answered `received` so far."""
        while not isinstance(self.conn.next_event(), h11.EndOfMessage):
            pass  # the request is whole in `conn`: Request, [Data], EndOfMessage
        method, path, headers, body = sent
        client = self.origins.new_client()
        client.send(h11.Request(method=method, target=path, headers=headers))
        if body:
            client.send(h11.Data(data=body))
        client.send(h11.EndOfMessage())
        client.receive_data(received)
        self.origins.install(origin, key, client)
        await self._continue(lambda: self.origins.resume_response(origin, client, target))

    async def _continue(self, answer: Callable[[], Awaitable[bool]]) -> None:
        try:
            keep = await answer()
        except ClientGone:
            keep = False
        if keep and self._next_cycle():
            await self.serve(first=False)
        else:
            await self.origins.close()

    def _recover_head(self, exc: h11.RemoteProtocolError) -> h11.Event | type[h11.PAUSED]:
        """Accept an HTTP/1.1 CONNECT or absolute-form request without `Host` (SPEC §5.2).

        h11 insists on `Host` for HTTP/1.1, but a proxy request names its host in the target;
        the head is re-parsed with `Host` set to the target's authority (so §5.3 holds).
        Anything else re-raises `exc`.
        """
        raw = b"".join(self._raw_head)
        end = raw.find(b"\n")
        authority = target_authority(raw[:end]) if end > 0 else None
        if str(exc) != "Missing mandatory Host: header" or authority is None:
            raise exc
        conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.ctx.limits.max_header_bytes
        )
        conn.receive_data(raw[: end + 1] + b"Host: " + authority + b"\r\n" + raw[end + 1 :])
        event = conn.next_event()
        if event is h11.NEED_DATA:
            raise exc
        self.conn = conn
        return event  # type: ignore[return-value]

    async def _handle(self, request: h11.Request) -> bool:
        """Serve one request; False = close the connection afterwards."""
        headers = list(request.headers)
        has_te = header_value(headers, b"transfer-encoding") is not None
        if has_te and header_value(headers, b"content-length") is not None:
            await self.send_simple(400, TE_AND_CL)
            return False
        token = self.ctx.config.proxy_auth_token
        if self.inner is None and token and not check_proxy_auth(headers, token):
            await self.respond(
                407,
                [
                    (b"proxy-authenticate", b'Basic realm="netproxy"'),
                    (b"content-type", b"text/plain"),
                ],
                b"netproxy requires proxy authentication\n",
            )
            return await self.drain()
        target: Forward | Connect | Reject
        if self.inner is not None:
            target = self._inner_target(request, headers)
        else:
            if header_value(headers, UNIX_SOCKET_HEADER) is not None:
                return await serve_unix_request(self, request)
            target = classify(request.method, request.target, headers)
        method = request.method.decode("ascii", "replace")
        if isinstance(target, Reject):
            if target.reason is not None:
                protocol = Protocol.HTTP if self.inner is None else Protocol.HTTPS
                if self.inner is None and request.method == b"CONNECT":
                    protocol = Protocol.HTTPS_CONNECT
                req = self._policy_request(
                    protocol,
                    target.host,
                    target.port,
                    method,
                )
                refuse(self.ctx, req, target.reason, Source.BASELINE_POLICY, Scope.DOMAIN)
            await self.send_simple(target.status, target.detail)
            return False
        if isinstance(target, Connect):
            await self._connect(target)
            return False
        return await self._forward(request, headers, target, method)

    def _inner_target(
        self, request: h11.Request, headers: list[tuple[bytes, bytes]]
    ) -> Forward | Reject:
        inner = self.inner
        assert inner is not None
        if request.method == b"CONNECT":
            return Reject(405, "CONNECT inside an intercepted tunnel is not allowed")
        if not request.target.startswith(b"/"):
            target = classify(request.method, request.target, headers)
            if isinstance(target, Reject):
                return target
            if isinstance(target, Connect):
                return Reject(405, "CONNECT inside an intercepted tunnel is not allowed")
            if (target.host, target.port) != (inner.host, inner.port) or target.scheme != "https":
                return Reject(
                    400,
                    "request target does not match the tunnel",
                    Reason.HOST_MISMATCH,
                    host=inner.host,
                    port=inner.port,
                )
            return Forward("https", inner.host, inner.port, target.path, target.authority, False)
        host_header = header_value(headers, b"host")
        target = classify(b"GET", b"https://" + (host_header or b"") + request.target, [])
        if (
            not host_header
            or isinstance(target, (Reject, Connect))
            or (target.host, target.port) != (inner.host, inner.port)
        ):
            return Reject(
                400,
                "Host header does not match the tunnel",
                Reason.HOST_MISMATCH,
                host=inner.host,
                port=inner.port,
            )
        return Forward("https", inner.host, inner.port, request.target, host_header, False)

    def _policy_request(
        self, protocol: Protocol, host: str, port: int, method: str | None
    ) -> NetworkPolicyRequest:
        return NetworkPolicyRequest(protocol, host, port, method, self.client_addr)

    # --- deciding -----------------------------------------------------------------------

    async def _forward(
        self, request: h11.Request, headers: list[tuple[bytes, bytes]], target: Forward, method: str
    ) -> bool:
        ctx = self.ctx
        protocol = Protocol.HTTPS if self.inner is not None else Protocol.HTTP
        upgrade = header_value(headers, b"upgrade") is not None
        req = self._policy_request(protocol, target.host, target.port, method)
        check: Check | None = None
        if self.inner is not None and self.inner.check is not None:
            check = functools.partial(self.inner.check, request, self.inner)
        elif self.inner is None and ctx.state.rules.is_hooked(target.host):
            check = _mitm_required
        if upgrade and ctx.config.mode is Mode.LIMITED:  # SPEC §4.5; one request, one event
            check = functools.partial(_upgrade_refused, check)
        decision = await decide(ctx, req, check=check)
        if decision.allowed and self.inner is not None and self.inner.hook is not None:
            outcome = await self.inner.hook(request, self.inner)
            if isinstance(outcome, NetworkDecision):
                decision = outcome
            else:
                headers = outcome
        if (
            decision.allowed
            and self.inner is None
            and ctx.broker is not None
            and ctx.config.dangerously_allow_plaintext_credential_injection
        ):
            headers = ctx.broker.swap(headers, target.host)
        if not decision.allowed:
            return await self._refused(decision, target, protocol, method)
        return await self.origins.forward(request, headers, target, decision, upgrade=upgrade)

    async def _refused(
        self, decision: NetworkDecision, target: Forward, protocol: Protocol, method: str
    ) -> bool:
        """Answer a refused request (SPEC §4.6) and discard its body; False = close."""
        blocked = render_blocked(
            decision, host=target.host, port=target.port, protocol=str(protocol), method=method
        )
        await self.respond(
            blocked.status, [(k.encode(), v.encode()) for k, v in blocked.headers], blocked.body
        )
        return await self.drain()

    # --- CONNECT ------------------------------------------------------------------------

    async def _connect(self, target: Connect) -> None:
        tunnel = TunnelTarget(target.host, target.port, Protocol.HTTPS_CONNECT, self.client_addr)
        if not isinstance(await self.next_event(), h11.EndOfMessage):
            return
        check = mitm_unavailable(self.ctx, target.host)
        decision = await decide(self.ctx, tunnel.request("CONNECT"), check=check)
        if not decision.allowed:
            await self.answer_tunnel(target, decision)
            return
        leftover, _ = self.conn.trailing_data

        async def reply(outcome: Established | UpstreamError | NetworkDecision) -> None:
            if isinstance(outcome, Established):
                await self.send(
                    h11.Response(status_code=200, headers=[], reason=b"Connection established")
                )
            else:
                await self.answer_tunnel(target, outcome)

        await run_tunnel(self.ctx, self.stream, tunnel, decision, reply, leftover=leftover)

    def take_request(self, raw: bytes) -> None:
        """Read a whole request a fast path already parsed (head and body) into `conn`."""
        self.conn.receive_data(raw)
        while not isinstance(self.conn.next_event(), h11.EndOfMessage):
            pass

    async def answer_tunnel(
        self, target: Connect, outcome: UpstreamError | NetworkDecision
    ) -> None:
        """A CONNECT that gets no tunnel: 502/504 for a dial failure, else the refusal text."""
        if isinstance(outcome, UpstreamError):
            await self.upstream_failed(outcome)
        else:
            await self._send_blocked_text(outcome, target)

    async def _send_blocked_text(self, decision: NetworkDecision, target: Connect) -> None:
        blocked = render_blocked(
            decision,
            host=target.host,
            port=target.port,
            protocol=str(Protocol.HTTPS_CONNECT),
            method="CONNECT",
            text=True,
        )
        await self.respond(
            blocked.status,
            [(k.encode(), v.encode()) for k, v in blocked.headers],
            blocked.body,
            close=True,
        )

    # --- writing ------------------------------------------------------------------------

    async def send(self, event: h11.Event) -> None:
        """Send one h11 event to the client."""
        data = self.conn.send(event)
        if data:
            await self.write(data)

    async def write(self, data: bytes) -> None:
        """Write bytes to the client; `ClientGone` if it went away."""
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            raise ClientGone from None

    async def respond(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool = False
    ) -> None:
        """A whole response with a Content-Length (`ClientGone` once a response has begun)."""
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            raise ClientGone
        await self.send(
            h11.Response(status_code=status, headers=headers, reason=status_phrase(status))
        )
        await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def send_simple(
        self, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """A short text response that closes the connection; a gone client is ignored."""
        with contextlib.suppress(ClientGone, h11.LocalProtocolError):
            await self.respond(
                status,
                [(b"content-type", b"text/plain; charset=utf-8"), *(extra or [])],
                text.encode() + b"\n",
                close=True,
            )

    async def upstream_failed(self, exc: UpstreamError) -> None:
        """Answer 502 / 504 with `x-proxy-error` (SPEC §5.9)."""
        log.info("upstream failure: %s", exc)
        await self.send_simple(exc.status, str(exc), [(b"x-proxy-error", exc.proxy_error.encode())])

    async def drain(self) -> bool:
        """After answering without forwarding: discard the request body (bounded)."""
        if self.conn.their_state is h11.DONE:
            return True
        seen = 0
        with anyio.move_on_after(self.ctx.limits.handshake_timeout):
            while seen <= MAX_DRAIN:
                event = await self.next_event()
                if isinstance(event, h11.Data):
                    seen += len(event.data)
                    continue
                return isinstance(event, h11.EndOfMessage)
        return False


def _mitm_required() -> NetworkDecision:
    """Plain HTTP to a host with MITM hooks (SPEC §7.5)."""
    return deny(Reason.MITM_REQUIRED, Source.MODE_GUARD, Scope.NON_DOMAIN)


def _upgrade_refused(check: Check | None) -> NetworkDecision:
    """Limited mode refuses `Upgrade` requests, after any other handler-level check."""
    return (check() if check is not None else None) or deny(
        Reason.METHOD_NOT_ALLOWED, Source.MODE_GUARD, Scope.NON_DOMAIN
    )


# How a fast path hands its connection to an h11 session: a continuation run by the session.
Handoff = Callable[[HttpSession], Awaitable[None]]


async def serve_http_client(
    ctx: ProxyContext,
    stream: anyio.abc.ByteStream,
    client_addr: str | None,
    resume: Handoff | None = None,
) -> None:
    """Serve one client connection until it closes; `resume` takes over from the fast path."""
    started = time.monotonic()
    session = HttpSession(ctx, stream, client_addr)
    try:
        await (session.serve() if resume is None else resume(session))
    except ClientProtocolError as exc:
        log.debug("client %s: %s", client_addr, exc)
    finally:
        log.debug("connection from %s closed after %.3fs", client_addr, time.monotonic() - started)
