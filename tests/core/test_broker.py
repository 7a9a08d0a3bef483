"""Credential broker (SPEC §8): bindings, dummy shape, markers, swap rules. Pure, no sockets."""

from __future__ import annotations

import base64
import json
import pickle
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netproxy_core.broker import (
    BROKER_ACTIVE_KEY,
    BROKERED_CREDENTIALS_KEY,
    CredentialBroker,
    Secret,
    brokered_dummy_env_keys,
    make_dummy,
    normalize_gh_host,
)
from netproxy_core.config.model import CredentialProvider, ProxyConfig

GH_REAL = "ghp_" + "R" * 36
PAT_REAL = "github_pat_11ABCDEFG0_" + "x" * 59
OPENAI_REAL = "sk-proj-abc_DEF-123456789012345678901234567890-_"
ALNUM = set(string.ascii_letters + string.digits)


def auth(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"api.github.com"), (b"authorization", value.encode())]


def basic(user: str, password: str | None = None) -> str:
    plain = user if password is None else f"{user}:{password}"
    return "Basic " + base64.b64encode(plain.encode()).decode()


def header(headers: list[tuple[bytes, bytes]], name: bytes = b"authorization") -> str:
    return next(v for n, v in headers if n == name).decode()


# --- dummies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("real", "prefix"),
    [
        (GH_REAL, "ghp_"),
        (PAT_REAL, "github_pat_"),
        ("gho_" + "a" * 36, "gho_"),
        ("ghu_" + "a" * 36, "ghu_"),
        ("ghs_" + "a" * 36, "ghs_"),
        ("ghr_" + "a" * 36, "ghr_"),
        (OPENAI_REAL, "sk-proj-"),
        ("sk-svcacct-" + "b" * 40, "sk-svcacct-"),
        ("sk-admin-" + "b" * 40, "sk-admin-"),
        ("sk-" + "c" * 48, "sk-"),
        ("plain-token-with-dashes_and_more_chars", ""),
    ],
)
def test_dummy_keeps_prefix_length_and_punctuation(real: str, prefix: str) -> None:
    dummy = make_dummy(real)
    assert dummy is not None
    assert dummy.startswith(prefix)
    assert len(dummy) == len(real)
    assert dummy != real and real not in dummy
    for r, d in zip(real[len(prefix) :], dummy[len(prefix) :], strict=True):
        assert (r == d) if not r.isalnum() else d in ALNUM


@pytest.mark.parametrize(("real", "prefix"), [("ghp_short", "ghp_"), ("sk-x", "sk-"), ("t", "")])
def test_short_real_gets_prefix_plus_16_random(real: str, prefix: str) -> None:
    dummy = make_dummy(real)
    assert dummy is not None and dummy.startswith(prefix)
    assert len(dummy) == len(prefix) + 16 > len(real)


def test_dummies_are_random_per_broker() -> None:
    env = {"GH_TOKEN": GH_REAL}
    assert (
        CredentialBroker().virtualize(env)["GH_TOKEN"]
        != CredentialBroker().virtualize(env)["GH_TOKEN"]
    )


@given(st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=80))
def test_dummy_never_contains_real(real: str) -> None:
    dummy = make_dummy(real)
    if dummy is not None:
        assert real not in dummy
        assert len(dummy) >= 16


# --- virtualize ---------------------------------------------------------------------------


def test_virtualize_replaces_supported_keys_and_writes_markers() -> None:
    broker = CredentialBroker()
    env = {
        "GH_TOKEN": GH_REAL,
        "GITHUB_TOKEN": PAT_REAL,
        "OPENAI_API_KEY": OPENAI_REAL,
        "UNRELATED": "keep-me",
        "EMPTY": "",
    }
    original = dict(env)
    out = broker.virtualize(env)
    assert env == original  # not mutated
    assert out["UNRELATED"] == "keep-me"
    assert out[BROKER_ACTIVE_KEY] == "1"
    for key in ("GH_TOKEN", "GITHUB_TOKEN", "OPENAI_API_KEY"):
        assert out[key] != env[key]
    marker = json.loads(out[BROKERED_CREDENTIALS_KEY])
    assert sorted(marker) == sorted(
        [[k, out[k]] for k in ("GH_TOKEN", "GITHUB_TOKEN", "OPENAI_API_KEY")]
    )
    text = json.dumps(out) + repr(broker) + str(broker.dummies())
    for real in (GH_REAL, PAT_REAL, OPENAI_REAL):
        assert real not in text


def test_virtualize_without_credentials_writes_empty_marker() -> None:
    out = CredentialBroker().virtualize({"PATH": "/bin"})
    assert out == {"PATH": "/bin", BROKER_ACTIVE_KEY: "1", BROKERED_CREDENTIALS_KEY: "[]"}


