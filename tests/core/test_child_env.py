"""Child-process environment (SPEC §9) and `strip_managed_env`. Pure, no sockets."""

from __future__ import annotations

import json

import pytest

from netproxy_core.broker import BROKER_ACTIVE_KEY, BROKERED_CREDENTIALS_KEY, CredentialBroker
from netproxy_core.child_env import (
    CA_ALONE_KEYS,
    CA_BUNDLE_KEYS,
    PROXY_KEYS,
    Endpoints,
    child_env,
    strip_managed_env,
)

HTTP = "http://127.0.0.1:3128"
SOCKS = "socks5h://127.0.0.1:8081"
CA = "/home/u/.netproxy/proxy/ca-0123456789abcdef.pem"
BUNDLE = "/home/u/.netproxy/proxy/ca-bundle-fedcba9876543210.pem"
PROXY = Endpoints(HTTP, SOCKS, CA, BUNDLE)
NO_CA = Endpoints(HTTP, SOCKS)

SPEC_PROXY_KEYS = [
    "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "WS_PROXY", "WSS_PROXY",
    "ws_proxy", "wss_proxy", "npm_config_proxy", "npm_config_https_proxy", "YARN_HTTP_PROXY",
    "YARN_HTTPS_PROXY", "PIP_PROXY", "grpc_proxy",
]  # fmt: skip
SPEC_BUNDLE_KEYS = [
    "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "PIP_CERT",
    "AWS_CA_BUNDLE", "CARGO_HTTP_CAINFO", "NPM_CONFIG_CAFILE", "BUNDLE_SSL_CA_CERT",
]  # fmt: skip
SPEC_CA_ALONE_KEYS = ["NODE_EXTRA_CA_CERTS", "DENO_CERT"]


def test_key_lists_match_the_spec() -> None:
    assert list(PROXY_KEYS) == SPEC_PROXY_KEYS
    assert list(CA_BUNDLE_KEYS) == SPEC_BUNDLE_KEYS
    assert list(CA_ALONE_KEYS) == SPEC_CA_ALONE_KEYS


@pytest.mark.parametrize("key", SPEC_PROXY_KEYS)
def test_every_proxy_key_is_the_http_url_replacing_inherited(key: str) -> None:
    env = child_env(PROXY, {key: "http://old.example:1"})
    assert env[key] == HTTP


@pytest.mark.parametrize(
    ("socks", "expected"), [(False, HTTP), (True, SOCKS)], ids=["http", "socks"]
)
def test_all_proxy_is_socks_only_when_asked(socks: bool, expected: str) -> None:
    env = child_env(PROXY, {"ALL_PROXY": "socks5://old:1", "all_proxy": "x"}, socks=socks)
    assert env["ALL_PROXY"] == env["all_proxy"] == expected
    assert all(env[k] == HTTP for k in SPEC_PROXY_KEYS)  # never a SOCKS URL in HTTP(S)_PROXY


def test_socks_requested_without_socks_listener_is_an_error() -> None:
    with pytest.raises(ValueError, match="SOCKS5"):
        child_env(Endpoints(HTTP), socks=True)


def test_no_http_listener_is_an_error() -> None:
    with pytest.raises(ValueError, match="HTTP"):
        child_env(Endpoints(None))


@pytest.mark.parametrize(
    ("allow_local", "expected"), [(False, ""), (True, "localhost,127.0.0.1,::1")]
)
def test_no_proxy_is_replaced_never_merged(allow_local: bool, expected: str) -> None:
    base = {"NO_PROXY": "corp.example,10.0.0.0/8", "no_proxy": "internal"}
    env = child_env(PROXY, base, allow_local_binding=allow_local)
    assert env["NO_PROXY"] == env["no_proxy"] == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [("NODE_USE_ENV_PROXY", "1"), ("ELECTRON_GET_USE_PROXY", "true"), ("NETPROXY_ACTIVE", "1")],
)
def test_flags(key: str, value: str) -> None:
    assert child_env(PROXY, {key: "0"})[key] == value


@pytest.mark.parametrize("key", SPEC_BUNDLE_KEYS)
def test_bundle_keys_get_the_combined_bundle(key: str) -> None:
    assert child_env(PROXY, {key: "/tmp/user-ca.pem"})[key] == BUNDLE


