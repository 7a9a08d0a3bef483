"""Policy: vocabulary, pure evaluation, refusal rendering (SPEC §4).

Names load on first use (PEP 562): importing `policy.model` alone stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
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

_LAZY: dict[str, str] = {
    "BlockedResponse": "blocked",
    "advice": "blocked",
    "proxy_error_for": "blocked",
    "render_blocked": "blocked",
    "LIMITED_METHODS": "engine",
    "HostVerdict": "engine",
    "Rules": "engine",
    "check_answers": "engine",
    "check_host": "engine",
    "check_method": "engine",
    "Decision": "model",
    "NetworkDecision": "model",
    "NetworkPolicyRequest": "model",
    "Protocol": "model",
    "Reason": "model",
    "Scope": "model",
    "Source": "model",
}

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


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)
