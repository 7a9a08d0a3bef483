"""Frozen configuration types: the SPEC §2.2 keys, letter for letter. No I/O, no parsing.

Raw dictionaries die in `loader.py`; everything past it sees these immutable values.
Collections are tuples in file order; secrets are kept out of `repr`.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Access",
    "CredentialProvider",
    "Limits",
    "MitmAction",
    "MitmCa",
    "MitmConfig",
    "MitmHook",
    "MitmInjectHeader",
    "Mode",
    "OtelConfig",
    "ProxyConfig",
]


class Mode(enum.StrEnum):
    FULL = "full"
    LIMITED = "limited"


class Access(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Timeouts (seconds) and sizes (SPEC §15)."""

    connect_timeout: float = 10.0
    dns_timeout: float = 2.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_header_bytes: int = 65_536
    max_connections: int = 4096
    shutdown_grace: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class MitmInjectHeader:
    """One header a hook action injects; the secret is read by the hook compiler."""

    name: str
    secret_env_var: str | None = None
    secret_file: str | None = None
    prefix: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MitmAction:
    strip_request_headers: tuple[str, ...] = ()
    inject_request_headers: tuple[MitmInjectHeader, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class MitmHook:
    """A MITM hook (SPEC §7.5); matchers are kept as written and compiled by `mitm_hooks`."""

    name: str
    host: str
    methods: tuple[str, ...]
    path_prefixes: tuple[str, ...]
    action: tuple[str, ...]
    query: tuple[tuple[str, tuple[str, ...]], ...] = ()
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class MitmCa:
    certificate_file: str
    private_key_file: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MitmConfig:
    """`enabled`: None = auto (intercept only where SPEC §7.3 requires it)."""

    enabled: bool | None = None
    hooks: tuple[MitmHook, ...] = ()
    actions: tuple[tuple[str, MitmAction], ...] = ()
    ca: MitmCa | None = None

    def action(self, name: str) -> MitmAction | None:
        return dict(self.actions).get(name)


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialProvider:
    """A configured brokered credential (SPEC §8)."""

    id: str
    env: tuple[str, ...]
    hosts: tuple[str, ...]
    header: str = "authorization"
    scheme: str = "bearer"


@dataclass(frozen=True, slots=True, kw_only=True)
class OtelConfig:
    enabled: bool = False
    endpoint: str | None = None
    protocol: str = "http/protobuf"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """The effective configuration of one proxy: SPEC §2.2 keys plus provenance.

    Build it with `load_config`, `ProxyConfig.from_toml` or the constructor; derive variants
    with `with_changes(**kw)`, which validates again.
    """

    enabled: bool = True
    proxy_url: str = "http://127.0.0.1:3128"
    enable_socks5: bool = True
    socks_url: str = "http://127.0.0.1:8081"
    enable_socks5_udp: bool = True
    allow_upstream_proxy: bool = True
    dangerously_allow_non_loopback_proxy: bool = False
    mode: Mode = Mode.FULL
    allow_local_binding: bool = False
    domains: tuple[tuple[str, Access], ...] = ()
    unix_sockets: tuple[tuple[str, Access], ...] = ()
    dangerously_allow_all_unix_sockets: bool = False
    mitm: MitmConfig = field(default_factory=MitmConfig)
    credential_broker: bool = False
    dangerously_allow_plaintext_credential_injection: bool = False
    hosts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    routes: tuple[tuple[str, str], ...] = ()
    upstream_ca_files: tuple[str, ...] = ()
    admin_url: str | None = None
    admin_token: str | None = field(default=None, repr=False)
    dangerously_allow_non_loopback_admin: bool = False
    proxy_auth_token: str | None = field(default=None, repr=False)
    dangerously_allow_all_domains: bool = False
    credential_providers: tuple[CredentialProvider, ...] = ()
    audit_log: str | None = None
    limits: Limits = field(default_factory=Limits)
    otel: OtelConfig = field(default_factory=OtelConfig)
    profile: str = "full"
    sources: tuple[str, ...] = ()

    @property
    def allowed_patterns(self) -> tuple[str, ...]:
        return tuple(p for p, a in self.domains if a == Access.ALLOW)

    @property
    def denied_patterns(self) -> tuple[str, ...]:
        return tuple(p for p, a in self.domains if a == Access.DENY)

    @property
    def unix_sockets_enabled(self) -> bool:
        """Some unix socket may be used (§5.6): every listener is then forced to loopback."""
        return self.dangerously_allow_all_unix_sockets or any(
            a == Access.ALLOW for _, a in self.unix_sockets
        )

    @property
    def mitm_possible(self) -> bool:
        """Interception can happen (MITM not switched off)."""
        return self.mitm.enabled is not False

    def with_changes(self, **changes: Any) -> ProxyConfig:
        """A copy with `changes` applied (same keys as the constructor), validated again.

        Plain strings are accepted where the spec writes strings: ``mode="limited"``,
        ``domains=(("example.com", "allow"),)``.
        """
        from .loader import validate_config  # loader imports this module

        mode = changes.get("mode")
        if isinstance(mode, str) and mode in tuple(Mode):
            changes["mode"] = Mode(mode)  # anything else: validate_config names the bad value
        for key in ("domains", "unix_sockets"):
            if key in changes:
                changes[key] = tuple(
                    (p, Access(a) if a in ("allow", "deny") else a) for p, a in changes[key]
                )
        config = dataclasses.replace(self, **changes)
        validate_config(config)
        return config

    @classmethod
    def from_toml(cls, text: str, profile: str | None = None) -> ProxyConfig:
        """Parse one TOML document in the SPEC §2.1 shape and select `profile`."""
        from .loader import load_config_text

        return load_config_text(text, profile=profile)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data with secrets replaced by ``"***"``."""
        data = dataclasses.asdict(self)
        for key in ("admin_token", "proxy_auth_token"):
            if data.get(key):
                data[key] = "***"
        data["domains"] = {p: str(a) for p, a in self.domains}
        data["unix_sockets"] = {p: str(a) for p, a in self.unix_sockets}
        data["hosts"] = {h: list(ips) for h, ips in self.hosts}
        data["routes"] = dict(self.routes)
        data["mode"] = str(self.mode)
        return data
