"""Tests for `netproxy_core.hosts`: the canonicaliser (SPEC §3.1) and public-address rules (§4.3).

Rows cite the reference catalogue (codex-core §9.1, §9.4) and the bypass list (ecosystem §5)
where they come from; where the reference and the SPEC disagree, the SPEC wins (IDNA A-labels,
inet_aton IPv4 forms, site-local/documentation ranges not public).
"""

from __future__ import annotations

import ipaddress
import os
import pickle

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from netproxy_core.errors import InvalidHost
from netproxy_core.hosts import (
    canonicalize_host,
    embedded_ipv4,
    format_host_port,
    is_local_literal,
    is_public_ip,
    parse_ip,
    split_host_port,
    strip_zone,
    to_unicode,
)

settings.register_profile("ci", max_examples=300, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=50_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# --- canonicalize_host: accepted forms --------------------------------------------------------

CANONICAL = [
    # 1. trimming, case, trailing dot, ports, brackets (catalogue rows 1-7)
    pytest.param("  ExAmPlE.CoM  ", "example.com", id="row1-trim-and-case"),
    pytest.param("EXAMPLE.COM", "example.com", id="upper-case"),
    pytest.param("example.com:1234", "example.com", id="row2-port-dropped"),
    pytest.param("2001:db8::1", "2001:db8::1", id="row3-bare-v6-unchanged"),
    pytest.param("example.com.", "example.com", id="row4-trailing-dot"),
    pytest.param("ExAmPlE.CoM.", "example.com", id="row4-trailing-dot-and-case"),
    pytest.param("example.com.:443", "example.com", id="row5-trailing-dot-and-port"),
    pytest.param("localhost.", "localhost", id="localhost-trailing-dot"),
    pytest.param("LOCALHOST", "localhost", id="localhost-upper"),
    pytest.param("[::1]", "::1", id="row6-bracketed-v6"),
    pytest.param("[::1]:443", "::1", id="row6-bracketed-v6-port"),
    pytest.param("[::1]:0", "::1", id="bracketed-v6-port-zero"),
    pytest.param("example.com:65535", "example.com", id="max-port"),
    pytest.param("2001:DB8:0:0:0:0:0:1", "2001:db8::1", id="v6-compressed-lowercase"),
    pytest.param("2001:db8::0:1", "2001:db8::1", id="v6-zero-group-compressed"),
    pytest.param("::FFFF:1.2.3.4", "::ffff:102:304", id="v6-mapped-canonical-hex"),
    pytest.param("::1:443", "::1:443", id="unbracketed-v6-with-colons-is-an-address"),
    # IPv6 zones (row 7)
    pytest.param("fe80::1%lo0", "fe80::1%lo0", id="row7-zone"),
    pytest.param("[fe80::1%lo0]", "fe80::1%lo0", id="row7-bracketed-zone"),
    pytest.param("[fe80::1%25lo0]", "fe80::1%lo0", id="row7-url-escaped-zone"),
    pytest.param("fe80::1%25lo0", "fe80::1%lo0", id="bare-url-escaped-zone"),
    pytest.param("[fe80::1%25eth0]:443", "fe80::1%eth0", id="escaped-zone-with-port"),
    pytest.param("FE80::1%eth0", "fe80::1%eth0", id="zone-address-lowercased"),
    pytest.param("fe80::1%25", "fe80::1%25", id="zone-named-25-is-not-an-escape"),
    pytest.param("fe80::1%eth0.100", "fe80::1%eth0.100", id="vlan-zone-with-dot"),
    # bypass list 12: the zone stays part of an address; patterns never see it as a name
    pytest.param(
        "[::ffff:1.2.3.4%25x.allowed.com]",
        "::ffff:102:304%x.allowed.com",
        id="zone-that-looks-like-a-name",
    ),
    # 3. IPv4 in every inet_aton form (bypass list 1, 2)
    pytest.param("127.0.0.1", "127.0.0.1", id="dotted-quad"),
    pytest.param("2130706433", "127.0.0.1", id="inet-aton-decimal"),
    pytest.param("0x7f000001", "127.0.0.1", id="inet-aton-hex"),
    pytest.param("0X7F000001", "127.0.0.1", id="inet-aton-hex-upper"),
    pytest.param("0177.0.0.1", "127.0.0.1", id="inet-aton-octal"),
    pytest.param("127.1", "127.0.0.1", id="inet-aton-two-parts"),
    pytest.param("127.0.1", "127.0.0.1", id="inet-aton-three-parts"),
    pytest.param("0x7f.1", "127.0.0.1", id="inet-aton-mixed-hex"),
    pytest.param("0x7f.0.0.0x1", "127.0.0.1", id="inet-aton-hex-octets"),
    pytest.param("010.0.0.1", "8.0.0.1", id="leading-zero-is-octal"),
    pytest.param("0", "0.0.0.0", id="inet-aton-zero"),
    pytest.param("4294967295", "255.255.255.255", id="inet-aton-max"),
    pytest.param("1.16777215", "1.255.255.255", id="inet-aton-two-part-max"),
    pytest.param("1.2.65535", "1.2.255.255", id="inet-aton-three-part-max"),
    pytest.param("2130706433:8080", "127.0.0.1", id="inet-aton-with-port"),
    pytest.param("127.0.0.1.", "127.0.0.1", id="ipv4-trailing-dot"),
    pytest.param("１２７.０.０.１", "127.0.0.1", id="full-width-digits-ipv4"),
    # 4. IDNA / UTS-46
    pytest.param("bücher.example", "xn--bcher-kva.example", id="idna-u-label"),
    pytest.param("BÜCHER.example", "xn--bcher-kva.example", id="idna-u-label-upper"),
    pytest.param("xn--bcher-kva.example", "xn--bcher-kva.example", id="idna-a-label-kept"),
    pytest.param("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example", id="idna-a-label-lowercased"),
    pytest.param("bücher.example.", "xn--bcher-kva.example", id="idna-trailing-dot"),
    pytest.param("例子.com", "xn--fsqu00a.com", id="idna-cjk"),
    pytest.param("example\uff0ecom", "example.com", id="full-width-full-stop"),
    pytest.param("example\u3002com", "example.com", id="ideographic-full-stop"),
    pytest.param("example\uff61com", "example.com", id="halfwidth-ideographic-full-stop"),
    pytest.param("example.com\u3002", "example.com", id="full-width-trailing-dot"),
    pytest.param("ｅｘａｍｐｌｅ.ｃｏｍ", "example.com", id="full-width-letters"),
    pytest.param("api\u00e9.com", "xn--api-dma.com", id="idna-precomposed"),
    pytest.param("apie\u0301.com", "xn--api-dma.com", id="combining-mark-normalised-nfc"),
    pytest.param("_srv.example.com", "_srv.example.com", id="underscore-label"),
    pytest.param("123.example", "123.example", id="numeric-first-label-is-a-name"),
    pytest.param("1e5", "1e5", id="not-a-number"),
    # 2. length limits: exactly at the limit is fine
    pytest.param("a" * 63 + ".com", "a" * 63 + ".com", id="label-63-octets"),
    pytest.param(
        ".".join(["a" * 63] * 3 + ["a" * 61]),
        ".".join(["a" * 63] * 3 + ["a" * 61]),
        id="name-253-octets",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), CANONICAL)
def test_canonicalize_host(raw: str, expected: str) -> None:
    assert canonicalize_host(raw) == expected
    assert canonicalize_host(expected) == expected, "canonical form must be a fixed point"


# --- canonicalize_host: rejected forms -----------------------------------------------------------

INVALID = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="only-whitespace"),
    pytest.param(".", id="only-dot"),
    pytest.param("example.com..", id="two-trailing-dots"),
    pytest.param("localhost..", id="localhost-two-trailing-dots"),
    pytest.param("127.0.0.1..", id="ipv4-two-trailing-dots"),
    pytest.param("example.com\u3002\u3002", id="two-full-width-trailing-dots"),
    pytest.param("a..b", id="empty-label-inside"),
    pytest.param(".example.com", id="leading-dot"),
    pytest.param("a@b.com", id="at-sign"),
    pytest.param("allowed.com@evil.com", id="userinfo"),
    pytest.param("a/b", id="slash"),
    pytest.param("allowed.com%2f@evil", id="percent-encoding"),
    pytest.param("a%b.com", id="percent"),
    pytest.param("a\\b.com", id="backslash"),
    pytest.param("a b.com", id="space-inside"),
    pytest.param("a\tb.com", id="tab-inside"),
    pytest.param("a\x00b.com", id="nul"),
    pytest.param("evil.com\x00.allowed.com", id="nul-smuggling"),
    pytest.param("a\x1fb.com", id="control-char"),
    pytest.param("a\x7fb.com", id="del"),
    pytest.param("a\u3000b.com", id="ideographic-space"),
    pytest.param("a" * 64 + ".com", id="label-64-octets"),
    pytest.param(".".join(["a" * 63] * 3 + ["a" * 62]), id="name-254-octets"),
    pytest.param("ü" * 60 + ".example", id="a-label-too-long"),
    pytest.param("xn--zz.example", id="bad-a-label"),
    pytest.param("api😀.com", id="idna-disallowed-emoji"),
    pytest.param("*.example.com", id="wildcard-is-not-a-host"),
    pytest.param("256.0.0.1", id="ipv4-octet-over-255"),
    pytest.param("1.2.3.4.5", id="ipv4-five-parts"),
    pytest.param("4294967296", id="inet-aton-over-32-bits"),
    pytest.param("0x100000000", id="inet-aton-hex-over-32-bits"),
    pytest.param("1.16777216", id="inet-aton-two-part-overflow"),
    pytest.param("1.2.65536", id="inet-aton-three-part-overflow"),
    pytest.param("08.0.0.1", id="bad-octal-digit"),
    pytest.param("foo.123", id="ends-in-a-number"),
    pytest.param("example.com:99999", id="port-out-of-range"),
    pytest.param("example.com:http", id="port-not-digits"),
    pytest.param("example.com:", id="port-empty"),
    pytest.param("[::1", id="unclosed-bracket"),
    pytest.param("[::1]x", id="junk-after-bracket"),
    pytest.param("[::1]:", id="bracket-empty-port"),
    pytest.param("[]", id="empty-brackets"),
    pytest.param("[example.com]", id="bracketed-name"),
    pytest.param("[1.2.3.4]:80", id="bracketed-ipv4"),
    pytest.param("a:b:c", id="not-an-ipv6"),
    pytest.param("fe80::1%", id="empty-zone"),
    pytest.param("fe80::1%a b", id="zone-with-space"),
    pytest.param("fe80::1%eth0/1", id="zone-with-slash"),
    pytest.param("fe80::1%2525x", id="doubly-escaped-zone"),
]


