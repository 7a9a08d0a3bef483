"""The environment a child process needs to use the proxy and trust its CA (SPEC §9). Pure.

Every managed variable is set in both cases where tools disagree; inherited values are
replaced, never merged. `strip_managed_env` removes them again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = [
    "CA_ALONE_KEYS",
    "CA_BUNDLE_KEYS",
    "PROXY_KEYS",
    "ProxyEndpoints",
    "child_env",
    "strip_managed_env",
]

PROXY_KEYS: Final = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "WS_PROXY",
    "WSS_PROXY",
    "ws_proxy",
    "wss_proxy",
    "npm_config_proxy",
    "npm_config_https_proxy",
    "YARN_HTTP_PROXY",
    "YARN_HTTPS_PROXY",
    "PIP_PROXY",
    "grpc_proxy",
)
ALL_PROXY_KEYS: Final = ("ALL_PROXY", "all_proxy")
NO_PROXY_KEYS: Final = ("NO_PROXY", "no_proxy")
FLAG_VALUES: Final = {
    "NODE_USE_ENV_PROXY": "1",
    "ELECTRON_GET_USE_PROXY": "true",
    "NETPROXY_ACTIVE": "1",
}
CA_BUNDLE_KEYS: Final = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "AWS_CA_BUNDLE",
    "CARGO_HTTP_CAINFO",
    "NPM_CONFIG_CAFILE",
    "BUNDLE_SSL_CA_CERT",
)
CA_ALONE_KEYS: Final = ("NODE_EXTRA_CA_CERTS", "DENO_CERT")
BROKER_MARKERS: Final = ("NETPROXY_CREDENTIAL_BROKER_ACTIVE", "NETPROXY_BROKERED_CREDENTIALS")
MANAGED_KEYS: Final = frozenset(
    PROXY_KEYS
    + ALL_PROXY_KEYS
    + NO_PROXY_KEYS
    + tuple(FLAG_VALUES)
    + CA_BUNDLE_KEYS
    + CA_ALONE_KEYS
)
LOCAL_NO_PROXY: Final = "localhost,127.0.0.1,::1"


class ProxyEndpoints(Protocol):
    """What `child_env` needs to know about a running proxy."""

    @property
    def http_url(self) -> str | None: ...
    @property
    def socks_url(self) -> str | None: ...
    @property
    def ca_cert_path(self) -> object: ...
    @property
    def ca_bundle_path(self) -> object: ...


@dataclass(frozen=True, slots=True)
class Endpoints:
    http_url: str | None
    socks_url: str | None = None
    ca_cert_path: object = None
    ca_bundle_path: object = None


def child_env(
    proxy: ProxyEndpoints,
    base: Mapping[str, str] | None = None,
    *,
    socks: bool = False,
    allow_local_binding: bool = False,
    auth_token: str | None = None,
) -> dict[str, str]:
    """A copy of `base` (default: empty) with every proxy and CA variable set for `proxy`.

    Args:
        proxy: a running proxy (handle, `BackgroundProxy`, plugin fixture) or `Endpoints`.
        socks: put the ``socks5h://`` URL in ``ALL_PROXY`` (breaks httpx without socksio).
        allow_local_binding: ``NO_PROXY`` = ``localhost,127.0.0.1,::1`` instead of empty.
        auth_token: proxy authentication token to embed as URL userinfo.
    """
    env = dict(base or {})
    http_url = proxy.http_url
    if http_url is None:
        raise ValueError("the proxy has no HTTP listener")
    if auth_token:
        http_url = http_url.replace("://", f"://netproxy:{auth_token}@", 1)
    for key in PROXY_KEYS:
        env[key] = http_url
    all_proxy = http_url
    if socks and proxy.socks_url:
        all_proxy = proxy.socks_url
        if auth_token:
            all_proxy = all_proxy.replace("://", f"://netproxy:{auth_token}@", 1)
    for key in ALL_PROXY_KEYS:
        env[key] = all_proxy
    no_proxy = LOCAL_NO_PROXY if allow_local_binding else ""
    for key in NO_PROXY_KEYS:
        env[key] = no_proxy
    env.update(FLAG_VALUES)
    for key in CA_BUNDLE_KEYS + CA_ALONE_KEYS:
        env.pop(key, None)
    if proxy.ca_bundle_path:
        for key in CA_BUNDLE_KEYS:
            env[key] = str(proxy.ca_bundle_path)
    if proxy.ca_cert_path:
        for key in CA_ALONE_KEYS:
            env[key] = str(proxy.ca_cert_path)
    return env


def strip_managed_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` without any variable `child_env` (or the broker) manages."""
    return {k: v for k, v in env.items() if k not in MANAGED_KEYS and k not in BROKER_MARKERS}
