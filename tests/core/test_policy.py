"""Tests for `netproxy_core.policy` (SPEC §4): host rules, answers, method guard, rendering.

Rows cite the reference catalogue (codex-core §9.5, §9.6). DNS rows are driven through
`check_answers` with given answers: ``[]`` is a failed or timed-out lookup.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

import pytest

from netproxy_core.config import Access, Mode, ProxyConfig, load_config_text
from netproxy_core.hosts import IPAddress
from netproxy_core.policy import (
    LIMITED_METHODS,
    Decision,
    HostVerdict,
    NetworkDecision,
    NetworkPolicyRequest,
    Protocol,
    Reason,
    Rules,
    Scope,
    Source,
    check_answers,
    check_host,
    check_method,
    proxy_error_for,
    render_blocked,
)
from netproxy_core.policy.engine import deny, find_route

ALLOWED = "allow"


def rules(
    allow: Sequence[str] = (),
    deny: Sequence[str] = (),
    *,
    local: bool = False,
    mode: Mode = Mode.FULL,
    **config: object,
) -> Rules:
    domains = tuple((p, Access.ALLOW) for p in allow) + tuple((p, Access.DENY) for p in deny)
    return Rules.from_config(
        ProxyConfig(
            domains=domains,
            allow_local_binding=local,
            mode=mode,
            dangerously_allow_all_domains=True,
            **config,
        )  # type: ignore[arg-type]
    )


def ips(*addresses: str) -> tuple[IPAddress, ...]:
    return tuple(ipaddress.ip_address(a) for a in addresses)


def evaluate(
    r: Rules,
    host: str,
    port: int = 80,
    answers: Sequence[str] | None = None,
    *,
    approved: bool = False,
) -> str:
    """Steps 1-5 as the async driver runs them; ``answers=None`` means "must not resolve"."""
    verdict = check_host(r, host, port, approved=approved)
    if verdict.reason is not None:
        return verdict.reason
    if verdict.needs_resolution:
        assert answers is not None, f"{host} unexpectedly needs DNS"
        return check_answers(r, ips(*answers)) or ALLOWED
    return ALLOWED


# --- host evaluation: catalogue rows 56-80 ------------------------------------------------------

HOST_ROWS = [
    pytest.param(
        rules(["example.com"], ["example.com"]),
        "example.com:80",
        None,
        Reason.DENIED,
        id="row56-deny-beats-allow",
    ),
    pytest.param(
        rules(["example.com"]), "example.com", ["93.184.216.34"], ALLOWED, id="row57-allowed"
    ),
    pytest.param(
        rules(["example.com"]), "8.8.8.8", None, Reason.NOT_ALLOWED, id="row57-unlisted-ip"
    ),
    pytest.param(
        rules(["*.openai.com"]), "api.openai.com", ["104.18.33.45"], ALLOWED, id="row58-subdomain"
    ),
    pytest.param(rules(["*.openai.com"]), "openai.com", None, Reason.NOT_ALLOWED, id="row58-apex"),
    pytest.param(
        rules(["*"], ["evil.example"]), "example.com", ["93.184.216.34"], ALLOWED, id="row59-star"
    ),
    pytest.param(
        rules(["*"], ["evil.example"]),
        "api.openai.com:443",
        ["104.18.33.45"],
        ALLOWED,
        id="row59-star-with-port",
    ),
    pytest.param(
        rules(["*"], ["evil.example"]),
        "evil.example",
        None,
        Reason.DENIED,
        id="row59-deny-beats-star",
    ),
    pytest.param(
        rules(["example.com"]), "127.0.0.1", None, Reason.NOT_ALLOWED_LOCAL, id="row60-loopback"
    ),
    pytest.param(
        rules(["example.com"]), "localhost", None, Reason.NOT_ALLOWED_LOCAL, id="row60-localhost"
    ),
    pytest.param(rules(["localhost"]), "localhost", None, ALLOWED, id="row61-explicit-localhost"),
    pytest.param(
        rules(["localhost"]), "LOCALHOST.:8080", None, ALLOWED, id="row61-localhost-noise"
    ),
    pytest.param(rules(["10.0.0.1"]), "10.0.0.1", None, ALLOWED, id="row62-explicit-private"),
    pytest.param(
        rules(["example.com"]), "fe80::1%lo0", None, Reason.NOT_ALLOWED_LOCAL, id="row63-link-local"
    ),
    pytest.param(rules(["fe80::1"]), "fe80::1%lo0", None, ALLOWED, id="row64-unscoped-entry"),
    pytest.param(
        rules(["fe80::1%eth0"], local=True), "fe80::1%eth0", None, ALLOWED, id="row65-same-zone"
    ),
    pytest.param(
        rules(["fe80::1%eth0"], local=True),
        "fe80::1%eth1",
        None,
        Reason.NOT_ALLOWED,
        id="row65-other-zone",
    ),
    pytest.param(
        rules(["*"], ["fd00::1"], local=True), "fd00::1%eth0", None, Reason.DENIED, id="row66-zoned"
    ),
    pytest.param(
        rules(["*"], ["fd00::1"], local=True),
        "[fd00::1%eth0]",
        None,
        Reason.DENIED,
        id="row66-bracketed",
    ),
    pytest.param(
        rules(["*"], ["fd00::1"], local=True),
        "[fd00::1%25eth0]",
        None,
        Reason.DENIED,
        id="row66-escaped",
    ),
    pytest.param(
        rules(["*"], ["fd00::1%eth0"], local=True),
        "fd00::1%eth0",
        None,
        Reason.DENIED,
        id="row67-scoped-deny-same-zone",
    ),
    pytest.param(
        rules(["*"], ["fd00::1%eth0"], local=True),
        "fd00::1%eth1",
        None,
        ALLOWED,
        id="row67-scoped-deny-other-zone",
    ),
    pytest.param(
        rules(["example.com"]), "10.0.0.1", None, Reason.NOT_ALLOWED_LOCAL, id="row68-private"
    ),
    pytest.param(rules(), "127.0.0.1", None, Reason.NOT_ALLOWED_LOCAL, id="row69-default-config"),
    pytest.param(
        rules(["does-not-resolve.invalid"]),
        "does-not-resolve.invalid",
        [],
        Reason.NOT_ALLOWED_LOCAL,
        id="row70-dns-failure-fails-closed",
    ),
    pytest.param(
        rules(["a.example"]), "a.example", [], Reason.NOT_ALLOWED_LOCAL, id="row71-timeout-or-error"
    ),
    pytest.param(
        rules(["a.example"]),
        "a.example",
        ["127.0.0.1"],
        Reason.NOT_ALLOWED_LOCAL,
        id="row71-resolves-loopback",
    ),
    pytest.param(rules(["a.example"]), "a.example", ["8.8.8.8"], ALLOWED, id="row71-public"),
    pytest.param(
        rules(["a.example"]),
        "a.example",
        ["8.8.8.8", "10.0.0.1"],
        Reason.NOT_ALLOWED_LOCAL,
        id="mixed-answers-refused",
    ),
    pytest.param(
        rules(["a.example"]),
        "a.example",
        ["::ffff:127.0.0.1"],
        Reason.NOT_ALLOWED_LOCAL,
        id="answer-mapped-loopback",
    ),
    pytest.param(
        rules(["a.example"]),
        "a.example",
        ["2606:4700::1111", "8.8.8.8"],
        ALLOWED,
        id="answers-all-public",
    ),
    pytest.param(
        rules(["a.example"], local=True),
        "a.example",
        ["10.0.0.1"],
        ALLOWED,
        id="local-binding-skips-answer-check",
    ),
    pytest.param(
        rules(["a.example"], local=True),
        "a.example",
        [],
        Reason.NOT_ALLOWED_LOCAL,
        id="local-binding-still-fails-closed",
    ),
    pytest.param(
        rules(["a.example"], ["10.0.0.0/8"]),
        "a.example",
        ["10.1.2.3"],
        Reason.DENIED,
        id="deny-cidr-on-answers",
    ),
    pytest.param(
        rules(["a.example"], ["10.0.0.0/8"], local=True),
        "a.example",
        ["8.8.8.8", "10.1.2.3"],
        Reason.DENIED,
        id="deny-cidr-on-any-answer",
    ),
    pytest.param(
        rules(["a.example"], ["10.0.0.0/8"], local=True),
        "a.example",
        ["::ffff:10.1.2.3"],
        Reason.DENIED,
        id="deny-cidr-on-mapped-answer",
    ),
    pytest.param(
        rules(["a.example"], ["10.0.0.1"], local=True),
        "a.example",
        ["10.0.0.1"],
        ALLOWED,
        id="exact-ip-deny-does-not-judge-answers",
    ),
    pytest.param(
        rules(["10.0.0.1"]),
        "a.example",
        None,
        Reason.NOT_ALLOWED,
        id="names-never-allowed-by-address",
    ),
    pytest.param(
        rules(["allowed.example"]),
        "payload.unapproved.example:443",
        None,
        Reason.NOT_ALLOWED,
        id="row72-unlisted-never-resolved",
    ),
    pytest.param(
        rules(),
        "payload.unapproved.example:443",
        None,
        Reason.NOT_ALLOWED,
        id="row72-empty-allowlist",
    ),
    pytest.param(
        rules(["example.com"]), "127.0.0.1", None, Reason.NOT_ALLOWED_LOCAL, id="row77-loopback"
    ),
    pytest.param(
        rules(["example.com"], ["blocked.com"]),
        "blocked.com",
        None,
        Reason.DENIED,
        id="row78-denied",
    ),
    pytest.param(rules(["*"]), "8.8.8.8", None, ALLOWED, id="row80-star-public-ip"),
    pytest.param(
        rules(["*"]), "127.0.0.1", None, Reason.NOT_ALLOWED_LOCAL, id="row80-star-is-not-explicit"
    ),
    pytest.param(rules(), "8.8.8.8", None, Reason.NOT_ALLOWED, id="row80-no-allowlist-public"),
    pytest.param(
        rules(), "127.0.0.1", None, Reason.NOT_ALLOWED_LOCAL, id="row80-no-allowlist-local"
    ),
    # §4.2 step 1: invalid hosts
    pytest.param(rules(["*"]), "", None, Reason.INVALID_HOST, id="invalid-empty"),
    pytest.param(rules(["*"]), "a b.example", None, Reason.INVALID_HOST, id="invalid-space"),
    pytest.param(
        rules(["*"]), "allowed.com@evil.com", None, Reason.INVALID_HOST, id="invalid-userinfo"
    ),
    pytest.param(rules(["*"]), "example.com..", None, Reason.INVALID_HOST, id="invalid-two-dots"),
    # §4.2 step 3: local literals, every spelling (bypass list 1-7)
    pytest.param(rules(["*"]), "2130706433", None, Reason.NOT_ALLOWED_LOCAL, id="decimal-ipv4"),
    pytest.param(rules(["*"]), "0x7f.1", None, Reason.NOT_ALLOWED_LOCAL, id="mixed-ipv4"),
    pytest.param(rules(["*"]), "0177.0.0.1", None, Reason.NOT_ALLOWED_LOCAL, id="octal-ipv4"),
    pytest.param(
        rules(["*"]), "[::ffff:127.0.0.1]", None, Reason.NOT_ALLOWED_LOCAL, id="mapped-loopback"
    ),
    pytest.param(
        rules(["*"]),
        "[::ffff:169.254.169.254]:80",
        None,
        Reason.NOT_ALLOWED_LOCAL,
        id="mapped-metadata",
    ),
    pytest.param(
        rules(["*"]), "64:ff9b::7f00:1", None, Reason.NOT_ALLOWED_LOCAL, id="nat64-loopback"
    ),
    pytest.param(rules(["*"]), "0.0.0.0", None, Reason.NOT_ALLOWED_LOCAL, id="zero-address"),
    pytest.param(rules(["*"]), "::", None, Reason.NOT_ALLOWED_LOCAL, id="v6-unspecified"),
    pytest.param(
        rules(["*"]), "169.254.169.254.", None, Reason.NOT_ALLOWED_LOCAL, id="metadata-trailing-dot"
    ),
    pytest.param(rules(["*"]), "100.64.0.1", None, Reason.NOT_ALLOWED_LOCAL, id="cgnat"),
    pytest.param(
        rules(["*.localhost"]),
        "app.localhost",
        None,
        Reason.NOT_ALLOWED_LOCAL,
        id="star-localhost-is-a-wildcard",
    ),
    pytest.param(
        rules(["app.localhost"]), "app.localhost", None, ALLOWED, id="exact-star-localhost-name"
    ),
    pytest.param(
        rules(["127.0.0.1"]), "2130706433", None, ALLOWED, id="explicit-entry-any-spelling"
    ),
    pytest.param(
        rules(["127.0.0.*"]), "127.0.0.1", None, Reason.NOT_ALLOWED_LOCAL, id="glob-is-not-explicit"
    ),
    pytest.param(rules(["10.0.0.0/8"]), "10.20.30.40", None, ALLOWED, id="cidr-is-explicit"),
    pytest.param(
        rules(["10.0.0.0/8"]),
        "[::ffff:10.20.30.40]",
        None,
        ALLOWED,
        id="cidr-is-explicit-for-mapped",
    ),
    pytest.param(
        rules(["10.0.0.0/8"]), "192.168.1.1", None, Reason.NOT_ALLOWED_LOCAL, id="cidr-outside"
    ),
    pytest.param(
        rules(["10.0.0.0/8"], ["10.0.0.5"]),
        "10.0.0.5",
        None,
        Reason.DENIED,
        id="deny-beats-cidr-allow",
    ),
    pytest.param(
        rules(["*"], ["10.0.0.0/8"], local=True),
        "10.9.9.9",
        None,
        Reason.DENIED,
        id="deny-cidr-on-literal",
    ),
    pytest.param(
        rules(["*"], ["8.8.8.8"]),
        "[::ffff:8.8.8.8]",
        None,
        Reason.DENIED,
        id="deny-ip-mapped-spelling",
    ),
    pytest.param(
        rules(["*"], ["8.8.8.8"]),
        "64:ff9b::808:808",
        None,
        Reason.DENIED,
        id="deny-ip-nat64-spelling",
    ),
    pytest.param(
        rules(["*"], ["8.8.8.8"]), "134744072", None, Reason.DENIED, id="deny-ip-decimal-spelling"
    ),
    pytest.param(
        rules(["*"], local=True), "localhost", None, ALLOWED, id="local-binding-star-localhost"
    ),
    pytest.param(
        rules(["example.com"], local=True),
        "localhost",
        None,
        Reason.NOT_ALLOWED,
        id="local-binding-still-needs-allow",
    ),
    pytest.param(
        rules(["**.example.com"], ["evil.example.com"]),
        "EVIL.example.com.",
        None,
        Reason.DENIED,
        id="deny-after-canonicalisation",
    ),
    pytest.param(
        rules(["*.bücher.example"]),
        "www.xn--bcher-kva.example",
        ["8.8.8.8"],
        ALLOWED,
        id="idna-pattern-matches-a-label-host",
    ),
    pytest.param(
        rules(["*.allowed.com"]),
        "[::ffff:1.2.3.4%25x.allowed.com]",
        None,
        Reason.NOT_ALLOWED,
        id="zone-is-not-a-name",
    ),
]


@pytest.mark.parametrize(("r", "host", "answers", "expected"), HOST_ROWS)
def test_host_evaluation(r: Rules, host: str, answers: list[str] | None, expected: str) -> None:
    assert evaluate(r, host, answers=answers) == expected


VERDICTS = [
    pytest.param(
        rules(["a.example"]),
        "A.example:443",
        443,
        HostVerdict("a.example", needs_resolution=True),
        id="allowed-name-resolves",
    ),
    pytest.param(
        rules(),
        "a.example",
        80,
        HostVerdict("a.example", reason=Reason.NOT_ALLOWED, needs_decider=True),
        id="unlisted-asks-decider",
    ),
    pytest.param(
        rules(["*"], ["a.example"]),
        "a.example",
        80,
        HostVerdict("a.example", reason=Reason.DENIED),
        id="denied-no-decider",
    ),
    pytest.param(
        rules(),
        "127.0.0.1",
        80,
        HostVerdict("127.0.0.1", reason=Reason.NOT_ALLOWED_LOCAL),
        id="local-no-decider",
    ),
    pytest.param(
        rules(["*"]),
        "a b",
        80,
        HostVerdict("a b", reason=Reason.INVALID_HOST),
        id="invalid-keeps-raw-host",
    ),
    pytest.param(
        rules(["localhost"]),
        "localhost",
        80,
        HostVerdict("localhost", addresses=ips("127.0.0.1", "::1")),
        id="localhost-is-never-looked-up",
    ),
    pytest.param(
        rules(["8.8.8.8"]),
        "8.8.8.8",
        53,
        HostVerdict("8.8.8.8", addresses=ips("8.8.8.8")),
        id="ip-literal-dials-itself",
    ),
    pytest.param(
        rules(["fe80::1"]),
        "[fe80::1%25eth0]",
        80,
        HostVerdict("fe80::1%eth0", addresses=ips("fe80::1%eth0")),
        id="zoned-literal-keeps-zone-to-dial",
    ),
]


@pytest.mark.parametrize(("r", "host", "port", "expected"), VERDICTS)
def test_host_verdicts(r: Rules, host: str, port: int, expected: HostVerdict) -> None:
    verdict = check_host(r, host, port)
    assert verdict == expected
    assert [
        a.scope_id if isinstance(a, ipaddress.IPv6Address) else None for a in verdict.addresses
    ] == [a.scope_id if isinstance(a, ipaddress.IPv6Address) else None for a in expected.addresses]


# --- decider-approved path (rows 73-76, 79) -----------------------------------------------------

APPROVED = [
    pytest.param(rules(), "example.com:80", ["93.184.216.34"], ALLOWED, id="row74-approved"),
    pytest.param(
        rules(),
        "approved.example",
        ["10.0.0.1"],
        Reason.NOT_ALLOWED_LOCAL,
        id="row73-approved-resolves-private",
    ),
    pytest.param(
        rules(),
        "does-not-resolve.invalid",
        [],
        Reason.NOT_ALLOWED_LOCAL,
        id="row75-approved-dns-failure",
    ),
    pytest.param(rules(), "8.8.8.8", None, ALLOWED, id="row75-approved-public-ip"),
    pytest.param(
        rules(),
        "127.0.0.1",
        None,
        Reason.NOT_ALLOWED_LOCAL,
        id="approved-local-literal-still-refused",
    ),
    pytest.param(
        rules(["*"], ["evil.example"]),
        "evil.example",
        None,
        Reason.DENIED,
        id="approved-deny-still-wins",
    ),
    pytest.param(
        rules(deny=["10.0.0.0/8"], local=True),
        "a.example",
        ["10.0.0.1"],
        Reason.DENIED,
        id="approved-deny-cidr-on-answers",
    ),
]


@pytest.mark.parametrize(("r", "host", "answers", "expected"), APPROVED)
def test_decider_approval_keeps_deny_and_local_rules(
    r: Rules, host: str, answers: list[str] | None, expected: str
) -> None:
    assert evaluate(r, host, answers=answers, approved=True) == expected


DECISIONS = [
    pytest.param(NetworkDecision.allow(), Decision.ALLOW, Reason.ALLOW, id="allow"),
    pytest.param(NetworkDecision.deny("nope"), Decision.DENY, "nope", id="deny-reason"),
    pytest.param(NetworkDecision.deny(""), Decision.DENY, Reason.POLICY_DENIED, id="deny-empty"),
    pytest.param(NetworkDecision.deny(), Decision.DENY, Reason.POLICY_DENIED, id="deny-default"),
    pytest.param(
        NetworkDecision.ask("not_allowed"), Decision.ASK, Reason.NOT_ALLOWED, id="row79-ask"
    ),
    pytest.param(NetworkDecision.ask(), Decision.ASK, Reason.POLICY_DENIED, id="ask-default"),
]


@pytest.mark.parametrize(("decision", "kind", "reason"), DECISIONS)
def test_decision_constructors(decision: NetworkDecision, kind: Decision, reason: str) -> None:
    assert decision.decision is kind
    assert decision.reason == reason
    assert decision.source is Source.DECIDER
    assert decision.allowed is (kind is Decision.ALLOW)
    assert decision.override is False


def test_request_carries_the_decider_fields() -> None:
    request = NetworkPolicyRequest(
        Protocol.HTTPS_CONNECT,
        "example.com",
        443,
        method="CONNECT",
        client_addr="127.0.0.1:1234",
        environment_id="remote",
    )
    assert (request.protocol, request.host, request.port) == ("https_connect", "example.com", 443)
    assert request.command is None and request.exec_policy_hint is None


def test_baseline_deny_helper() -> None:
    decision = deny(Reason.DENIED)
    assert (decision.decision, decision.reason, decision.source, decision.scope) == (
        Decision.DENY,
        Reason.DENIED,
        Source.BASELINE_POLICY,
        Scope.DOMAIN,
    )


# --- limited mode (rows 54-55; SPEC §4.5) --------------------------------------------------------

METHODS = [
    pytest.param(Mode.FULL, Protocol.HTTP, "GET", True, id="row54-full-get"),
    pytest.param(Mode.FULL, Protocol.HTTP, "POST", True, id="row54-full-post"),
    pytest.param(Mode.FULL, Protocol.HTTP, "CONNECT", True, id="row54-full-connect"),
    pytest.param(Mode.FULL, Protocol.HTTPS, "DELETE", True, id="full-inner-delete"),
    pytest.param(Mode.LIMITED, Protocol.HTTP, "GET", True, id="row55-limited-get"),
    pytest.param(Mode.LIMITED, Protocol.HTTP, "HEAD", True, id="row55-limited-head"),
    pytest.param(Mode.LIMITED, Protocol.HTTP, "OPTIONS", True, id="row55-limited-options"),
    pytest.param(Mode.LIMITED, Protocol.HTTP, "POST", False, id="row55-limited-post"),
    pytest.param(Mode.LIMITED, Protocol.HTTP, "CONNECT", False, id="row55-limited-connect"),
    pytest.param(Mode.LIMITED, Protocol.HTTP, "PUT", False, id="limited-put"),
    pytest.param(Mode.LIMITED, Protocol.HTTP, "get", False, id="limited-case-sensitive"),
    pytest.param(Mode.LIMITED, Protocol.HTTP, "GET ", False, id="limited-exact-token"),
    pytest.param(Mode.LIMITED, Protocol.HTTP, None, False, id="limited-no-method"),
    pytest.param(Mode.LIMITED, Protocol.HTTPS, "GET", True, id="limited-inner-get"),
    pytest.param(Mode.LIMITED, Protocol.HTTPS, "PATCH", False, id="limited-inner-patch"),
    pytest.param(Mode.LIMITED, Protocol.UNIX_SOCKET, "POST", False, id="limited-unix-socket-post"),
]


@pytest.mark.parametrize(("mode", "protocol", "method", "allowed"), METHODS)
def test_method_guard(mode: Mode, protocol: Protocol, method: str | None, allowed: bool) -> None:
    result = check_method(rules(["*"], mode=mode), protocol, method)
    if allowed:
        assert result is None
    else:
        assert result == NetworkDecision(
            Decision.DENY, Reason.METHOD_NOT_ALLOWED, Source.MODE_GUARD, scope=Scope.NON_DOMAIN
        )


def test_limited_methods_are_exactly_the_spec_list() -> None:
    assert frozenset({"GET", "HEAD", "OPTIONS"}) == LIMITED_METHODS


def test_host_policy_comes_before_the_method() -> None:
    r = rules(["a.example"], mode=Mode.LIMITED)
    assert check_host(r, "b.example", 80).reason is Reason.NOT_ALLOWED, "POST to unlisted host"


# --- Rules.from_config: routes and static hosts ------------------------------------------------

ROUTED_CONFIG = """
[permissions.ws.network]
allow_local_binding = false
[permissions.ws.network.domains]
"api.example.test" = "allow"
"plain.example.test" = "allow"
"denied.example.test" = "deny"
[permissions.ws.network.routes]
"API.example.test:443" = "127.0.0.1:8443"
"plain.example.test" = "[::1]:8080"
"denied.example.test" = "127.0.0.1:9"
"unlisted.example.test" = "127.0.0.1:9"
[permissions.ws.network.hosts]
"static.example.test" = ["10.0.0.1", "8.8.8.8"]
"""


@pytest.fixture(scope="module")
def routed() -> Rules:
    return Rules.from_config(load_config_text(ROUTED_CONFIG, "ws"))


ROUTES = [
    pytest.param("api.example.test", 443, ("127.0.0.1", 8443), id="host-and-port"),
    pytest.param("api.example.test", 80, None, id="other-port-not-routed"),
    pytest.param("plain.example.test", 80, ("::1", 8080), id="bare-host-any-port"),
    pytest.param("plain.example.test", 443, ("::1", 8080), id="bare-host-other-port"),
    pytest.param("other.example.test", 443, None, id="not-routed"),
]


@pytest.mark.parametrize(("host", "port", "expected"), ROUTES)
def test_find_route(routed: Rules, host: str, port: int, expected: tuple[str, int] | None) -> None:
    assert find_route(routed, host, port) == expected


ROUTED_VERDICTS = [
    pytest.param(
        "API.Example.Test:443", 443, HostVerdict("api.example.test"), id="routed-skips-resolution"
    ),
    pytest.param(
        "plain.example.test",
        80,
        HostVerdict("plain.example.test"),
        id="routed-to-loopback-is-trusted",
    ),
    pytest.param(
        "api.example.test",
        80,
        HostVerdict("api.example.test", needs_resolution=True),
        id="unrouted-port-resolves",
    ),
    pytest.param(
        "denied.example.test",
        80,
        HostVerdict("denied.example.test", reason=Reason.DENIED),
        id="routed-still-denied",
    ),
    pytest.param(
        "unlisted.example.test",
        80,
        HostVerdict("unlisted.example.test", reason=Reason.NOT_ALLOWED, needs_decider=True),
        id="routes-do-not-allow",
    ),
]


@pytest.mark.parametrize(("host", "port", "expected"), ROUTED_VERDICTS)
def test_routed_destinations(routed: Rules, host: str, port: int, expected: HostVerdict) -> None:
    assert check_host(routed, host, port) == expected


def test_static_hosts_are_checked_like_dns(routed: Rules) -> None:
    answers = routed.static_hosts["static.example.test"]
    assert answers == ips("10.0.0.1", "8.8.8.8")
    assert check_answers(routed, answers) is Reason.NOT_ALLOWED_LOCAL, "static answers are checked"
    public = Rules.from_config(ProxyConfig(hosts=(("pub.test", ("8.8.8.8",)),)))
    assert check_answers(public, public.static_hosts["pub.test"]) is None


def test_rules_from_config_keeps_mode_and_flags() -> None:
    r = Rules.from_config(ProxyConfig(mode=Mode.LIMITED, enabled=False, allow_local_binding=True))
    assert (r.mode, r.enabled, r.allow_local_binding) == (Mode.LIMITED, False, True)
    assert not r.allow and not r.deny


def test_plain_string_access_still_denies() -> None:
    config = ProxyConfig(
        domains=(("*", "allow"), ("evil.example", "deny")),  # type: ignore[arg-type]
        dangerously_allow_all_domains=True,
    )
    assert evaluate(Rules.from_config(config), "evil.example") == Reason.DENIED


# --- blocked responses (SPEC §4.6) ----------------------------------------------------------------

RENDER = [
    pytest.param(Reason.NOT_ALLOWED, "blocked-by-allowlist", id="not-allowed"),
    pytest.param(Reason.NOT_ALLOWED_LOCAL, "blocked-by-allowlist", id="not-allowed-local"),
    pytest.param(Reason.DENIED, "blocked-by-denylist", id="denied"),
    pytest.param(Reason.METHOD_NOT_ALLOWED, "blocked-by-method-policy", id="method"),
    pytest.param(Reason.MITM_REQUIRED, "blocked-by-mitm-required", id="mitm-required"),
    pytest.param(Reason.MITM_HOOK_DENIED, "blocked-by-mitm-hook", id="mitm-hook"),
    pytest.param(Reason.POLICY_DENIED, "blocked-by-policy", id="policy-denied"),
    pytest.param(Reason.UNIX_SOCKET_UNSUPPORTED, "blocked-by-policy", id="unix-socket"),
    pytest.param(Reason.HOST_MISMATCH, "blocked-by-policy", id="host-mismatch"),
    pytest.param(Reason.INVALID_HOST, "blocked-by-policy", id="invalid-host"),
    pytest.param("decider said no", "blocked-by-policy", id="decider-reason"),
]


@pytest.mark.parametrize(("reason", "header"), RENDER)
def test_render_blocked_json(reason: str, header: str) -> None:
    decision = NetworkDecision(Decision.DENY, reason, Source.BASELINE_POLICY)
    response = render_blocked(
        decision, host="api.example.com", port=443, protocol="https", method="POST"
    )
    assert response.status == 403
    headers = dict(response.headers)
    assert headers["x-proxy-error"] == header
    assert headers["content-type"] == "application/json"
    body = json.loads(response.body)
    assert set(body) == {
        "status",
        "host",
        "reason",
        "decision",
        "source",
        "protocol",
        "port",
        "message",
    }
    assert body["status"] == "blocked"
    assert body["host"] == "api.example.com"
    assert body["reason"] == str(reason)
    assert body["decision"] == "deny"
    assert body["source"] == "baseline_policy"
    assert body["protocol"] == "https"
    assert body["port"] == 443
    assert "api.example.com" in body["message"], "the sentence names the host"
    assert body["message"].endswith(".") and "\n" not in body["message"]
    assert proxy_error_for(reason) == header


@pytest.mark.parametrize(("reason", "header"), RENDER)
def test_render_blocked_connect_text(reason: str, header: str) -> None:
    decision = NetworkDecision(Decision.DENY, reason, Source.BASELINE_POLICY)
    response = render_blocked(
        decision, host="api.example.com", port=443, protocol="https_connect", text=True
    )
    assert response.status == 403
    headers = dict(response.headers)
    assert headers["x-proxy-error"] == header
    assert headers["content-type"].startswith("text/plain")
    text = response.body.decode()
    assert "api.example.com" in text
    assert text.count("\n") == 1 and text.endswith("\n"), "one sentence"


@pytest.mark.parametrize("text", [False, True], ids=["json", "text"])
def test_render_proxy_disabled(text: bool) -> None:
    decision = NetworkDecision(Decision.DENY, Reason.PROXY_DISABLED, Source.PROXY_STATE)
    response = render_blocked(decision, host="a.example", port=80, protocol="http", text=text)
    assert response.status == 503
    assert "x-proxy-error" not in dict(response.headers)
    assert b"disabled" in response.body


def test_render_ask_and_decider_fields() -> None:
    decision = NetworkDecision.ask("needs review")
    body = json.loads(render_blocked(decision, host="a.example", port=80, protocol="http").body)
    assert (body["decision"], body["source"], body["reason"]) == ("ask", "decider", "needs review")


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        pytest.param(Reason.NOT_ALLOWED, "allow", id="not-allowed-says-allow"),
        pytest.param(Reason.NOT_ALLOWED_LOCAL, "allow_local_binding", id="local-says-flag"),
        pytest.param(Reason.DENIED, "deny entry", id="denied-says-deny-entry"),
        pytest.param(Reason.METHOD_NOT_ALLOWED, "GET, HEAD and OPTIONS", id="method-lists"),
        pytest.param(Reason.MITM_REQUIRED, "mitm.enabled", id="mitm-says-key"),
        pytest.param(Reason.MITM_HOOK_DENIED, "hook", id="hook"),
    ],
)
def test_message_says_what_to_change(reason: Reason, words: str) -> None:
    decision = NetworkDecision(Decision.DENY, reason, Source.BASELINE_POLICY)
    body = json.loads(
        render_blocked(decision, host="a.example", port=80, protocol="http", method="POST").body
    )
    assert words in body["message"]


def test_invalid_host_message_escapes_control_characters() -> None:
    decision = NetworkDecision(Decision.DENY, Reason.INVALID_HOST, Source.BASELINE_POLICY)
    response = render_blocked(
        decision, host="a\r\nx-injected: 1", port=80, protocol="http", text=True
    )
    assert b"\r\nx-injected" not in response.body


def test_hooked_hosts_and_route_keys_are_canonical_even_in_code_built_configs() -> None:
    from netproxy_core.config.model import MitmConfig, MitmHook

    hook = MitmHook(
        name="h", host="API.GitHub.com.", methods=("GET",), path_prefixes=("/",), action=("a",)
    )
    config = ProxyConfig(
        mitm=MitmConfig(hooks=(hook,)), routes=(("API.Example.TEST:443", "127.0.0.1:9"),)
    )
    rules = Rules.from_config(config)
    assert rules.is_hooked("api.github.com") and not rules.is_hooked("github.com")
    assert find_route(rules, "api.example.test", 443) == ("127.0.0.1", 9)
    assert find_route(rules, "api.example.test", 80) is None