@pytest.mark.parametrize("raw", INVALID)
def test_canonicalize_host_rejects(raw: str) -> None:
    with pytest.raises(InvalidHost) as info:
        canonicalize_host(raw)
    assert info.value.host == raw
    assert repr(raw) in str(info.value), "the message names the offending host"


def test_invalid_host_pickles() -> None:
    with pytest.raises(InvalidHost) as info:
        canonicalize_host("a b")
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is InvalidHost
    assert clone.args == info.value.args
    assert clone.host == "a b"


# --- helpers ----------------------------------------------------------------------------------

SPLIT = [
    pytest.param("example.com", ("example.com", None), id="bare"),
    pytest.param("example.com:443", ("example.com", 443), id="host-port"),
    pytest.param("[::1]", ("::1", None), id="bracketed"),
    pytest.param("[::1]:8080", ("::1", 8080), id="bracketed-port"),
    pytest.param("2001:db8::1", ("2001:db8::1", None), id="bare-v6"),
    pytest.param("  a:1  ", ("a", 1), id="trimmed"),
]


@pytest.mark.parametrize(("text", "expected"), SPLIT)
def test_split_host_port(text: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", ["a:65536", "a:-1", "a:1x", "[::1]:", "[::1]1", "a:１"])
def test_split_host_port_rejects(text: str) -> None:
    with pytest.raises(InvalidHost):
        split_host_port(text)


PARSE_IP = [
    pytest.param("127.0.0.1", ipaddress.IPv4Address("127.0.0.1"), id="v4"),
    pytest.param("::1", ipaddress.IPv6Address("::1"), id="v6"),
    pytest.param("fe80::1%eth0", ipaddress.IPv6Address("fe80::1"), id="v6-zone-dropped"),
    pytest.param("example.com", None, id="name"),
    pytest.param("1e5", None, id="name-ending-in-digit"),
    pytest.param("a.b.c.4", None, id="name-ending-in-digit-label"),
]


@pytest.mark.parametrize(("host", "expected"), PARSE_IP)
def test_parse_ip(host: str, expected: object) -> None:
    assert parse_ip(host) == expected


def test_strip_zone_and_format_host_port() -> None:
    assert strip_zone("fe80::1%eth0") == "fe80::1"
    assert strip_zone("example.com") == "example.com"
    assert format_host_port("example.com", 443) == "example.com:443"
    assert format_host_port("::1", 443) == "[::1]:443"
    assert format_host_port("127.0.0.1", 80) == "127.0.0.1:80"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        pytest.param("xn--bcher-kva.example", "bücher.example", id="a-label"),
        pytest.param("example.com", "example.com", id="ascii"),
        pytest.param("xn--zz.example", "xn--zz.example", id="undecodable-kept"),
    ],
)
def test_to_unicode(host: str, expected: str) -> None:
    assert to_unicode(host) == expected


