"""Tests for `netproxy_core.patterns` (SPEC §3.2): grammar, matching, rejection, linear time.

Rows 8-48 are the reference catalogue (codex-core §9.2, §9.3) adapted to the SPEC: hosts and
patterns go through IDNA (so `É.com` matches `é.com`, a combining accent is composed first,
and an emoji is not a valid host), and CIDR entries exist.
"""

from __future__ import annotations

import ipaddress
import os
import pickle
import re
import time

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from netproxy_core.errors import ConfigError, InvalidHost
from netproxy_core.hosts import canonicalize_host
from netproxy_core.patterns import (
    Pattern,
    PatternKind,
    PatternSet,
    compile_pattern,
    is_global_wildcard,
)

settings.register_profile("ci", max_examples=300, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=50_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def matches(pattern: str, host: str) -> bool:
    """Compile one entry and match it against a host as a listener would see it."""
    return PatternSet([compile_pattern(pattern)]).matches(canonicalize_host(host))


# --- matching: catalogue rows 8-40 -------------------------------------------------------------

MATCH = [
    pytest.param("Example.COM.", "example.com", True, id="row8-exact-case-dot"),
    pytest.param("Example.COM.", "api.example.com", False, id="row8-exact-not-subdomain"),
    pytest.param("*.Example.COM.", "api.example.com", True, id="row9-subdomain"),
    pytest.param("*.Example.COM.", "example.com", False, id="row9-not-apex"),
    pytest.param("*.example.com", "a.b.c.example.com", True, id="subdomain-any-depth"),
    pytest.param("region*.v2.argotunnel.com", "region1.v2.argotunnel.com", True, id="row10"),
    pytest.param(
        "region*.v2.argotunnel.com", "region.v2.argotunnel.com", True, id="row11-star-empty"
    ),
    pytest.param("region*.v2.argotunnel.com", "xregion1.v2.argotunnel.com", False, id="row12"),
    pytest.param("region*.v2.argotunnel.com", "foo.region1.v2.argotunnel.com", False, id="row13"),
    pytest.param(
        "region*.v2.argotunnel.com", "regionA.B.v2.argotunnel.com", True, id="star-crosses-dots"
    ),
    pytest.param("**.Example.COM.", "example.com", True, id="row14-apex"),
    pytest.param("**.Example.COM.", "api.example.com", True, id="row14-subdomain"),
    pytest.param("[::1]", "::1", True, id="row15-bracketed-v6"),
    pytest.param("[fe80::1%25lo0]", "fe80::1%lo0", True, id="row16-scoped-same-zone"),
    pytest.param("[fe80::1%25lo0]", "fe80::1%lo1", False, id="row16-scoped-other-zone"),
    pytest.param("[fe80::1%25lo0]", "fe80::1", False, id="row16-scoped-vs-unscoped"),
    pytest.param("fe80::1", "fe80::1%lo0", True, id="unscoped-matches-any-zone"),
    pytest.param("[::1]:443", "::1", True, id="bracketed-port-equals-address"),
    pytest.param("ExAmPle.CoM", "example.com", True, id="row17-lower"),
    pytest.param("ExAmPle.CoM", "EXAMPLE.COM", True, id="row17-upper"),
    pytest.param("*.openai.com", "api.openai.com", True, id="row18-subdomain"),
    pytest.param("*.openai.com", "openai.com", False, id="row18-not-apex"),
    pytest.param("*.openai.com", "evilopenai.com", False, id="row18-no-substring"),
    pytest.param("**.openai.com", "openai.com", True, id="row19-apex"),
    pytest.param("**.openai.com", "api.openai.com", True, id="row19-subdomain"),
    pytest.param("**.openai.com", "evilopenai.com", False, id="row19-no-substring"),
    pytest.param("openai.com", "openai.com.evil.io", False, id="exact-no-prefix-match"),
    pytest.param("*", "example.com", True, id="row20-star-name"),
    pytest.param("*", "api.openai.com", True, id="row20-star-subdomain"),
    pytest.param("*", "localhost", True, id="row20-star-localhost"),
    pytest.param("*", "::1", True, id="star-v6"),
    pytest.param("api?.example.com", "api1.example.com", True, id="row22"),
    pytest.param("api?.example.com", "api.example.com", False, id="row23"),
    pytest.param("api?.example.com", "api12.example.com", False, id="row24"),
    pytest.param("api??.example.com", "api12.example.com", True, id="row25-two"),
    pytest.param("api??.example.com", "api1.example.com", False, id="row25-one"),
    pytest.param("api*?.example.com", "api.example.com", False, id="row26-needs-one"),
    pytest.param("api*?.example.com", "api1.example.com", True, id="row26-one"),
    pytest.param("api*?.example.com", "api123.example.com", True, id="row26-many"),
    pytest.param("api?example.com", "api.example.com", True, id="row27-question-matches-dot"),
    pytest.param("*.api?.example.com", "api1.example.com", False, id="row28-not-apex"),
    pytest.param("*.api?.example.com", "www.api1.example.com", True, id="row28-sub"),
    pytest.param("*.api?.example.com", "nested.www.api1.example.com", True, id="row28-nested"),
    pytest.param("*.api?.example.com", "www.api12.example.com", False, id="row28-two-chars"),
    pytest.param("**.api?.example.com", "api1.example.com", True, id="row29-apex"),
    pytest.param("**.api?.example.com", "www.api1.example.com", True, id="row29-sub"),
    pytest.param("**.api?.example.com", "nested.www.api1.example.com", True, id="row29-nested"),
    pytest.param("**.api?.example.com", "api12.example.com", False, id="row30-apex-two-chars"),
    pytest.param("**.api?.example.com", "www.api12.example.com", False, id="row30-sub-two-chars"),
    pytest.param(" API?.EXAMPLE.COM. ", "API1.EXAMPLE.COM.", True, id="row31-noise"),
    pytest.param("api?.com", "apié.com", True, id="row32-question-matches-u-label-char"),
    pytest.param("api??.com", "apié.com", False, id="row33"),
    pytest.param("api?.com", "apie\u0301.com", True, id="row34-combining-mark-composed"),
    pytest.param("api??.com", "apie\u0301.com", False, id="row34-composed-is-one-char"),
    pytest.param("*.例?.com", "a.例子.com", True, id="row35-sub"),
    pytest.param("*.例?.com", "例子.com", False, id="row35-not-apex"),
    pytest.param("**.例?.com", "例子.com", True, id="row36-apex"),
    pytest.param("É.com", "é.com", True, id="row37-idna-case-folds"),
    pytest.param("É.COM", "É.com", True, id="row37-same-case"),
    # SPEC §3.1/§3.2: patterns are canonicalised like hosts
    pytest.param("*.bücher.example", "www.xn--bcher-kva.example", True, id="u-label-pattern"),
    pytest.param("*.xn--bcher-kva.example", "www.bücher.example", True, id="a-label-pattern"),
    pytest.param("bücher.example", "xn--bcher-kva.example", True, id="u-label-exact"),
    pytest.param("b?cher.example", "bücher.example", True, id="glob-question-vs-u-label"),
    pytest.param("b?cher.example", "xn--bcher-kva.example", True, id="glob-question-vs-a-label"),
    pytest.param("*cher.example", "bücher.example", True, id="glob-star-vs-u-label"),
    pytest.param("xn--bcher-*.example", "bücher.example", True, id="glob-vs-a-label"),
    pytest.param("*.example\u3002com", "a.example.com", True, id="full-width-dot-pattern"),
    pytest.param("*.example.com:443", "a.example.com", True, id="pattern-port-ignored"),
    pytest.param("2130706433", "127.0.0.1", True, id="inet-aton-pattern"),
    pytest.param("127.0.0.1", "0x7f.1", True, id="inet-aton-host"),
    pytest.param("*.*", "a.b", True, id="star-dot-star-two-labels"),
    pytest.param("*.*", "localhost", False, id="star-dot-star-is-not-global"),
    pytest.param("10.0.0.*", "10.0.0.7", True, id="ipv4-glob-is-text"),
    # SPEC §3.2: CIDR entries match IP literals only
    pytest.param("10.0.0.0/8", "10.1.2.3", True, id="cidr-v4"),
    pytest.param("10.0.0.0/8", "0xa.1", True, id="cidr-inet-aton-host"),
    pytest.param("10.0.0.0/8", "11.0.0.1", False, id="cidr-v4-outside"),
    pytest.param("10.0.0.0/8", "ten.example", False, id="cidr-never-matches-a-name"),
    pytest.param("10.0.0.0/8", "fd00::1", False, id="cidr-v4-vs-v6"),
    pytest.param("10.0.0.0/8", "[::ffff:10.0.0.1]", True, id="cidr-v4-vs-mapped"),
    pytest.param("10.0.0.0/8", "64:ff9b::a00:1", True, id="cidr-v4-vs-nat64"),
    pytest.param("fd00::/8", "fd12::1", True, id="cidr-v6"),
    pytest.param("fd00::/8", "fd12::1%eth0", True, id="cidr-v6-zoned-host"),
    pytest.param("10.0.0.1", "[::ffff:10.0.0.1]", True, id="exact-v4-vs-mapped"),
    pytest.param("8.8.8.8", "64:ff9b::808:808", True, id="exact-v4-vs-nat64"),
    pytest.param("8.8.8.8", "2002:808:808::", False, id="exact-v4-vs-6to4-is-another-host"),
    # bypass list 12: a zone is never part of a name
    pytest.param("*.allowed.com", "[::ffff:1.2.3.4%25x.allowed.com]", False, id="zone-not-a-name"),
    pytest.param("**.allowed.com", "[::1%25allowed.com]", False, id="zone-not-an-apex"),
    pytest.param("*allowed.com", "[::1%25x.allowed.com]", False, id="zone-not-a-glob"),
]


@pytest.mark.parametrize(("pattern", "host", "expected"), MATCH)
def test_pattern_matches(pattern: str, host: str, expected: bool) -> None:
    assert matches(pattern, host) is expected


def test_row32_emoji_is_not_a_valid_host() -> None:
    with pytest.raises(InvalidHost):
        canonicalize_host("api😀.com")


def test_row38_raw_matcher_edges() -> None:
    with pytest.raises(ConfigError):
        compile_pattern("")
    assert compile_pattern("*").matches("")
    assert not compile_pattern("?").matches("")
    assert compile_pattern("?").matches("a")


def test_row39_empty_set_matches_nothing() -> None:
    empty = PatternSet()
    assert not empty
    assert not empty.matches("host")
    assert not empty.names_exactly("127.0.0.1")
    assert not empty.covers_address(ipaddress.ip_address("10.0.0.1"))


def test_row21_duplicates_are_harmless() -> None:
    patterns = PatternSet([compile_pattern("example.com"), compile_pattern("example.com")])
    assert patterns.matches(canonicalize_host("EXAMPLE.COM"))
    assert not patterns.matches("not-example.com")


LINEAR = [
    pytest.param("*" + "a" * 1024 + "b", id="row40-star-then-literal"),
    pytest.param("*a" * 1024 + "b", id="row40-many-stars"),
    pytest.param("*" + "a?" * 512 + "b*", id="question-marks-in-middle-segment"),
    pytest.param("*" + "?a" * 512 + "b*", id="leading-question-mark-segment"),
    pytest.param("?*" * 1000 + "b", id="alternating"),
    pytest.param(("*" + "a?" * 20) * 20 + "b", id="many-question-segments"),
]


@pytest.mark.parametrize("pattern", LINEAR)
def test_row40_matching_is_linear(pattern: str) -> None:
    compiled = compile_pattern(pattern)
    start = time.perf_counter()
    for _ in range(5):
        assert not compiled.matches("a" * 4096)
    assert time.perf_counter() - start < 0.5


# --- compilation: rows 41-48 and the §3.2 rejection list -----------------------------------------

GLOBAL = [
    pytest.param("*", id="star"),
    pytest.param("[*]", id="bracketed-star"),
    pytest.param("[*]:443", id="bracketed-star-port"),
    pytest.param("[*.]", id="bracketed-star-dot"),
    pytest.param("[*].", id="bracketed-star-then-dot"),
    pytest.param("**.*", id="apex-star"),
    pytest.param("**.[*]", id="apex-bracketed-star"),
    pytest.param(" * ", id="star-with-spaces"),
    pytest.param("*:443", id="star-port"),
    pytest.param("**.*:443", id="apex-star-port"),
    pytest.param("**.*.", id="apex-star-trailing-dot"),
]


@pytest.mark.parametrize("entry", GLOBAL)
def test_global_wildcard_forms(entry: str) -> None:
    compiled = compile_pattern(entry)
    assert compiled.kind is PatternKind.GLOBAL
    assert compiled.canonical == "*"
    assert compiled.matches("anything.example")
    assert not compiled.names_exactly, "a global wildcard never counts as explicit"


@pytest.mark.parametrize("entry", ["[*]", "[*]:443", "*", "**.*"])
def test_is_global_wildcard(entry: str) -> None:
    assert is_global_wildcard(entry)


@pytest.mark.parametrize("entry", ["*.*", "*.example.com", "?*", "a*"])
def test_not_global(entry: str) -> None:
    assert compile_pattern(entry).kind is not PatternKind.GLOBAL


REJECTED = [
    # row 44
    pytest.param("", id="empty"),
    pytest.param(" ", id="blank"),
    pytest.param("*.", id="star-dot"),
    pytest.param("**.", id="double-star-dot"),
    pytest.param("**", id="double-star"),
    pytest.param("a**b.com", id="double-star-inside"),
    pytest.param("*.**.com", id="double-star-after-prefix"),
    pytest.param("***.a", id="triple-star"),
    pytest.param("[ab].com", id="bracket-class-leading"),
    pytest.param("a[bc].com", id="bracket-class-inside"),
    pytest.param("{a,b}.com", id="braces"),
    pytest.param("a\\*.com", id="backslash"),
    pytest.param("a/b.com", id="slash"),
    pytest.param("a b.com", id="space"),
    pytest.param("a\tb.com", id="tab"),
    pytest.param("[::1]suffix", id="junk-after-bracket"),
    pytest.param("[fe80::1%abc[def]", id="nested-bracket"),
    pytest.param("[::1]:443[ab]", id="bracket-after-port"),
    pytest.param("example.com:{a,b}", id="braces-in-port"),
    # row 47, 48
    pytest.param("api[12].com", id="row47-char-class"),
    pytest.param("[", id="row48-lone-bracket"),
    pytest.param("]", id="lone-closing-bracket"),
    # brackets around anything but an IPv6 literal
    pytest.param("[1.2.3.4]", id="bracketed-ipv4"),
    pytest.param("[example.com]", id="bracketed-name"),
    pytest.param("*.[::1]", id="prefix-on-bracketed"),
    # other bad entries
    pytest.param("a..b.com", id="empty-label"),
    pytest.param(".a.com", id="leading-dot"),
    pytest.param("*..a", id="empty-label-after-prefix"),
    pytest.param("a@b.com", id="at-sign"),
    pytest.param("a%b.com", id="percent"),
    pytest.param("a\x00b.com", id="nul"),
    pytest.param("example.com:x", id="bad-port"),
    pytest.param("a" * 64 + ".com", id="label-too-long"),
    pytest.param("xn--zz.com", id="bad-a-label"),
    pytest.param("*.10.0.0.1", id="prefix-on-ipv4"),
    pytest.param("**.127.0.0.1", id="apex-prefix-on-ipv4"),
    pytest.param("10.0.0.0/33", id="cidr-prefix-too-long"),
    pytest.param("a/8", id="cidr-of-a-name"),
    pytest.param("10.0.0.0/8/8", id="cidr-twice"),
    pytest.param("a:b:c", id="not-ipv6"),
]


@pytest.mark.parametrize("entry", REJECTED)
def test_rejected_entries(entry: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_pattern(entry)
    assert repr(entry) in str(info.value), "the error names the entry"
    assert info.value.key == entry


ACCEPTED = [
    # row 45
    pytest.param("[::1]", PatternKind.EXACT, "::1", id="row45-bracketed"),
    pytest.param("[::1]:443", PatternKind.EXACT, "::1", id="row45-bracketed-port"),
    pytest.param("[fe80::1%25en0]:443", PatternKind.EXACT, "fe80::1%en0", id="row45-zone"),
    pytest.param("region*.com", PatternKind.GLOB, "region*.com", id="row45-glob"),
    pytest.param("**.api?.com", PatternKind.GLOB, "**.api?.com", id="row45-apex-glob"),
    # every kind
    pytest.param("Example.COM.", PatternKind.EXACT, "example.com", id="exact"),
    pytest.param("*.Example.com", PatternKind.SUBDOMAINS, "*.example.com", id="subdomains"),
    pytest.param("**.Example.com", PatternKind.APEX_AND_SUBDOMAINS, "**.example.com", id="apex"),
    pytest.param(
        "*.bücher.example", PatternKind.SUBDOMAINS, "*.xn--bcher-kva.example", id="subdomains-idna"
    ),
    pytest.param("10.1.2.3/16", PatternKind.CIDR, "10.1.0.0/16", id="cidr-host-bits"),
    pytest.param("fd00::/8", PatternKind.CIDR, "fd00::/8", id="cidr-v6"),
    pytest.param("0x7f.1", PatternKind.EXACT, "127.0.0.1", id="inet-aton"),
    pytest.param("2001:DB8::1", PatternKind.EXACT, "2001:db8::1", id="bare-v6"),
    pytest.param("fe80::1%eth0", PatternKind.EXACT, "fe80::1%eth0", id="bare-v6-zone"),
    pytest.param("localhost", PatternKind.EXACT, "localhost", id="localhost"),
]


@pytest.mark.parametrize(("entry", "kind", "canonical"), ACCEPTED)
def test_accepted_entries(entry: str, kind: PatternKind, canonical: str) -> None:
    compiled = compile_pattern(entry)
    assert compiled.kind is kind
    assert compiled.canonical == canonical
    assert compiled.text == entry


EQUIVALENT = [
    # row 46: bracketed and plain spellings compile alike
    pytest.param("[*]", "*", id="bracketed-star"),
    pytest.param("[*]:443", "*", id="bracketed-star-port"),
    pytest.param("[*.]", "*", id="bracketed-star-dot"),
    pytest.param("[*].", "*", id="bracketed-star-then-dot"),
    pytest.param("[::1]:443", "::1", id="bracketed-port"),
    pytest.param("[::1.]", "::1", id="bracketed-inner-dot"),
    pytest.param("[::1].", "::1", id="bracketed-outer-dot"),
    pytest.param("[fe80::1%25en0]:443", "fe80::1%en0", id="bracketed-zone"),
    pytest.param("  [::1]  ", "::1", id="spaces"),
    pytest.param("*.EXAMPLE.com.", "*.example.com", id="prefix-case-dot"),
    pytest.param("**.bücher.example", "**.xn--bcher-kva.example", id="u-vs-a-label"),
]


@pytest.mark.parametrize(("left", "right"), EQUIVALENT)
def test_row46_equivalent_spellings(left: str, right: str) -> None:
    a, b = compile_pattern(left), compile_pattern(right)
    assert (a.kind, a.canonical, a.zone) == (b.kind, b.canonical, b.zone)


def test_names_exactly_marks_explicit_entries() -> None:
    assert compile_pattern("10.0.0.1").names_exactly
    assert compile_pattern("10.0.0.0/8").names_exactly
    assert compile_pattern("localhost").names_exactly
    assert not compile_pattern("*.localhost").names_exactly
    assert not compile_pattern("10.0.0.*").names_exactly


# --- PatternSet ---------------------------------------------------------------------------------

SET_EXPLICIT = [
    pytest.param(["localhost"], "localhost", True, id="exact-localhost"),
    pytest.param(["10.0.0.1"], "10.0.0.1", True, id="exact-ip"),
    pytest.param(["fe80::1"], "fe80::1%lo0", True, id="unscoped-entry-any-zone"),
    pytest.param(["fe80::1%eth0"], "fe80::1%eth1", False, id="scoped-entry-other-zone"),
    pytest.param(["[::1]"], "::1", True, id="bracketed"),
    pytest.param(["10.0.0.0/8"], "10.9.9.9", True, id="cidr"),
    pytest.param(["10.0.0.1"], "::ffff:a00:1", True, id="mapped-spelling"),
    pytest.param(["*"], "127.0.0.1", False, id="star-is-not-explicit"),
    pytest.param(["*.local.test"], "a.local.test", False, id="wildcard-is-not-explicit"),
    pytest.param(["127.0.0.*"], "127.0.0.1", False, id="glob-is-not-explicit"),
    pytest.param(["**.localhost"], "localhost", False, id="apex-is-not-explicit"),
]


@pytest.mark.parametrize(("entries", "host", "expected"), SET_EXPLICIT)
def test_pattern_set_names_exactly(entries: list[str], host: str, expected: bool) -> None:
    patterns = PatternSet(compile_pattern(e) for e in entries)
    assert patterns.names_exactly(host) is expected


def test_pattern_set_covers_address() -> None:
    patterns = PatternSet(
        [compile_pattern("10.0.0.0/8"), compile_pattern("10.0.0.1"), compile_pattern("fd00::/8")]
    )
    assert patterns.covers_address(ipaddress.ip_address("10.2.3.4"))
    assert patterns.covers_address(ipaddress.ip_address("::ffff:10.2.3.4"))
    assert patterns.covers_address(ipaddress.ip_address("fd00::5"))
    assert not patterns.covers_address(ipaddress.ip_address("11.0.0.1"))
    only_exact = PatternSet([compile_pattern("10.0.0.1")])
    assert not only_exact.covers_address(ipaddress.ip_address("10.0.0.1")), "CIDR entries only"


def test_pattern_set_repr_and_mixed_kinds() -> None:
    patterns = PatternSet(
        compile_pattern(e)
        for e in ["Example.com", "*.b.test", "**.c.test", "d?.test", "10.0.0.0/8"]
    )
    assert (
        repr(patterns) == "PatternSet(['example.com', '*.b.test', '**.c.test', 'd?.test', "
        "'10.0.0.0/8'])"
    )
    for host in ["example.com", "x.b.test", "c.test", "x.c.test", "d1.test", "10.0.0.1"]:
        assert patterns.matches(host), host
    for host in ["b.test", "d12.test", "11.0.0.1", "example.org"]:
        assert not patterns.matches(host), host


def test_pattern_is_picklable_value() -> None:
    compiled = compile_pattern("**.api?.example.com")
    clone = pickle.loads(pickle.dumps(compiled))
    assert clone == compiled
    assert clone.matches("www.api1.example.com")


def test_config_error_pickles() -> None:
    with pytest.raises(ConfigError) as info:
        compile_pattern("a b")
    clone = pickle.loads(pickle.dumps(info.value))
    assert (clone.args, clone.key, clone.file) == (info.value.args, "a b", None)


# --- property: the glob matcher agrees with a slow reference -----------------------------------


def _reference(pattern: str, host: str) -> bool:
    """fnmatch semantics over the whole name; `**.x` = `x` or `*.x`; one trailing dot dropped."""
    pattern = pattern.removesuffix(".")

    def glob(p: str) -> bool:
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in p)
        return re.fullmatch(regex, host, re.DOTALL) is not None

    if pattern.startswith("**."):
        return glob(pattern[3:]) or glob("*." + pattern[3:])
    return glob(pattern)


_HOSTS = st.lists(st.text(alphabet="ab", min_size=1, max_size=3), min_size=1, max_size=4).map(
    ".".join
)


@given(st.text(alphabet="ab.*?", min_size=1, max_size=12), _HOSTS)
@example("*a?", "ba.a")
@example("**.a?", "ab")
@example("a*?b*a", "aab.ba")
def test_glob_matcher_agrees_with_reference(pattern: str, host: str) -> None:
    try:
        compiled = compile_pattern(pattern)
    except ConfigError:
        return  # not a pattern (empty label, `**` inside, ...): nothing to compare
    assert compiled.matches(host) is _reference(pattern, host), (compiled, host)


@given(st.text(alphabet="ab*?", min_size=1, max_size=8), st.text(alphabet="ab", max_size=40))
def test_glob_segments_agree_with_reference(pattern: str, host: str) -> None:
    assume("**" not in pattern)
    compiled = compile_pattern(pattern)
    assert compiled.matches(host) is _reference(pattern, host)


@given(st.text(max_size=30))
def test_compile_pattern_only_raises_config_error(entry: str) -> None:
    try:
        compiled = compile_pattern(entry)
    except ConfigError:
        return
    assert isinstance(compiled, Pattern)
    compiled.matches("example.com")