def test_empty_and_whitespace_values_are_not_brokered() -> None:
    out = CredentialBroker().virtualize({"GH_TOKEN": "", "OPENAI_API_KEY": "   "})
    assert out["GH_TOKEN"] == "" and out["OPENAI_API_KEY"] == "   "
    assert json.loads(out[BROKERED_CREDENTIALS_KEY]) == []


def test_same_key_and_value_reuses_dummy_and_revirtualizing_keeps_it() -> None:
    broker = CredentialBroker()
    first = broker.virtualize({"GH_TOKEN": GH_REAL})
    again = broker.virtualize({"GH_TOKEN": GH_REAL})
    assert first["GH_TOKEN"] == again["GH_TOKEN"]
    twice = broker.virtualize(first)
    assert twice["GH_TOKEN"] == first["GH_TOKEN"]
    assert json.loads(twice[BROKERED_CREDENTIALS_KEY]) == [["GH_TOKEN", first["GH_TOKEN"]]]
    assert len(broker.dummies()) == 1


def test_values_that_cannot_be_headers_are_not_brokered() -> None:
    out = CredentialBroker().virtualize({"GH_TOKEN": "ghp_abc\x01def" + "x" * 30})
    assert json.loads(out[BROKERED_CREDENTIALS_KEY]) == []


def test_values_are_trimmed_before_registration() -> None:
    broker = CredentialBroker()
    out = broker.virtualize({"GH_TOKEN": f"  {GH_REAL}\n"})
    swapped = broker.swap(auth(f"Bearer {out['GH_TOKEN']}"), "api.github.com")
    assert header(swapped) == f"Bearer {GH_REAL}"


# --- host bindings ------------------------------------------------------------------------

CLOUD_BOUND = ["github.com", "api.github.com", "uploads.github.com", "api.astemu.ghe.com"]
CLOUD_UNBOUND = ["ghe.com", "gist.github.com", "github.example.com", "api.openai.com", "evil.test"]


@pytest.mark.parametrize("key", ["GH_TOKEN", "GITHUB_TOKEN"])
def test_github_cloud_binding(key: str) -> None:
    broker = CredentialBroker()
    out = broker.virtualize({key: GH_REAL, "GH_HOST": "github.example.com"})
    for host in CLOUD_BOUND:
        assert broker.is_bound(host), host
        assert header(broker.swap(auth(f"Bearer {out[key]}"), host)) == f"Bearer {GH_REAL}"
    for host in CLOUD_UNBOUND:
        assert not broker.is_bound(host), host
        assert header(broker.swap(auth(f"Bearer {out[key]}"), host)) == f"Bearer {out[key]}"


@pytest.mark.parametrize("key", ["GH_ENTERPRISE_TOKEN", "GITHUB_ENTERPRISE_TOKEN"])
def test_enterprise_binds_only_gh_host(key: str) -> None:
    broker = CredentialBroker()
    out = broker.virtualize(
        {key: "ghp_enterprise_" + "e" * 30, "GH_HOST": " GitHub.Example.Com.:8443 "}
    )
    dummy = out[key]
    assert dummy != "ghp_enterprise_" + "e" * 30
    assert broker.is_bound("github.example.com")
    assert not broker.is_bound("api.github.com")
    assert header(broker.swap(auth(f"Bearer {dummy}"), "github.example.com")).endswith("e" * 30)
    assert header(broker.swap(auth(f"Bearer {dummy}"), "api.github.com")) == f"Bearer {dummy}"


@pytest.mark.parametrize(
    "gh_host",
    [None, "", "github.com", "api.github.com", "tenant.ghe.com", "a/b", "user@host", "*.x"],
)
def test_enterprise_without_valid_non_cloud_gh_host_is_not_brokered(gh_host: str | None) -> None:
    env = {"GH_ENTERPRISE_TOKEN": "ghp_enterprise_" + "e" * 30}
    if gh_host is not None:
        env["GH_HOST"] = gh_host
    broker = CredentialBroker()
    out = broker.virtualize(env)
    assert out["GH_ENTERPRISE_TOKEN"] == env["GH_ENTERPRISE_TOKEN"]
    assert json.loads(out[BROKERED_CREDENTIALS_KEY]) == []
    assert not broker.is_bound("attacker.example")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" GitHub.Example.Com.:8443 ", "github.example.com"),
        ("127.0.0.1:8443", "127.0.0.1"),
        ("[::1]:8443", "::1"),
        ("::1", "::1"),
        ("[fe80::1%en0]:8443", "fe80::1%en0"),
        ("fe80::1%en0", "fe80::1%en0"),
        ("host:99999", None),
        ("https://x.example", None),
        ("a\\b", None),
        ("x?y", None),
        ("x#y", None),
        ("", None),
    ],
)
def test_gh_host_normalisation(text: str, expected: str | None) -> None:
    assert normalize_gh_host(text) == expected


