"""Policy: vocabulary, pure evaluation, refusal rendering (SPEC §4)."""

from .blocked import BlockedResponse, advice, proxy_error_for, render_blocked
from .engine import LIMITED_METHODS, HostVerdict, Rules, check_answers, check_host, check_method
from .model import (
    Decision,
    NetworkDecision,
    NetworkPolicyRequest,
    Protocol,
    Reason,
    Scope,
    Source,
)

__all__ = [
    "LIMITED_METHODS",
    "BlockedResponse",
    "Decision",
    "HostVerdict",
    "NetworkDecision",
    "NetworkPolicyRequest",
    "Protocol",
    "Reason",
    "Rules",
    "Scope",
    "Source",
    "advice",
    "check_answers",
    "check_host",
    "check_method",
    "proxy_error_for",
    "render_blocked",
]
