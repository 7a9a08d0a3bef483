"""Pure host-policy evaluation in the exact SPEC §4.2 order. No I/O.

The async driver (`handlers/decide.py`) asks this module what to do next and supplies the
decider's answer and DNS answers; every rule lives here so it can be tested as a table.

Order: invalid host → deny entry → local literal (exact allow only) → allowlist / decider →
resolution checks (fail closed, mixed answers refused, deny CIDR on answers).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from ..config.model import Mode, ProxyConfig
from ..errors import InvalidHost
from ..hosts import (
    IPAddress,
    canonicalize_host,
    format_host_port,
    is_local_literal,
    is_public_ip,
    parse_ip,
    split_host_port,
)
from ..patterns import PatternSet, compile_pattern
from .model import Decision, NetworkDecision, Protocol, Reason, Scope, Source

__all__ = [
    "LIMITED_METHODS",
    "HostVerdict",
    "Rules",
    "check_answers",
    "check_host",
    "check_method",
    "deny",
    "find_route",
]

LIMITED_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_LOCALHOST: Final = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))
# Protocols whose requests carry a method the limited-mode guard judges.
_METHOD_CHECKED: Final = frozenset({Protocol.HTTP, Protocol.HTTPS, Protocol.UNIX_SOCKET})


@dataclass(frozen=True, slots=True)
class Rules:
    """A configuration compiled for evaluation; rebuilt whenever the config changes."""

    enabled: bool
    mode: Mode
    allow_local_binding: bool
    allow: PatternSet
    deny: PatternSet
    static_hosts: Mapping[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    routes: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    hooked_hosts: frozenset[str] = frozenset()
    # `check_host` verdicts for these rules (pure, so cached; a change builds new Rules).
    verdicts: dict[tuple[str, int, bool], HostVerdict] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def from_config(cls, config: ProxyConfig) -> Rules:
        routes: dict[str, tuple[str, int]] = {}
        for target, dest in config.routes:
            host, _, port = dest.rpartition(":")
            routes[_route_key(target)] = (host.strip("[]"), int(port))
        return cls(
            enabled=config.enabled,
            mode=config.mode,
            allow_local_binding=config.allow_local_binding,
            allow=PatternSet(compile_pattern(p) for p in config.allowed_patterns),
            deny=PatternSet(compile_pattern(p) for p in config.denied_patterns),
            static_hosts={
                name: tuple(ipaddress.ip_address(ip) for ip in ips) for name, ips in config.hosts
            },
            routes=routes,
            hooked_hosts=frozenset(_canonical_or_lower(h.host) for h in config.mitm.hooks),
        )

    def is_hooked(self, host: str) -> bool:
        """The canonical host has MITM hooks (SPEC §7.5: always intercepted)."""
        return host in self.hooked_hosts


def _canonical_or_lower(host: str) -> str:
    try:
        return canonicalize_host(host)
    except InvalidHost:
        return host.strip().lower()


def _route_key(target: str) -> str:
    """`routes` keys in canonical form, also for a `ProxyConfig` built in code."""
    try:
        host, port = split_host_port(target)
        canonical = canonicalize_host(host)
    except InvalidHost:
        return target
    return canonical if port is None else format_host_port(canonical, port)


@dataclass(frozen=True, slots=True)
class HostVerdict:
    """Result of the static host rules (steps 1–4).

    Exactly one of: `reason` set (blocked); `needs_decider` (not allowlisted, a decider may
    approve); `needs_resolution` (allowed name: resolve and `check_answers`); or allowed with
    the literal `addresses` to dial (empty for routed destinations).
    """

    host: str
    reason: Reason | None = None
    needs_decider: bool = False
    needs_resolution: bool = False
    addresses: tuple[IPAddress, ...] = ()
    # The baseline allow for these `addresses` when nothing is left to check (no lookup, no
    # decider): made once per cached verdict instead of once per request.
    allow: NetworkDecision | None = field(default=None, compare=False)


def deny(
    reason: Reason, source: Source = Source.BASELINE_POLICY, scope: Scope = Scope.DOMAIN
) -> NetworkDecision:
    return NetworkDecision(Decision.DENY, reason, source, scope=scope)


def find_route(rules: Rules, host: str, port: int) -> tuple[str, int] | None:
    """The `routes` target for ``host:port`` (exact port entry first, then the bare host)."""
    if not rules.routes:
        return None
    return rules.routes.get(format_host_port(host, port)) or rules.routes.get(host)


_VERDICT_CACHE_SIZE: Final = 4096


def check_host(rules: Rules, raw_host: str, port: int, *, approved: bool = False) -> HostVerdict:
    """Steps 1–4 of SPEC §4.2 for one destination.

    The verdict is a pure function of the rules and its arguments, so it is remembered per
    `Rules` (every request is still judged by the rules in force; a change makes new Rules).

    Args:
        raw_host: the host as received; canonicalised here (step 1).
        approved: a decider allowed it; deny and local rules still apply.
    """
    key = (raw_host, port, approved)
    verdict = rules.verdicts.get(key)
    if verdict is None:
        verdict = _check_host(rules, raw_host, port, approved)
        if len(rules.verdicts) >= _VERDICT_CACHE_SIZE:
            rules.verdicts.clear()
        rules.verdicts[key] = verdict
    return verdict


def _check_host(rules: Rules, raw_host: str, port: int, approved: bool) -> HostVerdict:
    try:
        host = canonicalize_host(raw_host)
    except InvalidHost:
        return HostVerdict(raw_host, reason=Reason.INVALID_HOST)
    if rules.deny.matches(host):
        return HostVerdict(host, reason=Reason.DENIED)
    routed = find_route(rules, host, port) is not None
    if not rules.allow_local_binding and is_local_literal(host):
        if not rules.allow.names_exactly(host):
            return HostVerdict(host, reason=Reason.NOT_ALLOWED_LOCAL)
        addresses = () if routed else _literal_addresses(host)
        return HostVerdict(host, addresses=addresses, allow=_baseline_allow(addresses))
    if not (approved or rules.allow.matches(host)):
        return HostVerdict(host, reason=Reason.NOT_ALLOWED, needs_decider=True)
    if routed:
        return HostVerdict(host, allow=_baseline_allow(()))
    literal = _literal_addresses(host)
    if literal:
        return HostVerdict(host, addresses=literal, allow=_baseline_allow(literal))
    return HostVerdict(host, needs_resolution=True)


def _baseline_allow(addresses: tuple[IPAddress, ...]) -> NetworkDecision:
    return NetworkDecision(
        Decision.ALLOW, Reason.ALLOW, Source.BASELINE_POLICY, addresses=addresses
    )


def _literal_addresses(host: str) -> tuple[IPAddress, ...]:
    if host == "localhost" or host.endswith(".localhost"):
        return _LOCALHOST
    ip = parse_ip(host)
    if ip is not None and "%" in host:  # keep the zone: a link-local address needs it to dial
        ip = ipaddress.IPv6Address(host)
    return (ip,) if ip is not None else ()


def check_answers(rules: Rules, answers: Sequence[IPAddress]) -> Reason | None:
    """Step 5: judge what an allowed name resolved to (empty = lookup failed)."""
    if not answers:
        return Reason.NOT_ALLOWED_LOCAL
    if any(rules.deny.covers_address(a) for a in answers):
        return Reason.DENIED
    if not rules.allow_local_binding and not all(is_public_ip(a) for a in answers):
        return Reason.NOT_ALLOWED_LOCAL
    return None


def check_method(rules: Rules, protocol: Protocol, method: str | None) -> NetworkDecision | None:
    """The limited-mode guard (SPEC §4.5), applied after the host rules passed."""
    if rules.mode is not Mode.LIMITED or protocol not in _METHOD_CHECKED:
        return None
    if method in LIMITED_METHODS:
        return None
    return deny(Reason.METHOD_NOT_ALLOWED, Source.MODE_GUARD, Scope.NON_DOMAIN)