def test_openai_binding() -> None:
    broker = CredentialBroker()
    out = broker.virtualize({"OPENAI_API_KEY": OPENAI_REAL})
    dummy = out["OPENAI_API_KEY"]
    assert dummy.startswith("sk-proj-") and len(dummy) == len(OPENAI_REAL)
    assert broker.is_bound("api.openai.com") and not broker.is_bound("openai.com")
    assert header(broker.swap(auth(f"Bearer {dummy}"), "api.openai.com")) == f"Bearer {OPENAI_REAL}"
    assert header(broker.swap(auth(f"Bearer {dummy}"), "attacker.example")) == f"Bearer {dummy}"
    explicit = auth("Bearer sk-explicit")
    assert broker.swap(explicit, "api.openai.com") == explicit


# --- swap forms ---------------------------------------------------------------------------


@pytest.fixture
def gh() -> tuple[CredentialBroker, str]:
    broker = CredentialBroker()
    return broker, broker.virtualize({"GH_TOKEN": GH_REAL})["GH_TOKEN"]


@pytest.mark.parametrize(
    ("presented", "expected"),
    [
        ("Bearer {d}", "Bearer {r}"),
        ("bearer {d}", "bearer {r}"),
        ("token {d}", "token {r}"),
        ("Token {d}", "Token {r}"),
        ("basic:x-access-token:{d}", "basic:x-access-token:{r}"),
        ("basic:{d}:x-oauth-basic", "basic:{r}:x-oauth-basic"),
        ("basic:{d}", "basic:{r}"),
        ("basic:{d}:{d}", "basic:{r}:{r}"),
        # not presented exactly: unchanged
        ("Bearer {d}x", "Bearer {d}x"),
        ("Bearer x{d}", "Bearer x{d}"),
        ("Digest {d}", "Digest {d}"),
        ("{d}", "{d}"),
        ("Bearer unrelated-token", "Bearer unrelated-token"),
        ("basic:user:other", "basic:user:other"),
        ("Basic !!!notbase64", "Basic !!!notbase64"),
    ],
)
def test_swap_forms(gh: tuple[CredentialBroker, str], presented: str, expected: str) -> None:
    broker, dummy = gh

    def render(template: str, value: str) -> str:
        text = template.replace("{d}", dummy).replace("{r}", value)
        if text.startswith("basic:"):
            return basic(text[len("basic:") :])
        return text

    got = header(broker.swap(auth(render(presented, dummy)), "api.github.com"))
    want = render(expected, GH_REAL)
    if expected.startswith("basic:"):
        want = basic(expected[len("basic:") :].replace("{d}", dummy).replace("{r}", GH_REAL))
    assert got == want


def test_swap_without_authorization_injects_nothing(gh: tuple[CredentialBroker, str]) -> None:
    broker, _ = gh
    headers = [(b"host", b"api.github.com"), (b"accept", b"*/*")]
    assert broker.swap(headers, "api.github.com") == headers


def test_swap_does_not_mutate_input(gh: tuple[CredentialBroker, str]) -> None:
    broker, dummy = gh
    headers = auth(f"Bearer {dummy}")
    copy = list(headers)
    out = broker.swap(headers, "api.github.com")
    assert headers == copy and out != headers


def test_ambiguous_two_credentials_leaves_headers_unchanged() -> None:
    broker = CredentialBroker()
    out = broker.virtualize({"GH_TOKEN": GH_REAL, "GITHUB_TOKEN": "ghp_" + "T" * 36})
    headers = [
        (b"authorization", f"Bearer {out['GH_TOKEN']}".encode()),
        (b"authorization", f"Bearer {out['GITHUB_TOKEN']}".encode()),
    ]
    assert broker.swap(headers, "api.github.com") == headers


def test_two_keys_each_inject_their_own_real() -> None:
    broker = CredentialBroker()
    other = "ghp_" + "T" * 36
    out = broker.virtualize({"GH_TOKEN": GH_REAL, "GITHUB_TOKEN": other})
    assert header(broker.swap(auth("Bearer unrelated"), "api.github.com")) == "Bearer unrelated"
    got = broker.swap(auth(f"Bearer {out['GITHUB_TOKEN']}"), "api.github.com")
    assert header(got) == f"Bearer {other}"


