"""Serve an intercepted TLS tunnel (SPEC §7.4): leaf handshake, then the inner request loop.

`serve_intercepted` terminates the client's TLS with a leaf for the tunnel host (the event
loop's own TLS, `net.tls`) and serves the decrypted requests: simple ones on the fast path
(`intercept_fast.InnerFastPath`), everything from the first other one on with `HttpSession`
(which checks Host, re-runs the policy per request and forwards over verified TLS). This
module supplies the per-request MITM step, used by both: the hook check that runs inside
`decide` (after the local re-check, before the limited-mode method guard) and, for an allowed
request, broker injection followed by the matched hook's strip/inject actions.

A hooked host with no matching hook is refused `mitm_hook_denied`, source `baseline_policy`,
scope `domain`: hooks are part of the configured policy for that host, as in the reference
(codex-mitm-broker.md §3.4 step 5), not a mode guard.

Not here: whether to intercept (`tunnel.py`); compiling hooks (`mitm_hooks.py`).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
import h11

from ..errors import ClientProtocolError
from ..mitm_hooks import CompiledHook, MitmHooks, compile_hooks
from ..net.tls import start_tls
from ..policy.engine import deny
from ..policy.model import NetworkDecision, Reason, Scope, Source
from .context import ProxyContext
from .http import HttpSession, InnerTarget
from .intercept_fast import InnerFastPath
from .tunnel import TunnelTarget

__all__ = ["MitmInterceptor", "serve_intercepted"]

log = logging.getLogger("netproxy.proxy")

Headers = list[tuple[bytes, bytes]]


class MitmInterceptor:
    """`ProxyContext.intercept` for one proxy: holds its compiled hooks (swapped on reload)."""

    __slots__ = ("hooks",)

    def __init__(self, hooks: MitmHooks) -> None:
        self.hooks = hooks

    def __repr__(self) -> str:
        return f"<MitmInterceptor hosts={sorted(self.hooks.by_host)}>"

    async def __call__(self, ctx: ProxyContext, stream: Any, target: Any) -> None:
        await serve_intercepted(ctx, stream, target, hooks=self.hooks)


async def serve_intercepted(
    ctx: ProxyContext,
    stream: anyio.abc.ByteStream,
    target: TunnelTarget,
    *,
    hooks: MitmHooks | None = None,
) -> None:
    """TLS to the client with a leaf for `target.host`, then serve its requests. Closes `stream`.

    Args:
        stream: the client side of the tunnel, positioned at its first (TLS) byte.
        hooks: compiled hooks; by default compiled from the live configuration.
    """
    if ctx.ca is None:
        log.warning("cannot intercept %s: no MITM CA", target.host)
        await stream.aclose()
        return
    try:
        with anyio.fail_after(ctx.limits.handshake_timeout):
            tls = await start_tls(
                stream,
                ctx.ca.server_context(target.host),
                server_side=True,
                handshake_timeout=ctx.limits.handshake_timeout,
            )
    except (
        TimeoutError,
        ssl.SSLError,
        OSError,
        anyio.BrokenResourceError,
        anyio.EndOfStream,
    ) as exc:
        log.info(
            "TLS handshake with %s for %s failed: %s",
            target.client_addr or "client",
            target.host,
            _describe(exc),
        )
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        return
    step = _MitmStep(
        ctx, hooks if hooks is not None else compile_hooks(ctx.config.mitm), target.host
    )
    inner = InnerTarget(
        target.host, target.port, target.client_addr, hook=step.apply, check=step.check
    )
    try:
        fast = InnerFastPath(
            ctx,
            tls,
            target.host,
            target.port,
            target.client_addr,
            check=step.check_head,
            rewrite=step.rewrite,
        )
        handoff = await fast.serve()
        if handoff is not None:  # h11 takes over, with every byte it has not seen
            await handoff(HttpSession(ctx, tls, target.client_addr, inner=inner))
    except ClientProtocolError as exc:
        log.debug("intercepted client %s: %s", target.client_addr, exc)
    finally:
        with anyio.CancelScope(shield=True):
            await tls.aclose()


class _MitmStep:
    """The per-connection MITM step; requests on one connection are served one at a time."""

    __slots__ = ("_ctx", "_hooks", "_host", "_matched")

    def __init__(self, ctx: ProxyContext, hooks: MitmHooks, host: str) -> None:
        self._ctx = ctx
        self._hooks = hooks
        self._host = host
        self._matched: CompiledHook | None = None

    def check(self, request: h11.Request, inner: InnerTarget) -> NetworkDecision | None:
        """Hook matching (inside `decide`): a refusal for a hooked host without a match."""
        return self.check_head(request.method, request.target, request.headers)

    def check_head(
        self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> NetworkDecision | None:
        self._matched = None
        if not self._hooks.hooked(self._host):
            return None
        self._matched = self._hooks.match(
            self._host,
            method.decode("ascii", "replace"),
            target.decode("ascii", "replace"),
            headers,
        )
        if self._matched is None:
            return deny(Reason.MITM_HOOK_DENIED, Source.BASELINE_POLICY, Scope.DOMAIN)
        return None

    async def apply(self, request: h11.Request, inner: InnerTarget) -> Headers:
        """Broker injection first, then the matched hook's actions (SPEC §7.4 step 4)."""
        return self.rewrite(request.headers)

    def rewrite(self, headers: Sequence[tuple[bytes, bytes]]) -> Headers:
        out: Headers = list(headers)
        broker = self._ctx.broker
        if broker is not None:
            out = broker.swap(out, self._host)
        if self._matched is not None:
            out = self._matched.apply(out)
        return out


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__
    return type(exc).__name__
