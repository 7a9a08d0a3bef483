"""`x-unix-socket` requests (SPEC §5.6): forward an HTTP request over an allowlisted socket.

Audited with ``server.address = "unix-socket"`` and ``server.port = 0`` (scope non_domain).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Final

import h11

from ..config.model import Access, ProxyConfig
from ..errors import UpstreamError
from ..net.dial import dial_unix
from ..policy.blocked import render_blocked
from ..policy.engine import check_method
from ..policy.model import (
    Decision,
    NetworkDecision,
    NetworkPolicyRequest,
    Protocol,
    Reason,
    Scope,
    Source,
)
from ..proto.http_head import UNIX_SOCKET_HEADER, Forward, header_value, strip_hop_by_hop
from .decide import refuse
from .origin import Origin

if TYPE_CHECKING:
    from .http import HttpSession

__all__ = ["UNIX_SOCKET_HEADER", "is_socket_allowed", "serve_unix_request"]

UNIX_HOST: Final = "unix-socket"
SUPPORTED: Final = sys.platform.startswith(("linux", "darwin"))


def is_socket_allowed(config: ProxyConfig, path: str) -> bool:
    """Absolute path, allowlisted exactly or as the same file after resolving symlinks."""
    if not path.startswith("/") or "\0" in path:
        return False
    real = os.path.realpath(path)
    denied = {p for p, a in config.unix_sockets if a is Access.DENY}
    if path in denied or real in {os.path.realpath(p) for p in denied}:
        return False
    if config.dangerously_allow_all_unix_sockets:
        return True
    allowed = [p for p, a in config.unix_sockets if a is Access.ALLOW]
    return path in allowed or real in {os.path.realpath(p) for p in allowed}


async def serve_unix_request(session: HttpSession, request: h11.Request) -> bool:
    ctx = session.ctx
    headers = list(request.headers)
    raw_path = header_value(headers, UNIX_SOCKET_HEADER) or b""
    path = raw_path.decode("utf-8", "replace")
    method = request.method.decode("ascii", "replace")
    req = NetworkPolicyRequest(Protocol.UNIX_SOCKET, UNIX_HOST, 0, method, session.client_addr)
    if not SUPPORTED:
        decision = refuse(ctx, req, Reason.UNIX_SOCKET_UNSUPPORTED, Source.PROXY_STATE)
        await session.send_simple(501, "unix sockets are not supported on this platform")
        return False
    if not ctx.state.rules.enabled:
        decision = refuse(ctx, req, Reason.PROXY_DISABLED, Source.PROXY_STATE)
    elif not is_socket_allowed(ctx.config, path):
        decision = refuse(ctx, req, Reason.NOT_ALLOWED, Source.PROXY_STATE)
    elif (guard := check_method(ctx.state.rules, Protocol.UNIX_SOCKET, method)) is not None:
        decision = refuse(ctx, req, Reason(guard.reason), Source.MODE_GUARD)
    else:
        decision = NetworkDecision(
            Decision.ALLOW, Reason.ALLOW, Source.PROXY_STATE, scope=Scope.NON_DOMAIN
        )
        ctx.audit.record(req, decision, mode=str(ctx.state.rules.mode))
    if not decision.allowed:
        blocked = render_blocked(
            decision, host=UNIX_HOST, port=0, protocol=str(Protocol.UNIX_SOCKET), method=method
        )
        await session.respond(
            blocked.status, [(k.encode(), v.encode()) for k, v in blocked.headers], blocked.body
        )
        return await session.drain()
    try:
        stream = await dial_unix(os.path.realpath(path), timeout=ctx.limits.connect_timeout)
    except UpstreamError as exc:
        await session.upstream_failed(exc)
        return await session.drain()
    out = [(n, v) for n, v in strip_hop_by_hop(headers) if n != UNIX_SOCKET_HEADER]
    if header_value(headers, b"transfer-encoding") is not None:
        out.append((b"transfer-encoding", b"chunked"))
    target = request.target
    if not target.startswith(b"/"):
        target = b"/" + target.split(b"://", 1)[-1].partition(b"/")[2]
    host = header_value(out, b"host") or b"localhost"
    forward = Forward("http", UNIX_HOST, 0, target, host, absolute=False)
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=ctx.limits.max_header_bytes)
    keep = await session.origins.exchange(
        Origin(stream), client, request.method, target, out, forward
    )
    await stream.aclose()
    return keep
