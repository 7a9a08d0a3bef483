"""The environment a child process needs to use the proxy and trust its CA (SPEC §9). Pure.

Every managed variable is set in both cases where tools disagree; inherited values are
replaced, never merged. `strip_managed_env` removes them again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import quote

from .broker import BROKER_ACTIVE_KEY, BROKERED_CREDENTIALS_KEY, brokered_dummy_env_keys

if TYPE_CHECKING:
    from .broker import CredentialBroker

__all__ = [
    "CA_ALONE_KEYS",
    "CA_BUNDLE_KEYS",
    "MANAGED_KEYS",
    "PROXY_KEYS",
    "Endpoints",
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
BROKER_MARKERS: Final = (BROKER_ACTIVE_KEY, BROKERED_CREDENTIALS_KEY)
# Always removed by `strip_managed_env`; CA keys only when they name a managed file.
MANAGED_KEYS: Final = frozenset(
    PROXY_KEYS + ALL_PROXY_KEYS + NO_PROXY_KEYS + tuple(FLAG_VALUES) + BROKER_MARKERS
)
LOCAL_NO_PROXY: Final = "localhost,127.0.0.1,::1"
# `CertificateAuthority.write_public_files` names: <home>/proxy/ca[-bundle]-<16 hex>.pem
_MANAGED_CA_FILE: Final = re.compile(r"(?:^|[/\\])proxy[/\\]ca(?:-bundle)?-[0-9a-f]{16}\.pem$")


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
    allow_local_binding: bool | None = None,
    auth_token: str | None = None,
    broker: CredentialBroker | None = None,
) -> dict[str, str]:
    """A copy of `base` (default: empty) with every proxy and CA variable set for `proxy`.

    `base` is never mutated. Inherited proxy and CA values are replaced, never merged; without
    a proxy CA (``mitm.enabled = false``) inherited CA variables are left as they are.

    Args:
        proxy: a running proxy (handle, `BackgroundProxy`, plugin fixture) or `Endpoints`.
        socks: put the ``socks5h://`` URL in ``ALL_PROXY`` (breaks httpx without socksio);
            `ValueError` when the proxy has no SOCKS5 listener.
        allow_local_binding: ``NO_PROXY`` = ``localhost,127.0.0.1,::1`` instead of empty
            (default: the proxy's own ``allow_local_binding`` when it can be found, else false).
        auth_token: proxy authentication token to embed as URL userinfo (default: the
            proxy's ``proxy_auth_token`` when it can be found).
        broker: virtualise credentials with this broker (default: the proxy's own broker
            when it has one, SPEC §8).
    """
    env = dict(base or {})
    http_url = proxy.http_url
    if http_url is None:
        raise ValueError("the proxy has no HTTP listener")
    if auth_token is None:
        auth_token = _proxy_auth_token(proxy)
    http_url = _with_userinfo(http_url, auth_token)
    for key in PROXY_KEYS:
        env[key] = http_url
    all_proxy = http_url
    if socks:
        if not proxy.socks_url:
            raise ValueError("socks=True, but the proxy has no SOCKS5 listener")
        all_proxy = _with_userinfo(proxy.socks_url, auth_token)
    for key in ALL_PROXY_KEYS:
        env[key] = all_proxy
    if allow_local_binding is None:
        allow_local_binding = _proxy_allows_local(proxy)
    no_proxy = LOCAL_NO_PROXY if allow_local_binding else ""
    for key in NO_PROXY_KEYS:
        env[key] = no_proxy
    env.update(FLAG_VALUES)
    if proxy.ca_bundle_path:
        for key in CA_BUNDLE_KEYS:
            env[key] = str(proxy.ca_bundle_path)
    if proxy.ca_cert_path:
        for key in CA_ALONE_KEYS:
            env[key] = str(proxy.ca_cert_path)
    broker = broker if broker is not None else _proxy_broker(proxy)
    if broker is not None:
        env = broker.virtualize(env)
    return env


def strip_managed_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` without what `child_env` (or the broker) manages.

    Removes every proxy variable, flag and broker marker, every key still holding a broker
    dummy, and CA variables that name a proxy-written CA file (a user's own CA path is kept).
    """
    dummies = set(brokered_dummy_env_keys(env))
    return {
        k: v
        for k, v in env.items()
        if k not in MANAGED_KEYS
        and k not in dummies
        and not (k in CA_BUNDLE_KEYS + CA_ALONE_KEYS and _MANAGED_CA_FILE.search(v))
    }


def _with_userinfo(url: str, token: str | None) -> str:
    if not token:
        return url
    return url.replace("://", f"://netproxy:{quote(token, safe='')}@", 1)


def _engine(proxy: object) -> object:
    """The `NetworkProxy` behind a handle / `BackgroundProxy` / fixture, or `proxy` itself."""
    for _ in range(4):
        if hasattr(proxy, "broker"):
            return proxy
        inner = getattr(proxy, "proxy", None)
        if inner is None:
            break
        proxy = inner
    return proxy


def _proxy_broker(proxy: object) -> CredentialBroker | None:
    from .broker import CredentialBroker

    broker = getattr(_engine(proxy), "broker", None)
    return broker if isinstance(broker, CredentialBroker) else None


def _proxy_allows_local(proxy: object) -> bool:
    config = getattr(_engine(proxy), "config", None)
    return getattr(config, "allow_local_binding", False) is True


def _proxy_auth_token(proxy: object) -> str | None:
    config = getattr(_engine(proxy), "config", None)
    token = getattr(config, "proxy_auth_token", None)
    return token if isinstance(token, str) and token else None