# --- is_public_ip (SPEC §4.3; catalogue rows 49-52; bypass list 3-6) ---------------------------

NOT_PUBLIC = [
    # IPv4 (row 49 and §4.3)
    pytest.param("127.0.0.1", id="loopback"),
    pytest.param("127.255.255.254", id="loopback-range"),
    pytest.param("10.0.0.1", id="rfc1918-10"),
    pytest.param("172.16.0.1", id="rfc1918-172-low"),
    pytest.param("172.31.255.255", id="rfc1918-172-high"),
    pytest.param("192.168.0.1", id="rfc1918-192"),
    pytest.param("169.254.169.254", id="link-local-metadata"),
    pytest.param("0.0.0.0", id="unspecified"),
    pytest.param("0.1.2.3", id="this-network"),
    pytest.param("100.64.0.1", id="cgnat-low"),
    pytest.param("100.127.255.255", id="cgnat-high"),
    pytest.param("192.0.0.1", id="ietf-protocol-assignments"),
    pytest.param("192.0.2.1", id="test-net-1"),
    pytest.param("198.51.100.1", id="test-net-2"),
    pytest.param("203.0.113.1", id="test-net-3"),
    pytest.param("198.18.0.1", id="benchmark-low"),
    pytest.param("198.19.255.255", id="benchmark-high"),
    pytest.param("192.88.99.1", id="6to4-relay-anycast"),
    pytest.param("224.0.0.1", id="multicast-low"),
    pytest.param("239.255.255.250", id="multicast-ssdp"),
    pytest.param("240.0.0.1", id="reserved"),
    pytest.param("255.255.255.255", id="broadcast"),
    # IPv6 (row 52 and §4.3)
    pytest.param("::", id="v6-unspecified"),
    pytest.param("::1", id="v6-loopback"),
    pytest.param("fe80::1", id="v6-link-local"),
    pytest.param("fc00::1", id="v6-ula-fc"),
    pytest.param("fd00:ec2::254", id="v6-ula-cloud-metadata"),
    pytest.param("fec0::1", id="v6-site-local"),
    pytest.param("ff02::1", id="v6-multicast"),
    pytest.param("ff0e::1", id="v6-global-scope-multicast"),
    pytest.param("2001:db8::1", id="v6-documentation"),
    pytest.param("3fff::1", id="v6-documentation-3fff"),
    pytest.param("100::1", id="v6-discard-only"),
    pytest.param("2001::1", id="v6-teredo"),
    pytest.param("5f00::1", id="v6-reserved"),
    # IPv6 forms that embed IPv4 (row 51; bypass list 3, 4)
    pytest.param("::ffff:127.0.0.1", id="mapped-loopback"),
    pytest.param("::ffff:7f00:1", id="mapped-loopback-hex"),
    pytest.param("::ffff:10.0.0.1", id="mapped-private"),
    pytest.param("::ffff:169.254.169.254", id="mapped-metadata"),
    pytest.param("::ffff:100.64.0.1", id="mapped-cgnat"),
    pytest.param("::127.0.0.1", id="compatible-loopback"),
    pytest.param("::10.0.0.1", id="compatible-private"),
    pytest.param("::0.0.0.2", id="compatible-this-network"),
    pytest.param("64:ff9b::7f00:1", id="nat64-loopback"),
    pytest.param("64:ff9b::a00:1", id="nat64-private"),
    pytest.param("64:ff9b::169.254.169.254", id="nat64-metadata"),
    pytest.param("64:ff9b:1::1", id="nat64-local-use"),
    pytest.param("2002:7f00:1::", id="6to4-loopback"),
    pytest.param("2002:a00:1::1", id="6to4-private"),
    pytest.param("2002:c0a8:101::1", id="6to4-rfc1918-192"),
]

