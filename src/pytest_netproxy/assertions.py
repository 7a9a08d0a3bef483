"""Assertion helpers over a test's decision events, and their messages (SPEC §14.1).

Pure: each function takes the events a test recorded and the policy in force, and raises an
`AssertionError` whose text lists every recorded decision and that policy, so a failing test
can be fixed without reading the plugin (STYLE habit 11).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from netproxy_core import InvalidHost, PolicyDecisionEvent, ProxyConfig, Reason, canonicalize_host

__all__ = [
    "Expectation",
    "assert_allowed",
    "assert_blocked",
    "assert_no_blocked",
    "assert_not_contacted",
    "format_decisions",
    "format_policy",
    "normalize_host",
    "unexpected_blocks",
]


@dataclass(frozen=True, slots=True)
class Expectation:
    """A block the test declared or asserted (strict mode): host, and reason if given."""

    host: str
    reason: str | None = None

    def covers(self, host: str, reason: str) -> bool:
        return self.host == host and (self.reason is None or self.reason == reason)


def normalize_host(host: str) -> str:
    """The form hosts take in events: the engine's one canonicaliser (SPEC §3.1).

    A host that is not valid stays as written (events of reason `invalid_host` carry the
    host as received).
    """
    try:
        return canonicalize_host(host)
    except InvalidHost:
        return host.strip()


def _reason(reason: str | Reason | None) -> str | None:
    if reason is None:
        return None
    text = str(reason)
    if text not in {r.value for r in Reason}:
        known = ", ".join(r.value for r in Reason)
        raise ValueError(f"unknown reason {text!r}; reasons are: {known}")
    return text


def format_decisions(events: Sequence[PolicyDecisionEvent]) -> str:
    """One aligned line per decision: decision, method, host:port, reason, source, protocol."""
    if not events:
        return "no decisions recorded by this test (no request reached the proxy)"
    rows = [
        (
            e.decision,
            e.method or "none",
            f"[{e.host}]:{e.port}" if ":" in e.host else f"{e.host}:{e.port}",
            f"reason={e.reason}",
            f"source={e.source}",
            f"protocol={e.protocol}",
        )
        for e in events
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [f"decisions recorded by this test ({len(events)}):"]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def format_policy(config: ProxyConfig) -> str:
    allow = ", ".join(config.allowed_patterns)
    deny = ", ".join(config.denied_patterns)
    return (
        f"policy in force: profile={config.profile}  mode={config.mode}  allow=[{allow}]  "
        f"deny=[{deny}]  allow_local_binding={str(config.allow_local_binding).lower()}"
    )


def _fail(headline: str, events: Sequence[PolicyDecisionEvent], config: ProxyConfig) -> None:
    __tracebackhide__ = True
    raise AssertionError(f"{headline}\n{format_decisions(events)}\n{format_policy(config)}")


def _matches(event: PolicyDecisionEvent, host: str, method: str | None, port: int | None) -> bool:
    return (
        event.host == host
        and (port is None or event.port == port)
        and (method is None or (event.method or "none").upper() == method.upper())
    )


def _qualifiers(method: str | None, port: int | None) -> str:
    parts = [f"method {method.upper()}"] if method else []
    if port is not None:
        parts.append(f"port {port}")
    return f" ({', '.join(parts)})" if parts else ""


def assert_allowed(
    events: Sequence[PolicyDecisionEvent],
    config: ProxyConfig,
    host: str,
    *,
    method: str | None = None,
    port: int | None = None,
) -> None:
    """At least one allow decision for `host` (and `method`/`port` when given)."""
    __tracebackhide__ = True
    name = normalize_host(host)
    if not any(e.allowed and _matches(e, name, method, port) for e in events):
        _fail(f"expected {name!r} to be allowed{_qualifiers(method, port)}", events, config)


def assert_blocked(
    events: Sequence[PolicyDecisionEvent],
    config: ProxyConfig,
    host: str,
    *,
    reason: str | Reason | None = None,
    method: str | None = None,
    port: int | None = None,
) -> Expectation:
    """At least one refusal of `host` (with `reason`, `method`, `port` when given).

    Returns the `Expectation` it satisfied (strict mode counts the block as asserted)."""
    __tracebackhide__ = True
    name, want = normalize_host(host), _reason(reason)
    for e in events:
        if not e.allowed and _matches(e, name, method, port) and want in (None, e.reason):
            return Expectation(name, want)
    with_reason = f" with reason {want!r}" if want else ""
    _fail(
        f"expected {name!r} to be blocked{with_reason}{_qualifiers(method, port)}",
        events,
        config,
    )
    raise AssertionError("unreachable")  # _fail always raises


def assert_not_contacted(
    events: Sequence[PolicyDecisionEvent], config: ProxyConfig, host: str
) -> None:
    """No allow decision for `host` (refusals are fine: nothing went out)."""
    __tracebackhide__ = True
    name = normalize_host(host)
    if any(e.allowed and e.host == name for e in events):
        _fail(f"expected {name!r} not to be contacted, but the proxy allowed it", events, config)


def assert_no_blocked(events: Sequence[PolicyDecisionEvent], config: ProxyConfig) -> None:
    """No refusal at all."""
    __tracebackhide__ = True
    refused = [e for e in events if not e.allowed]
    if refused:
        names = ", ".join(sorted({f"{e.host}:{e.port} ({e.reason})" for e in refused}))
        _fail(f"expected no blocked requests, but the proxy refused {names}", events, config)


def unexpected_blocks(
    events: Iterable[PolicyDecisionEvent], expectations: Iterable[Expectation]
) -> list[PolicyDecisionEvent]:
    """Refusals no expectation covers (strict mode)."""
    wanted = list(expectations)
    return [
        e for e in events if not e.allowed and not any(x.covers(e.host, e.reason) for x in wanted)
    ]
