"""THE decision path for every listener (SPEC §4.2, §4.4, §10).

evaluate → decider → method guard → resolve → audit. The evaluation is sans-IO (a generator
that yields the decider call or the lookup it needs); `decide` drives it with I/O, and
`decide_now` serves callback-driven paths when no I/O is needed. Exactly one audit event per call,
emitted here and never at call sites; handler-level refusals (mode guard, host mismatch,
MITM required) go through `refuse()`, which audits the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass

import anyio

from ..policy.engine import check_answers, check_host, check_method, deny
from ..policy.model import (
    Decision,
    NetworkDecision,
    NetworkPolicyRequest,
    Reason,
    Scope,
    Source,
)
from .context import ProxyContext

__all__ = ["DECIDER_TIMEOUT", "Check", "decide", "decide_now", "refuse"]

# A handler-level refusal consulted inside `decide` (see its `check` argument).
Check = Callable[[], NetworkDecision | None]

DECIDER_TIMEOUT = 10.0
log = logging.getLogger("netproxy.proxy")


async def decide(
    ctx: ProxyContext, request: NetworkPolicyRequest, *, check: Check | None = None
) -> NetworkDecision:
    """Evaluate `request` against the live policy; audit and return the decision.

    The returned decision's `addresses` are what the caller must dial (empty: routed).

    Args:
        check: a handler-level refusal (MITM hooks, SPEC §7.4 step 3) run after the host rules
            and the address re-check and before the limited-mode method guard; a decision it
            returns is the (one, audited) outcome.
    """
    steps = _evaluation(ctx, request, check)
    answer: object = None
    try:
        while True:
            need = steps.send(answer)
            if isinstance(need, _AskDecider):
                answer = await _ask_decider(ctx, need.request)
            else:
                answer = await ctx.resolver.resolve(need.host, need.port)
    except StopIteration as done:
        return _audited(ctx, request, *done.value)


def decide_now(
    ctx: ProxyContext, request: NetworkPolicyRequest, *, check: Check | None = None
) -> NetworkDecision | None:
    """`decide` when it needs no I/O (no decider call, no DNS); None (nothing audited) if it would.

    For callback-driven paths: the same evaluation and the same one audit event as `decide`.
    """
    steps = _evaluation(ctx, request, check)
    try:
        steps.send(None)
    except StopIteration as done:
        return _audited(ctx, request, *done.value)
    steps.close()
    return None


def _audited(
    ctx: ProxyContext, request: NetworkPolicyRequest, decision: NetworkDecision, host: str
) -> NetworkDecision:
    if host != request.host:
        request = dataclasses.replace(request, host=host)
    ctx.audit.record(request, decision, mode=str(ctx.state.rules.mode))
    return decision


def refuse(
    ctx: ProxyContext,
    request: NetworkPolicyRequest,
    reason: Reason,
    source: Source = Source.MODE_GUARD,
    scope: Scope = Scope.NON_DOMAIN,
) -> NetworkDecision:
    """Record a refusal decided outside host policy (mode guard, host mismatch, …)."""
    decision = deny(reason, source, scope)
    ctx.audit.record(request, decision, mode=str(ctx.state.rules.mode))
    return decision


@dataclass(frozen=True, slots=True)
class _AskDecider:
    request: NetworkPolicyRequest


@dataclass(frozen=True, slots=True)
class _Resolve:
    host: str
    port: int


# The evaluation's I/O needs: it yields one, and is sent the decider's decision or the addresses.
_Need = _AskDecider | _Resolve
Evaluation = Generator[_Need, object, tuple[NetworkDecision, str]]


def _evaluation(
    ctx: ProxyContext, request: NetworkPolicyRequest, check: Check | None
) -> Evaluation:
    """SPEC §4.2 for one request, sans-IO: yields what it needs, returns (decision, host)."""
    rules = ctx.state.rules
    if not rules.enabled:
        return deny(Reason.PROXY_DISABLED, Source.PROXY_STATE, Scope.NON_DOMAIN), request.host
    verdict = check_host(rules, request.host, request.port)
    host = verdict.host
    override = False
    if verdict.needs_decider and ctx.decider is not None:
        answer = yield _AskDecider(dataclasses.replace(request, host=host))
        assert isinstance(answer, NetworkDecision)
        if not answer.allowed:
            kind = Decision.ASK if answer.decision is Decision.ASK else Decision.DENY
            return NetworkDecision(
                kind, answer.reason or Reason.POLICY_DENIED, Source.DECIDER
            ), host
        verdict = check_host(rules, host, request.port, approved=True)
        override = verdict.reason is None
    if verdict.reason is not None:
        return deny(verdict.reason), host
    guard = None if check is not None else check_method(rules, request.protocol, request.method)
    if guard is not None:
        return guard, host
    addresses = verdict.addresses
    if verdict.needs_resolution:
        addresses = rules.static_hosts.get(host) or ()
        if not addresses:
            answers = yield _Resolve(host, request.port)
            addresses = answers if isinstance(answers, tuple) else ()
        reason = check_answers(rules, addresses)
        if reason is not None:
            return deny(reason), host
    if check is not None:
        guard = check() or check_method(rules, request.protocol, request.method)
        if guard is not None:
            return guard, host
    if override:
        return NetworkDecision(
            Decision.ALLOW, Reason.NOT_ALLOWED, Source.DECIDER, override=True, addresses=addresses
        ), host
    if verdict.allow is not None:  # no lookup was needed: the verdict's own allow
        return verdict.allow, host
    return NetworkDecision(
        Decision.ALLOW, Reason.ALLOW, Source.BASELINE_POLICY, addresses=addresses
    ), host


async def _ask_decider(ctx: ProxyContext, request: NetworkPolicyRequest) -> NetworkDecision:
    assert ctx.decider is not None
    try:
        with anyio.fail_after(DECIDER_TIMEOUT):
            answer = await ctx.decider(request)
    except TimeoutError:
        log.warning(
            "policy decider took longer than %ss for %s; denying", DECIDER_TIMEOUT, request.host
        )
        return NetworkDecision.deny(Reason.POLICY_DENIED)
    except Exception:
        log.exception("policy decider raised for %s; denying", request.host)
        return NetworkDecision.deny(Reason.POLICY_DENIED)
    if not isinstance(answer, NetworkDecision):
        log.warning(
            "policy decider returned %r, not a NetworkDecision; denying", type(answer).__name__
        )
        return NetworkDecision.deny(Reason.POLICY_DENIED)
    return answer
