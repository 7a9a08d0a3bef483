"""Spec audit, pure parts (SPEC §5.8, §8, §9, §13): gaps found and fixed, one test each."""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import pytest

from netproxy_core.broker import DUMMY_PREFIXES, make_dummy
from netproxy_core.child_env import child_env
from netproxy_core.config.model import ProxyConfig
from netproxy_core.net.upstream import UpstreamProxies

ALNUM = set(string.ascii_letters + string.digits)


# --- §8: a short real value gets prefix + 16 random alphanumerics --------------------------


@pytest.mark.parametrize(
    ("real", "prefix"),
    [("sk-proj-a-b", "sk-proj-"), ("ghp_x_y", "ghp_"), ("a.b-c", ""), ("sk-x", "sk-")],
)
def test_short_value_dummy_is_prefix_plus_16_random(real: str, prefix: str) -> None:
    dummy = make_dummy(real)
    assert dummy is not None
    assert dummy.startswith(prefix) and len(dummy) == len(prefix) + 16 > len(real)
    assert set(dummy[len(prefix) :]) <= ALNUM
    assert real not in dummy


def test_long_value_dummy_keeps_shape() -> None:
    real = "github_pat_11ABC_" + "z" * 60
    dummy = make_dummy(real)
    assert dummy is not None and len(dummy) == len(real) and dummy != real
    assert [c.isalnum() for c in dummy] == [c.isalnum() for c in real]
    assert next(p for p in DUMMY_PREFIXES if dummy.startswith(p)) == "github_pat_"


# --- §9: NO_PROXY follows the proxy's own allow_local_binding ------------------------------


@dataclass
class _Engine:
    config: ProxyConfig
    http_url: str = "http://127.0.0.1:3128"
    socks_url: str | None = None
    ca_cert_path: object = None
    ca_bundle_path: object = None
    broker: object = field(default=None)


@pytest.mark.parametrize(
    ("allow_local", "expected"), [(False, ""), (True, "localhost,127.0.0.1,::1")]
)
def test_no_proxy_defaults_to_the_proxys_allow_local_binding(
    allow_local: bool, expected: str
) -> None:
    proxy = _Engine(ProxyConfig(allow_local_binding=allow_local))
    env = child_env(proxy, {"NO_PROXY": "corp.example", "no_proxy": "x"})
    assert env["NO_PROXY"] == env["no_proxy"] == expected
    # An explicit argument still wins.
    assert child_env(proxy, allow_local_binding=not allow_local)["NO_PROXY"] != expected


# --- §5.8: non-HTTP or empty upstream values are skipped, not fatal ------------------------


@pytest.mark.parametrize(
    ("env", "secure", "plain"),
    [
        ({"ALL_PROXY": "socks5://s:1080", "all_proxy": "http://a:1"}, "a", "a"),
        ({"HTTPS_PROXY": "", "HTTP_PROXY": "http://h:8080"}, "h", "h"),
        ({"HTTPS_PROXY": "socks5h://s:1", "https_proxy": "http://l:2"}, "l", None),
        ({"HTTP_PROXY": "https://x:1", "ALL_PROXY": "http://a:3"}, "a", "a"),
        ({"HTTPS_PROXY": "http://u:1", "https_proxy": "http://l:2"}, "u", None),
    ],
)
def test_upstream_selection_skips_unusable_values(
    env: dict[str, str], secure: str | None, plain: str | None
) -> None:
    proxies = UpstreamProxies.from_env(env)
    assert (proxies.secure.host if proxies.secure else None) == secure
    assert (proxies.plain.host if proxies.plain else None) == plain


# --- §13 / §8: the broker helpers are importable where a user looks ------------------------


def test_broker_names_are_exported_from_the_package() -> None:
    import netproxy_core
    from netproxy_core import CredentialBroker, brokered_dummy_env_keys

    assert "brokered_dummy_env_keys" in netproxy_core.__all__
    assert "CredentialBroker" in netproxy_core.__all__
    env = CredentialBroker().virtualize({"OPENAI_API_KEY": "sk-proj-" + "k" * 40})
    assert brokered_dummy_env_keys(env) == ["OPENAI_API_KEY"]
    assert brokered_dummy_env_keys({**env, "OPENAI_API_KEY": "mine"}) == []
