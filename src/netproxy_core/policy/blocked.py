"""Render a refusal: status, `x-proxy-error`, JSON or text body (SPEC §4.6).

The one place a decision becomes bytes a client sees; the message is one human sentence that
names the host and what to change.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .model import NetworkDecision, Reason

__all__ = ["PROXY_ERROR", "BlockedResponse", "advice", "proxy_error_for", "render_blocked"]

PROXY_ERROR: Final[Mapping[str, str]] = {
    Reason.NOT_ALLOWED: "blocked-by-allowlist",
    Reason.NOT_ALLOWED_LOCAL: "blocked-by-allowlist",
    Reason.DENIED: "blocked-by-denylist",
    Reason.METHOD_NOT_ALLOWED: "blocked-by-method-policy",
    Reason.MITM_REQUIRED: "blocked-by-mitm-required",
    Reason.MITM_HOOK_DENIED: "blocked-by-mitm-hook",
}


def proxy_error_for(reason: str) -> str:
    return PROXY_ERROR.get(reason, "blocked-by-policy")


def advice(decision: NetworkDecision, host: str, method: str | None = None) -> str:
    """One sentence naming the host and what to change."""
    match decision.reason:
        case Reason.NOT_ALLOWED:
            return (
                f"netproxy blocked {host}: it is not in the allowlist; "
                "add an allow entry for it (domains, --allow) to permit it."
            )
        case Reason.NOT_ALLOWED_LOCAL:
            return (
                f"netproxy blocked {host}: it is or resolves to a local/private address; "
                "allow that exact host or IP, or set allow_local_binding, to permit it."
            )
        case Reason.DENIED:
            return (
                f"netproxy blocked {host}: a deny entry matches it; remove that entry to permit it."
            )
        case Reason.METHOD_NOT_ALLOWED:
            what = f"{method} requests" if method else "this kind of request"
            return (
                f"netproxy blocked {what} to {host}: limited mode allows only GET, HEAD "
                "and OPTIONS; switch to full mode to permit it."
            )
        case Reason.MITM_REQUIRED:
            return (
                f"netproxy blocked the tunnel to {host}: this policy must inspect its requests; "
                "enable MITM (mitm.enabled) to permit it."
            )
        case Reason.MITM_HOOK_DENIED:
            return (
                f"netproxy blocked the request to {host}: no MITM hook for this host matches "
                "it; add or widen a hook to permit it."
            )
        case Reason.PROXY_DISABLED:
            return "netproxy is disabled; enable it to let requests through."
        case Reason.HOST_MISMATCH:
            return (
                "netproxy refused the request: its host does not match the tunnel or request "
                f"target {host}."
            )
        case Reason.INVALID_HOST:
            return f"netproxy refused the request: {host!r} is not a valid host name or address."
        case _:
            return f"netproxy blocked {host}: policy said {decision.reason}."


@dataclass(frozen=True, slots=True)
class BlockedResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def render_blocked(
    decision: NetworkDecision,
    *,
    host: str,
    port: int,
    protocol: str,
    method: str | None = None,
    text: bool = False,
) -> BlockedResponse:
    """The response for a refused request.

    Args:
        text: plain-text body (a refused CONNECT) instead of the JSON body of a forwarded or
            intercepted request.
    """
    message = advice(decision, host, method)
    if decision.reason == Reason.PROXY_DISABLED:
        return BlockedResponse(
            503, (("content-type", "text/plain; charset=utf-8"),), message.encode() + b"\n"
        )
    headers = [("x-proxy-error", proxy_error_for(decision.reason))]
    if text:
        headers.append(("content-type", "text/plain; charset=utf-8"))
        body = message.encode() + b"\n"
    else:
        headers.append(("content-type", "application/json"))
        body = json.dumps(
            {
                "status": "blocked",
                "host": host,
                "reason": str(decision.reason),
                "decision": str(decision.decision),
                "source": str(decision.source),
                "protocol": protocol,
                "port": port,
                "message": message,
            }
        ).encode()
    return BlockedResponse(403, tuple(headers), body)
