"""Policy vocabulary (SPEC §4.1, §4.4): requests, decisions, reasons, sources, protocols.

Spec strings are defined once here; headers, bodies, events, CLI output and assertion
messages all derive from these enums.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..hosts import IPAddress

__all__ = [
    "Decision",
    "NetworkDecision",
    "NetworkPolicyRequest",
    "Protocol",
    "Reason",
    "Scope",
    "Source",
]


class Decision(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


class Source(enum.StrEnum):
    BASELINE_POLICY = "baseline_policy"
    MODE_GUARD = "mode_guard"
    PROXY_STATE = "proxy_state"
    DECIDER = "decider"


class Reason(enum.StrEnum):
    ALLOW = "allow"
    NOT_ALLOWED = "not_allowed"
    NOT_ALLOWED_LOCAL = "not_allowed_local"
    DENIED = "denied"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    MITM_REQUIRED = "mitm_required"
    MITM_HOOK_DENIED = "mitm_hook_denied"
    PROXY_DISABLED = "proxy_disabled"
    POLICY_DENIED = "policy_denied"
    UNIX_SOCKET_UNSUPPORTED = "unix_socket_unsupported"
    HOST_MISMATCH = "host_mismatch"
    INVALID_HOST = "invalid_host"


class Protocol(enum.StrEnum):
    HTTP = "http"
    HTTPS_CONNECT = "https_connect"
    HTTPS = "https"
    SOCKS5_TCP = "socks5_tcp"
    SOCKS5_UDP = "socks5_udp"
    UNIX_SOCKET = "unix_socket"


class Scope(enum.StrEnum):
    DOMAIN = "domain"
    NON_DOMAIN = "non_domain"


@dataclass(frozen=True, slots=True)
class NetworkPolicyRequest:
    """What a listener asks the policy about (also what a decider receives).

    `host` is canonical when the request reaches a decider; `client_addr` is ``"ip:port"``.
    """

    protocol: Protocol
    host: str
    port: int
    method: str | None = None
    client_addr: str | None = None
    command: str | None = None
    exec_policy_hint: str | None = None
    environment_id: str | None = None


@dataclass(frozen=True, slots=True)
class NetworkDecision:
    """The outcome of one evaluation.

    `reason` is a `Reason` for built-in outcomes and any non-empty string a decider chose.
    `addresses` are the checked addresses an allowed connection must dial (empty when the
    destination is routed or not dialled).
    """

    decision: Decision
    reason: str
    source: Source
    override: bool = False
    scope: Scope = Scope.DOMAIN
    addresses: tuple[IPAddress, ...] = field(default=(), compare=False)

    @classmethod
    def allow(cls) -> NetworkDecision:
        return cls(Decision.ALLOW, Reason.ALLOW, Source.DECIDER)

    @classmethod
    def deny(cls, reason: str = "") -> NetworkDecision:
        return cls(Decision.DENY, reason or Reason.POLICY_DENIED, Source.DECIDER)

    @classmethod
    def ask(cls, reason: str = "") -> NetworkDecision:
        return cls(Decision.ASK, reason or Reason.POLICY_DENIED, Source.DECIDER)

    @property
    def allowed(self) -> bool:
        return self.decision is Decision.ALLOW
