"""Forward one allowed HTTP request to its origin and relay the answer (SPEC §5.4, §5.5, §5.9).

`OriginForwarder` is the origin side of one `HttpSession`: it keeps the origin connection for
reuse while scheme, host, port and checked addresses stay the same, sends the request with its
body pump, relays the response in batched writes, relays bytes both ways after a `101`, and maps
origin-side stream errors to `UpstreamError` (502, or 504 on a timeout).

The session is reached only through its public helpers; this module never imports `http.py`
at runtime (that module imports this one).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Final, Literal

import anyio
import anyio.abc
import h11

from ..errors import UpstreamError
from ..hosts import format_host_port
from ..net.relay import relay
from ..net.upstream import UpstreamProxy
from ..policy.model import NetworkDecision
from ..proto.h1_fast import serialize_request
from ..proto.http_head import (
    HOP_BY_HOP,
    Forward,
    Headers,
    authority_for,
    connection_tokens,
    head_size,
    header_value,
    strip_hop_by_hop,
)
from .origin import Origin, open_origin

if TYPE_CHECKING:
    from .http import HttpSession

__all__ = [
    "READ_SIZE",
    "ClientGone",
    "OriginForwarder",
    "origin_request",
    "origin_request_head",
    "upstream_io",
]

READ_SIZE = 65536


class ClientGone(Exception):
    """The client connection broke; the session ends without another answer."""


class _Switched(Exception):
    """The exchange became a relayed protocol switch (101); the connection is done."""


class OriginForwarder:
    """The origin side of one client connection: a reusable origin and exchanges over it."""

    def __init__(self, session: HttpSession) -> None:
        self.session = session
        self._origin_key: tuple[object, ...] | None = None
        self._origin: Origin | None = None
        self._origin_conn: h11.Connection | None = None

    def __repr__(self) -> str:
        return f"<OriginForwarder origin={self._origin_key}>"

    async def forward(
        self,
        request: h11.Request,
        headers: list[tuple[bytes, bytes]],
        target: Forward,
        decision: NetworkDecision,
        *,
        upgrade: bool,
    ) -> bool:
        """Send an allowed request to its origin; False = close the connection afterwards.

        `headers` are the client's after any hook or broker rewrite; `upgrade` says whether
        the client's own headers asked for an upgrade (then `Upgrade` is relayed).
        """
        session = self.session
        try:
            origin, client = await self.origin_for(target, decision)
        except UpstreamError as exc:
            await session.upstream_failed(exc)
            return await session.drain()
        path, out = origin_request(headers, target, origin.via, upgrade=upgrade)
        bodiless = _bodiless(request.headers)  # the client's framing, not the forwarded headers
        return await self.exchange(origin, client, request.method, path, out, target, bodiless)

    async def origin_for(
        self, target: Forward, decision: NetworkDecision
    ) -> tuple[Origin, h11.Connection]:
        """The kept origin connection when it matches and is idle, else a newly opened one."""
        key = (target.scheme, target.host, target.port, decision.addresses)
        if self._origin is not None and self._origin_key == key and self._origin_conn is not None:
            conn = self._origin_conn
            closed = conn.trailing_data[1]  # a close-delimited body ended with the connection
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE and not closed:
                conn.start_next_cycle()
                return self._origin, conn
        await self.close()
        ctx = self.session.ctx
        origin = await open_origin(ctx, target.host, target.port, decision, tls=target.tls)
        self._origin, self._origin_key = origin, key
        self._origin_conn = self.new_client()
        return origin, self._origin_conn

    def new_client(self) -> h11.Connection:
        """A fresh h11 client for an origin connection."""
        limit = self.session.ctx.limits.max_header_bytes
        return h11.Connection(h11.CLIENT, max_incomplete_event_size=limit)

    def install(self, origin: Origin, key: tuple[object, ...], conn: h11.Connection) -> None:
        """Keep an origin connection opened elsewhere (the fast path) as this session's."""
        self._origin, self._origin_key, self._origin_conn = origin, key, conn

    async def close(self) -> None:
        """Close the kept origin connection, if any (shielded from cancellation)."""
        if self._origin is not None:
            origin, self._origin, self._origin_conn, self._origin_key = (
                self._origin,
                None,
                None,
                None,
            )
            with anyio.CancelScope(shield=True):
                await origin.stream.aclose()

    async def exchange(
        self,
        origin: Origin,
        client: h11.Connection,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        target: Forward,
        bodiless: bool = False,
    ) -> bool:
        """One request/response over `origin`; False = close the client connection afterwards.

        `client` is the h11 client for `origin`; the request body comes from the session.
        """
        session = self.session
        upstream = origin.stream
        request = h11.Request(method=method, target=path, headers=headers)

        async def run(pending: bytearray) -> bool:
            # No body: h11 has the end of the request already (a bodiless request never
            # yields Data); one send to the origin and no body task.
            if bodiless and isinstance(session.conn.next_event(), h11.EndOfMessage):
                await upstream.send(client.send(request) + client.send(h11.EndOfMessage()))
                return await self._relay_response(client, upstream, target, pending, None)
            await upstream.send(client.send(request))
            body_done = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._send_body, client, upstream, body_done)
                started = await self._relay_response(client, upstream, target, pending, body_done)
                with anyio.fail_after(session.ctx.limits.idle_timeout):
                    await body_done.wait()
            return started

        return await self._guarded(client, target, run)

    async def resume_response(
        self, origin: Origin, client: h11.Connection, target: Forward
    ) -> bool:
        """Relay the response to a request the fast path already sent over `origin`."""

        async def run(pending: bytearray) -> bool:
            return await self._relay_response(client, origin.stream, target, pending, None)

        return await self._guarded(client, target, run)

    async def _guarded(
        self,
        client: h11.Connection,
        target: Forward,
        run: Callable[[bytearray], Awaitable[bool]],
    ) -> bool:
        """Run one exchange, answering its failures (SPEC §5.9); False = close the client."""
        session = self.session
        pending = bytearray()  # response bytes for the client, sent before the next wait
        response_started = False
        try:
            with upstream_io(target):
                response_started = await run(pending)
        except _Switched:
            return False
        except UpstreamError as exc:
            if pending:  # what the client would have had before the failure
                with contextlib.suppress(ClientGone):
                    await session.write(bytes(pending))
                response_started = True
            await self.close()
            if response_started or session.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return False
            await session.upstream_failed(exc)
            return False
        if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
            await self.close()
        return True

    async def _send_body(
        self, client: h11.Connection, upstream: anyio.abc.ByteStream, body_done: anyio.Event
    ) -> None:
        try:
            while True:
                event = await self.session.next_event()
                if isinstance(event, h11.Data):
                    await upstream.send(client.send(event))
                elif isinstance(event, h11.EndOfMessage):
                    await upstream.send(client.send(h11.EndOfMessage()))
                    return
                else:
                    raise ClientGone
        finally:
            body_done.set()

    async def _relay_response(
        self,
        client: h11.Connection,
        upstream: anyio.abc.ByteStream,
        target: Forward,
        pending: bytearray,
        body_done: anyio.Event | None,
    ) -> bool:
        """Forward the origin's response; returns True once its head was queued.

        Writes are batched: everything h11 yields from what has been read so far goes to the
        client in one send, before the next read (a small response costs one write). The
        idle timeout bounds each wait for the origin, not the writes to the client.
        Raises `_Switched` after relaying a protocol switch.
        """
        session = self.session
        conn = session.conn
        limit = session.ctx.limits.max_header_bytes
        idle = session.ctx.limits.idle_timeout
        started = False
        with anyio.CancelScope() as scope:
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    if pending:
                        await session.write(bytes(pending))
                        pending.clear()
                    scope.deadline = anyio.current_time() + idle
                    try:
                        data = await upstream.receive(READ_SIZE)
                    except anyio.EndOfStream:
                        data = b""
                    scope.deadline = math.inf
                    client.receive_data(data)
                    continue
                if isinstance(event, h11.Data):
                    pending += conn.send(event)
                    if len(pending) >= READ_SIZE:
                        await session.write(bytes(pending))
                        pending.clear()
                    continue
                if (
                    isinstance(event, (h11.Response, h11.InformationalResponse))
                    and head_size(len(event.reason) + 13, event.headers) > limit
                ):
                    raise UpstreamError(f"response head larger than {limit} bytes")
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        if pending:
                            await session.write(bytes(pending))
                            pending.clear()
                        if body_done is not None:
                            await body_done.wait()
                        await self._switch(event, client, upstream)
                        raise _Switched
                    if conn.their_http_version == b"1.1":
                        pending += conn.send(
                            h11.InformationalResponse(
                                status_code=event.status_code,
                                headers=strip_hop_by_hop(event.headers),
                                reason=event.reason,
                            )
                        )
                    continue
                if isinstance(event, h11.Response):
                    started = True
                    pending += conn.send(
                        h11.Response(
                            status_code=event.status_code,
                            headers=strip_hop_by_hop(event.headers),
                            reason=event.reason,
                        )
                    )
                elif isinstance(event, h11.EndOfMessage):
                    pending += conn.send(h11.EndOfMessage())
                    await session.write(bytes(pending))
                    pending.clear()
                    return started
                else:
                    raise UpstreamError(f"{target.host} closed the connection mid-response")
        raise TimeoutError  # the idle deadline passed while waiting for the origin

    async def _switch(
        self,
        event: h11.InformationalResponse,
        client: h11.Connection,
        upstream: anyio.abc.ByteStream,
    ) -> None:
        """Relay a protocol switch (WebSocket) after a 101 (SPEC §5.5)."""
        session = self.session
        await session.send(
            h11.InformationalResponse(status_code=101, headers=event.headers, reason=event.reason)
        )
        from_client, _ = session.conn.trailing_data
        from_origin, _ = client.trailing_data
        if from_client:
            await upstream.send(from_client)
        if from_origin:
            await session.stream.send(from_origin)
        await relay(session.stream, upstream, idle_timeout=session.ctx.limits.idle_timeout)
        self._origin = None