PUBLIC = [
    pytest.param("8.8.8.8", id="google-dns"),
    pytest.param("1.1.1.1", id="cloudflare-dns"),
    pytest.param("93.184.216.34", id="example-com"),
    pytest.param("172.32.0.1", id="just-above-rfc1918-172"),
    pytest.param("100.63.255.255", id="just-below-cgnat"),
    pytest.param("100.128.0.1", id="just-above-cgnat"),
    pytest.param("198.20.0.1", id="just-above-benchmark"),
    pytest.param("2606:4700::1111", id="v6-cloudflare"),
    pytest.param("2001:4860:4860::8888", id="v6-google"),
    pytest.param("::ffff:8.8.8.8", id="mapped-public"),
    pytest.param("::8.8.8.8", id="compatible-public"),
    pytest.param("64:ff9b::808:808", id="nat64-public"),
    pytest.param("2002:808:808::", id="6to4-public"),
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_not_public(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert not is_public_ip(ip)
    assert is_local_literal(canonicalize_host(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert is_public_ip(ip)
    assert not is_local_literal(canonicalize_host(address))


@pytest.mark.parametrize(
    ("address", "inner"),
    [
        pytest.param("::ffff:1.2.3.4", "1.2.3.4", id="mapped"),
        pytest.param("::1.2.3.4", "1.2.3.4", id="compatible"),
        pytest.param("64:ff9b::1.2.3.4", "1.2.3.4", id="nat64"),
        pytest.param("2002:102:304::1", "1.2.3.4", id="6to4"),
        pytest.param("::1", None, id="loopback-is-not-compatible"),
        pytest.param("::", None, id="unspecified-is-not-compatible"),
        pytest.param("2606:4700::1111", None, id="plain-v6"),
    ],
)
def test_embedded_ipv4(address: str, inner: str | None) -> None:
    expected = ipaddress.IPv4Address(inner) if inner else None
    assert embedded_ipv4(ipaddress.IPv6Address(address)) == expected


LOCAL_LITERAL = [
    # row 53 plus the SPEC's `*.localhost` and non-canonical IPv4 forms
    pytest.param("localhost", True, id="localhost"),
    pytest.param("app.localhost", True, id="subdomain-of-localhost"),
    pytest.param("a.b.localhost", True, id="deep-subdomain-of-localhost"),
    pytest.param("127.0.0.1", True, id="loopback-v4"),
    pytest.param("::1", True, id="loopback-v6"),
    pytest.param("fe80::1%eth0", True, id="scoped-link-local"),
    pytest.param("10.1.2.3", True, id="private"),
    pytest.param("notlocalhost", False, id="suffix-without-dot"),
    pytest.param("localhost.example.com", False, id="localhost-label-in-name"),
    pytest.param("1.2.3.4", False, id="public-v4"),
    pytest.param("example.com", False, id="name"),
]


@pytest.mark.parametrize(("host", "expected"), LOCAL_LITERAL)
def test_is_local_literal(host: str, expected: bool) -> None:
    assert is_local_literal(host) is expected


@pytest.mark.parametrize(
    "raw",
    [
        "localhost.",
        "LOCALHOST",
        "2130706433",
        "0x7f.1",
        "0177.0.0.1",
        "127.1",
        "[::ffff:127.0.0.1]",
        "0",
        "[0:0:0:0:0:0:0:1]:80",
        "App.LocalHost.",
    ],
)
def test_every_spelling_of_local_is_local(raw: str) -> None:
    assert is_local_literal(canonicalize_host(raw))


# --- properties -------------------------------------------------------------------------------

# Host-shaped text: the characters and tokens the canonicaliser branches on.
_HOSTISH = st.lists(
    st.sampled_from([*"aAzZ09x.-_:[]%@/\\ \t\x00é例ＡＢ．。2513f", "xn--", "::", "%25", "0x"]),
    max_size=20,
).map("".join)


@given(st.one_of(st.text(max_size=60), _HOSTISH))
@example("fe80::1%2525x")
@example("example.com\u3002")
@example("0x")
def test_canonicalize_only_raises_invalid_host_and_is_idempotent(raw: str) -> None:
    try:
        once = canonicalize_host(raw)
    except InvalidHost:
        return
    assert canonicalize_host(once) == once
    assert once == once.strip().lower() or "%" in once
    assert not once.endswith(".")


@given(st.ip_addresses())
def test_every_address_canonicalises_to_itself(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    canonical = canonicalize_host(str(ip))
    assert canonical == str(ip)
    assert parse_ip(canonical) == ip
    host = f"[{ip}]:443" if ip.version == 6 else f"{ip}:443"
    assert canonicalize_host(host) == canonical


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_inet_aton_integer_forms(number: int) -> None:
    dotted = str(ipaddress.IPv4Address(number))
    assert canonicalize_host(str(number)) == dotted
    assert canonicalize_host(hex(number)) == dotted
    assert canonicalize_host("0" + oct(number)[2:]) == dotted


@given(st.ip_addresses(v=4))
def test_embedded_forms_classify_like_the_ipv4(ip: ipaddress.IPv4Address) -> None:
    public = is_public_ip(ip)
    for wrapped in (f"::ffff:{ip}", f"64:ff9b::{ip}"):
        assert is_public_ip(ipaddress.IPv6Address(wrapped)) is public, wrapped
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (int(ip) << 80))
    assert is_public_ip(sixtofour) is public