@pytest.mark.parametrize("key", SPEC_CA_ALONE_KEYS)
def test_ca_alone_keys_get_only_the_ca(key: str) -> None:
    assert child_env(PROXY, {key: "/tmp/user-ca.pem"})[key] == CA


def test_without_a_proxy_ca_inherited_ca_variables_are_kept() -> None:
    base = {"SSL_CERT_FILE": "/tmp/user-ca.pem"}
    env = child_env(NO_CA, base)
    assert env["SSL_CERT_FILE"] == "/tmp/user-ca.pem"
    assert not any(k in env for k in SPEC_BUNDLE_KEYS[1:] + SPEC_CA_ALONE_KEYS)


def test_base_is_copied_not_mutated_and_other_keys_kept() -> None:
    base = {"PATH": "/usr/bin", "HTTP_PROXY": "http://old:1"}
    env = child_env(PROXY, base)
    assert base == {"PATH": "/usr/bin", "HTTP_PROXY": "http://old:1"}
    assert env["PATH"] == "/usr/bin"
    assert child_env(PROXY)["HTTP_PROXY"] == HTTP  # base=None → empty


def test_auth_token_is_url_userinfo_escaped() -> None:
    env = child_env(PROXY, auth_token="p@ss:w/rd", socks=True)
    assert env["HTTPS_PROXY"] == "http://netproxy:p%40ss%3Aw%2Frd@127.0.0.1:3128"
    assert env["ALL_PROXY"] == "socks5h://netproxy:p%40ss%3Aw%2Frd@127.0.0.1:8081"


def test_broker_virtualises_after_proxy_variables() -> None:
    broker = CredentialBroker()
    real = "ghp_" + "Q" * 36
    env = child_env(PROXY, {"GH_TOKEN": real}, broker=broker)
    assert env["GH_TOKEN"] != real and env["GH_TOKEN"].startswith("ghp_")
    assert env[BROKER_ACTIVE_KEY] == "1"
    assert json.loads(env[BROKERED_CREDENTIALS_KEY]) == [["GH_TOKEN", env["GH_TOKEN"]]]
    assert real not in json.dumps(env)


def test_no_broker_no_markers() -> None:
    env = child_env(PROXY, {"GH_TOKEN": "ghp_" + "Q" * 36})
    assert env["GH_TOKEN"] == "ghp_" + "Q" * 36
    assert BROKER_ACTIVE_KEY not in env and BROKERED_CREDENTIALS_KEY not in env


# --- strip_managed_env ---------------------------------------------------------------------


def test_strip_removes_everything_child_env_added() -> None:
    base = {"PATH": "/usr/bin", "HOME": "/home/u"}
    env = child_env(PROXY, base, socks=True, allow_local_binding=True)
    assert strip_managed_env(env) == base


def test_strip_removes_dummies_and_markers_but_keeps_replaced_values() -> None:
    broker = CredentialBroker()
    env = child_env(
        PROXY, {"GH_TOKEN": "ghp_" + "Q" * 36, "OPENAI_API_KEY": "sk-" + "o" * 48}, broker=broker
    )
    env["OPENAI_API_KEY"] = "sk-user-override"
    assert strip_managed_env(env) == {"OPENAI_API_KEY": "sk-user-override"}


def test_strip_keeps_user_ca_paths_and_unrelated_keys() -> None:
    env = {
        "SSL_CERT_FILE": "/tmp/user-ca-bundle.pem",
        "NODE_EXTRA_CA_CERTS": CA,
        "REQUESTS_CA_BUNDLE": BUNDLE,
        "CUSTOM_ENV": "kept",
        "NETPROXY_ACTIVE": "1",
        "HTTPS_PROXY": HTTP,
    }
    assert strip_managed_env(env) == {
        "SSL_CERT_FILE": "/tmp/user-ca-bundle.pem",
        "CUSTOM_ENV": "kept",
    }


def test_strip_does_not_mutate() -> None:
    env = {"HTTP_PROXY": HTTP}
    strip_managed_env(env)
    assert env == {"HTTP_PROXY": HTTP}