class upstream_io:
    """Map stream errors during an exchange to `UpstreamError` (client errors pass)."""

    def __init__(self, target: Forward) -> None:
        self.target = target

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> Literal[False]:
        label = format_host_port(self.target.host, self.target.port)
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        if isinstance(exc, (ClientGone, UpstreamError, _Switched)):
            raise exc
        if isinstance(exc, TimeoutError):
            raise UpstreamError(f"{label} did not answer in time", timeout=True) from exc
        if isinstance(exc, h11.RemoteProtocolError):
            raise UpstreamError(f"{label} sent an invalid HTTP response: {exc}") from exc
        if isinstance(exc, (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)):
            raise UpstreamError(f"connection to {label} failed: {type(exc).__name__}") from exc
        return False


def _bodiless(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """The request has no body: no Transfer-Encoding and no non-zero Content-Length."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return False
    return True


def origin_request_head(
    method: bytes, headers: Headers, target: Forward, via: UpstreamProxy | None
) -> bytes:
    """The head `origin_request` and `serialize_request` give for a request with no Upgrade.

    The plain fast path's per-request rewrite, in one pass over the fields; a `Connection`
    field naming an end-to-end field (rare) takes the two-step way.
    """
    hosts: list[bytes] = []
    fields: list[bytes] = []
    chunked = False
    for name, value in headers:
        if name in HOP_BY_HOP:
            if name == b"connection" and not connection_tokens(value) <= _LISTED_HOP_BY_HOP:
                path, out = origin_request(headers, target, via, upgrade=False)
                return serialize_request(method, path, out)
            chunked = chunked or name == b"transfer-encoding"
        elif name == b"host":
            hosts += (name, b": ", value, b"\r\n")
        else:
            fields += (name, b": ", value, b"\r\n")
    path = target.path
    if not hosts or via is not None:
        authority = authority_for(target.host, target.port, target.scheme)
        if not hosts:
            hosts = [b"host: ", authority, b"\r\n"]
        path = _request_target(target, authority, via)
    if chunked:
        fields.append(b"transfer-encoding: chunked\r\n")
    if via is not None and via.authorization:
        fields += (b"proxy-authorization: ", via.authorization, b"\r\n")
    return b"".join((method, b" ", path, b" HTTP/1.1\r\n", *hosts, *fields, b"\r\n"))


# `Connection` options that name no end-to-end field: dropping the fields they list drops
# nothing `HOP_BY_HOP` has not dropped already.
_LISTED_HOP_BY_HOP: Final = HOP_BY_HOP | {b"close"}


def origin_request(
    headers: Iterable[tuple[bytes, bytes]],
    target: Forward,
    via: UpstreamProxy | None,
    *,
    upgrade: bool,
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The request target and headers to send upstream for the client's `headers` (SPEC §5.4).

    Hop-by-hop fields go, `Host` is added when missing, and through an upstream proxy the
    target is absolute-form with the proxy's credentials.
    """
    headers = list(headers)
    out = strip_hop_by_hop(headers, keep_upgrade=upgrade)
    authority = authority_for(target.host, target.port, target.scheme)
    if header_value(out, b"host") is None:
        out.insert(0, (b"host", authority))
    if header_value(headers, b"transfer-encoding") is not None:
        out.append((b"transfer-encoding", b"chunked"))
    if via is not None and via.authorization:
        out.append((b"proxy-authorization", via.authorization))
    return _request_target(target, authority, via), out


def _request_target(target: Forward, authority: bytes, via: UpstreamProxy | None) -> bytes:
    """Origin-form, or absolute-form through an upstream proxy (RFC 9112 §3.2.2)."""
    if via is None:
        return target.path
    return f"{target.scheme}://".encode() + authority + target.path