def test_two_children_with_different_reals() -> None:
    broker = CredentialBroker()
    one = broker.virtualize({"GH_TOKEN": "ghp-real-one-" + "1" * 20})["GH_TOKEN"]
    two = broker.virtualize({"GH_TOKEN": "ghp-real-two-" + "2" * 20})["GH_TOKEN"]
    assert one != two
    assert header(broker.swap(auth(f"Bearer {one}"), "github.com")).endswith("1" * 20)
    assert header(broker.swap(auth(f"Bearer {two}"), "github.com")).endswith("2" * 20)


def test_unrelated_headers_are_untouched(gh: tuple[CredentialBroker, str]) -> None:
    broker, dummy = gh
    headers = [(b"x-dummy-echo", dummy.encode()), (b"authorization", f"Bearer {dummy}".encode())]
    out = broker.swap(headers, "api.github.com")
    assert out[0] == headers[0]
    assert out[1] == (b"authorization", f"Bearer {GH_REAL}".encode())


# --- configured providers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "header_name", "presented", "expected"),
    [
        ("bearer", "authorization", "Bearer {v}", "Bearer {v}"),
        ("token", "authorization", "token {v}", "token {v}"),
        ("raw", "x-api-key", "{v}", "{v}"),
        ("basic", "authorization", "basic:{v}:", "basic:{v}:"),
        ("basic", "authorization", "basic:user:{v}", "basic:user:{v}"),
    ],
)
def test_configured_provider(scheme: str, header_name: str, presented: str, expected: str) -> None:
    provider = CredentialProvider(
        id="acme", env=("ACME_KEY",), hosts=("**.acme.test",), header=header_name, scheme=scheme
    )
    broker = CredentialBroker.from_config(ProxyConfig(credential_providers=(provider,)))
    real = "acme-real-secret-value-0123456789"
    dummy = broker.virtualize({"ACME_KEY": real})["ACME_KEY"]

    def render(template: str, value: str) -> str:
        text = template.replace("{v}", value)
        return basic(text[len("basic:") :]) if text.startswith("basic:") else text

    headers = [(header_name.encode(), render(presented, dummy).encode())]
    got = header(broker.swap(headers, "api.acme.test"), header_name.encode())
    assert got == render(expected, real)
    assert broker.swap(headers, "acme.other") == headers
    assert broker.is_bound("acme.test") and not broker.is_bound("acme.other")


def test_provider_scheme_mismatch_is_not_swapped() -> None:
    provider = CredentialProvider(id="p", env=("P_KEY",), hosts=("p.test",), scheme="token")
    broker = CredentialBroker((provider,))
    dummy = broker.virtualize({"P_KEY": "p-real-value-0123456789abcdef"})["P_KEY"]
    headers = [(b"authorization", f"Bearer {dummy}".encode())]
    assert broker.swap(headers, "p.test") == headers


def test_provider_cannot_claim_a_builtin_variable() -> None:
    provider = CredentialProvider(id="p", env=("GH_TOKEN",), hosts=("evil.test",))
    broker = CredentialBroker((provider,))
    dummy = broker.virtualize({"GH_TOKEN": GH_REAL})["GH_TOKEN"]
    assert not broker.is_bound("evil.test")
    assert header(broker.swap(auth(f"Bearer {dummy}"), "evil.test")) == f"Bearer {dummy}"


# --- pure helpers and secrecy -------------------------------------------------------------


def test_brokered_dummy_env_keys_excludes_replaced_values() -> None:
    broker = CredentialBroker()
    env = broker.virtualize({"GH_TOKEN": GH_REAL, "OPENAI_API_KEY": OPENAI_REAL})
    assert brokered_dummy_env_keys(env) == ["GH_TOKEN", "OPENAI_API_KEY"]
    env["OPENAI_API_KEY"] = "sk-user-override"
    assert brokered_dummy_env_keys(env) == ["GH_TOKEN"]


@pytest.mark.parametrize(
    "marker", ["not json", "{}", "[1, 2]", '[["GH_TOKEN"]]', '[["GH_TOKEN", 5]]', '[[null, "x"]]']
)
def test_brokered_dummy_env_keys_ignores_malformed_marker(marker: str) -> None:
    assert brokered_dummy_env_keys({BROKERED_CREDENTIALS_KEY: marker, "GH_TOKEN": "x"}) == []


def test_secret_is_redacted_and_not_picklable() -> None:
    secret = Secret(GH_REAL)
    assert GH_REAL not in repr(secret) and GH_REAL not in str(secret) and GH_REAL not in f"{secret}"
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    assert secret.reveal() == GH_REAL and secret.matches(GH_REAL) and not secret.matches("x")


def test_broker_internals_never_show_the_real_value(gh: tuple[CredentialBroker, str]) -> None:
    broker, _ = gh
    shown = repr(broker) + repr(broker._credentials) + str(broker.dummies())
    assert GH_REAL not in shown
