"""TOML layering, profile selection and strict validation (SPEC §2).

Every user mistake becomes one `ConfigError` whose message names the key, its table and the
file, and suggests the closest known key. Raw dictionaries never leave this module.

Choices where the spec is silent (documented in docs/configuration.md):
- Top-level keys other than ``default_permissions`` and ``permissions`` are ignored, and so are
  keys of ``[permissions.<name>]`` other than ``network`` and ``extends``: a shared config file
  (for example a coding agent's) carries many unrelated settings. Inside a ``network`` table
  every key is checked.
- A ``domains`` value may also be ``"none"``: it removes an entry a lower layer added.
- ``mitm = true`` / ``false`` is accepted as shorthand for ``mitm.enabled``.
"""

from __future__ import annotations

import difflib
import logging
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from ..errors import ConfigError, InvalidHost
from ..hosts import canonicalize_host, format_host_port, parse_ip, split_host_port
from ..patterns import PatternKind, compile_pattern
from .addresses import parse_listen_addr
from .builtin import BUILTIN_PROFILES
from .model import (
    Access,
    CredentialProvider,
    Limits,
    MitmAction,
    MitmCa,
    MitmConfig,
    MitmHook,
    MitmInjectHeader,
    Mode,
    OtelConfig,
    ProxyConfig,
)

__all__ = ["load_config", "load_config_text", "validate_config"]

log = logging.getLogger("netproxy.config")

Raw = dict[str, Any]


class _Where:
    """Where a value sits: table name and file, for messages."""

    __slots__ = ("file", "table")

    def __init__(self, table: str, file: str) -> None:
        self.table, self.file = table, file

    def sub(self, key: str) -> _Where:
        return _Where(f"{self.table}.{_quote(key)}", self.file)

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(
            f"`{key}` in [{self.table}] of {self.file} {problem}", key=key, file=self.file
        )


def _quote(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else f'"{key}"'


# --- value checkers ---------------------------------------------------------------------


def _bool(value: Any, key: str, where: _Where) -> bool:
    if not isinstance(value, bool):
        raise where.error(key, f"must be true or false, not {_type(value)}")
    return value


def _str(value: Any, key: str, where: _Where) -> str:
    if not isinstance(value, str):
        raise where.error(key, f"must be a string, not {_type(value)}")
    return value


def _seconds(value: Any, key: str, where: _Where) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise where.error(key, "must be a positive number of seconds")
    return float(value)


def _count(value: Any, key: str, where: _Where) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise where.error(key, "must be a positive whole number")
    return value


def _str_list(value: Any, key: str, where: _Where) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise where.error(key, "must be a list of strings")
    return tuple(value)


def _table(value: Any, key: str, where: _Where) -> Raw:
    if not isinstance(value, dict):
        raise where.error(key, f"must be a table, not {_type(value)}")
    return value


def _type(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def _check_keys(table: Mapping[str, Any], known: Iterable[str], where: _Where) -> None:
    known = list(known)
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(
                f"unknown key `{key}` in [{where.table}] of {where.file}{hint}",
                key=key,
                file=where.file,
            )


# --- per-layer schema ---------------------------------------------------------------------

_SIMPLE: Final[dict[str, Callable[[Any, str, _Where], Any]]] = {
    "enabled": _bool,
    "proxy_url": _str,
    "enable_socks5": _bool,
    "socks_url": _str,
    "enable_socks5_udp": _bool,
    "allow_upstream_proxy": _bool,
    "dangerously_allow_non_loopback_proxy": _bool,
    "mode": _str,
    "allow_local_binding": _bool,
    "dangerously_allow_all_unix_sockets": _bool,
    "credential_broker": _bool,
    "dangerously_allow_plaintext_credential_injection": _bool,
    "upstream_ca_files": _str_list,
    "admin_url": _str,
    "admin_token": _str,
    "dangerously_allow_non_loopback_admin": _bool,
    "proxy_auth_token": _str,
    "dangerously_allow_all_domains": _bool,
    "audit_log": _str,
    "extends": _str,
}
_TABLES: Final = (
    "domains",
    "unix_sockets",
    "mitm",
    "hosts",
    "routes",
    "credential_providers",
    "limits",
    "otel",
)
NETWORK_KEYS: Final = (*_SIMPLE, *_TABLES)
_LIMIT_KEYS: Final = {f.name: f.type for f in Limits.__dataclass_fields__.values()}
_HOOK_KEYS: Final = ("host", "methods", "path_prefixes", "query", "headers", "action")
_ACTION_KEYS: Final = ("strip_request_headers", "inject_request_headers")
_INJECT_KEYS: Final = ("name", "secret_env_var", "secret_file", "prefix")
_PROVIDER_KEYS: Final = ("env", "hosts", "header", "scheme")
_SCHEMES: Final = ("bearer", "token", "basic", "raw")


def _check_network(table: Raw, where: _Where) -> None:
    """Type-check one layer's network table (values stay raw for merging)."""
    _check_keys(table, NETWORK_KEYS, where)
    for key, check in _SIMPLE.items():
        if key in table:
            check(table[key], key, where)
    if "mode" in table and table["mode"] not in ("full", "limited"):
        raise where.error("mode", f'must be "full" or "limited", not {table["mode"]!r}')
    for key in ("domains", "unix_sockets"):
        entries = _table(table.get(key, {}), key, where)
        for pattern, access in entries.items():
            if access not in ("allow", "deny", "none"):
                raise where.sub(key).error(pattern, 'must be "allow", "deny" or "none"')
        if key == "domains":
            _check_domains(entries, where.sub(key))
    _check_mitm(table.get("mitm", {}), where)
    for name, ips in _table(table.get("hosts", {}), "hosts", where).items():
        for ip in _str_list(ips, name, where.sub("hosts")):
            if parse_ip_text(ip) is None:
                raise where.sub("hosts").error(name, f"has {ip!r}, which is not an IP address")
    for target, dest in _table(table.get("routes", {}), "routes", where).items():
        _parse_route(target, _str(dest, target, where.sub("routes")), where.sub("routes"))
    for pid, spec in _table(
        table.get("credential_providers", {}), "credential_providers", where
    ).items():
        pwhere = where.sub("credential_providers").sub(pid)
        _check_keys(_table(spec, pid, where.sub("credential_providers")), _PROVIDER_KEYS, pwhere)
        for key in ("env", "hosts"):
            if not _str_list(spec.get(key, []), key, pwhere):
                raise pwhere.error(key, "must list at least one entry")
        if spec.get("scheme", "bearer") not in _SCHEMES:
            raise pwhere.error("scheme", f"must be one of {', '.join(_SCHEMES)}")
        _str(spec.get("header", "authorization"), "header", pwhere)
    limits = _table(table.get("limits", {}), "limits", where)
    _check_keys(limits, _LIMIT_KEYS, where.sub("limits"))
    for key, value in limits.items():
        checker = _count if key.startswith("max_") else _seconds
        checker(value, key, where.sub("limits"))
    otel = _table(table.get("otel", {}), "otel", where)
    _check_keys(otel, ("enabled", "endpoint", "protocol"), where.sub("otel"))
    if "enabled" in otel:
        _bool(otel["enabled"], "enabled", where.sub("otel"))


def _check_domains(entries: Raw, where: _Where) -> None:
    for pattern, access in entries.items():
        try:
            compiled = compile_pattern(pattern)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} in [{where.table}] of {where.file}", key=pattern, file=where.file
            ) from None
        if compiled.kind is PatternKind.GLOBAL and access == "deny":
            raise where.error(pattern, "is a global wildcard, which cannot be a deny entry")


def _check_mitm(value: Any, where: _Where) -> None:
    if isinstance(value, bool):
        return
    mitm = _table(value, "mitm", where)
    mwhere = where.sub("mitm")
    _check_keys(mitm, ("enabled", "hooks", "actions", "ca"), mwhere)
    if "enabled" in mitm:
        _bool(mitm["enabled"], "enabled", mwhere)
    if "ca" in mitm:
        ca = _table(mitm["ca"], "ca", mwhere)
        _check_keys(ca, ("certificate_file", "private_key_file"), mwhere.sub("ca"))
        for key in ("certificate_file", "private_key_file"):
            if key not in ca:
                raise mwhere.sub("ca").error(key, "is required")
            _str(ca[key], key, mwhere.sub("ca"))
    for name, hook in _table(mitm.get("hooks", {}), "hooks", mwhere).items():
        hwhere = mwhere.sub("hooks").sub(name)
        _check_keys(_table(hook, name, mwhere.sub("hooks")), _HOOK_KEYS, hwhere)
        for key in ("host", "methods", "path_prefixes", "action"):
            if key not in hook:
                raise hwhere.error(key, "is required")
        host = _str(hook["host"], "host", hwhere)
        if "*" in host or "?" in host:
            raise hwhere.error("host", "must be an exact host (no wildcard)")
        try:
            canonicalize_host(host)
        except InvalidHost as exc:
            raise hwhere.error("host", f"is not a valid host: {exc}") from None
        for key in ("methods", "path_prefixes", "action"):
            if not _str_list(hook[key], key, hwhere):
                raise hwhere.error(key, "must not be empty")
        for key in ("query", "headers"):
            for name2, values in _table(hook.get(key, {}), key, hwhere).items():
                _str_list(values, name2, hwhere.sub(key))
    for name, action in _table(mitm.get("actions", {}), "actions", mwhere).items():
        awhere = mwhere.sub("actions").sub(name)
        _check_keys(_table(action, name, mwhere.sub("actions")), _ACTION_KEYS, awhere)
        _str_list(action.get("strip_request_headers", []), "strip_request_headers", awhere)
        injects = action.get("inject_request_headers", [])
        if not isinstance(injects, list):
            raise awhere.error("inject_request_headers", "must be a list of tables")
        for item in injects:
            _check_inject(_table(item, "inject_request_headers", awhere), awhere)


def _check_inject(item: Raw, where: _Where) -> None:
    iwhere = where.sub("inject_request_headers")
    _check_keys(item, _INJECT_KEYS, iwhere)
    _str(item.get("name"), "name", iwhere)
    sources = [k for k in ("secret_env_var", "secret_file") if k in item]
    if len(sources) != 1:
        raise iwhere.error("secret_env_var", "or `secret_file`: exactly one must be given")
    value = _str(item[sources[0]], sources[0], iwhere)
    if sources[0] == "secret_file" and not os.path.isabs(value):
        raise iwhere.error("secret_file", "must be an absolute path")


def parse_ip_text(text: str) -> str | None:
    """Canonical IP literal or None."""
    try:
        host = canonicalize_host(text)
    except InvalidHost:
        return None
    return host if parse_ip(host) is not None else None


def _parse_route(target: str, dest: str, where: _Where) -> tuple[str, str]:
    try:
        host, port = split_host_port(target)
        canonical = canonicalize_host(host)
        key = canonical if port is None else format_host_port(canonical, port)
    except InvalidHost as exc:
        raise where.error(target, f"is not a valid host[:port]: {exc}") from None
    try:
        dhost, dport = split_host_port(dest)
    except InvalidHost:
        dhost, dport = dest, None
    ip = parse_ip_text(dhost)
    if ip is None or dport is None:
        raise where.error(target, f"must map to an IP:port, not {dest!r}")
    return key, f"[{ip}]:{dport}" if ":" in ip else f"{ip}:{dport}"


# --- merging and profiles -------------------------------------------------------------------

_WHOLESALE: Final = (("mitm", "hooks"), ("mitm", "actions"), ("credential_providers",))


def _merge(base: Raw, top: Raw, path: tuple[str, ...] = ()) -> Raw:
    out = dict(base)
    for key, value in top.items():
        if key == "mitm" and isinstance(value, bool):
            value = {"enabled": value}
        old = out.get(key)
        if key == "mitm" and isinstance(old, bool):
            old = {"enabled": old}
        if isinstance(value, dict) and isinstance(old, dict) and path not in _WHOLESALE:
            out[key] = _merge(old, value, (*path, key))
        else:
            out[key] = value
    return out


def _read_file(path: str | os.PathLike[str]) -> Raw:
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {name} does not exist", file=name) from None
    except IsADirectoryError:
        raise ConfigError(f"config file {name} is a directory", file=name) from None
    except PermissionError:
        raise ConfigError(f"config file {name} is not readable", file=name) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name} is not valid TOML: {exc}", file=name) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name} is not UTF-8 text", file=name) from None


def _profiles(doc: Raw, file: str) -> dict[str, Raw]:
    """Validate one document and return its profiles' network tables (with `extends`)."""
    default = doc.get("default_permissions")
    if default is not None and not isinstance(default, str):
        raise ConfigError(
            f"`default_permissions` in {file} must be a string",
            key="default_permissions",
            file=file,
        )
    for key in doc:
        if key in NETWORK_KEYS:
            raise ConfigError(
                f"`{key}` at the top level of {file} is not read; network keys belong in "
                f"[permissions.<profile>.network] (e.g. [permissions.workspace.network.{key}])",
                key=key,
                file=file,
            )
    perms = doc.get("permissions", {})
    if not isinstance(perms, dict):
        raise ConfigError(f"`permissions` in {file} must be a table", key="permissions", file=file)
    out: dict[str, Raw] = {}
    for name, profile in perms.items():
        where = _Where(f"permissions.{_quote(name)}", file)
        profile = _table(profile, name, _Where("permissions", file))
        network = dict(_table(profile.get("network", {}), "network", where))
        if "extends" in profile:
            network.setdefault("extends", _str(profile["extends"], "extends", where))
        _check_network(network, where.sub("network"))
        out[name] = network
    return out


def load_config(
    paths: Sequence[str | os.PathLike[str]] = (),
    *,
    profile: str | None = None,
    documents: Sequence[tuple[Raw, str]] = (),
) -> ProxyConfig:
    """Load config layers (later wins) and select a profile.

    Args:
        paths: TOML files, lowest precedence first.
        profile: the profile to select; default: the last ``default_permissions``, else
            ``full``.
        documents: already-parsed documents with a label (the plugin passes
            ``[tool.netproxy]`` this way), applied after `paths`.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key or profile, bad value.
    """
    layers = [(_read_file(p), os.fspath(p)) for p in paths] + list(documents)
    return _build(layers, profile)


def load_config_text(
    text: str, profile: str | None = None, *, source: str = "<string>"
) -> ProxyConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}", file=source) from None
    return _build([(doc, source)], profile)


def _build(layers: Sequence[tuple[Raw, str]], profile: str | None) -> ProxyConfig:
    merged: dict[str, Raw] = {}
    default: str | None = None
    for doc, file in layers:
        for name, network in _profiles(doc, file).items():
            merged[name] = _merge(merged.get(name, {}), network)
        default = doc.get("default_permissions", default)
    sources = tuple(file for _, file in layers)
    label = ", ".join(sources) or "the defaults"
    if default is not None and default not in merged and default not in BUILTIN_PROFILES:
        raise ConfigError(
            f"default_permissions names profile {default!r}, which {label} does not define",
            key="default_permissions",
            file=label,
        )
    name = profile or default or "full"
    if name in merged:
        raw = _resolve(name, merged, label)
    elif name in BUILTIN_PROFILES:
        # The overlay goes on the file's default profile: `default_permissions`, else the
        # file's own `full` profile when it defines one (SPEC §2.1).
        base_name = default or "full"
        base = _resolve(base_name, merged, label) if base_name in merged else {}
        raw = BUILTIN_PROFILES[name](base)
    else:
        known = sorted(set(merged) | set(BUILTIN_PROFILES))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown profile {name!r} (known: {', '.join(known)}){hint}", key=name, file=label
        )
    config = _to_config(raw, name, sources, label)
    validate_config(config)
    return config


def _resolve(
    name: str | None, profiles: Mapping[str, Raw], label: str, seen: tuple[str, ...] = ()
) -> Raw:
    assert name is not None
    if name in seen:
        chain = " → ".join((*seen, name))
        raise ConfigError(f"profile `extends` loop: {chain} in {label}", key="extends", file=label)
    raw = dict(profiles[name])
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if parent in profiles:
        base = _resolve(parent, profiles, label, (*seen, name))
    elif parent in BUILTIN_PROFILES:
        base = BUILTIN_PROFILES[parent]({})
    else:
        raise ConfigError(
            f"profile {name!r} extends unknown profile {parent!r} in {label}",
            key="extends",
            file=label,
        )
    return _merge(base, raw)


def _to_config(raw: Raw, profile: str, sources: tuple[str, ...], label: str) -> ProxyConfig:
    where = _Where(f"permissions.{profile}.network", label)
    mitm_raw = raw.get("mitm", {})
    if isinstance(mitm_raw, bool):
        mitm_raw = {"enabled": mitm_raw}
    routes = tuple(
        _parse_route(t, d, where.sub("routes")) for t, d in raw.get("routes", {}).items()
    )
    hosts: list[tuple[str, tuple[str, ...]]] = []
    for name, ips in raw.get("hosts", {}).items():
        try:
            canonical = canonicalize_host(name)
        except InvalidHost as exc:
            raise where.sub("hosts").error(name, f"is not a valid host: {exc}") from None
        if canonical == "localhost":
            log.warning(
                "ignoring `hosts` entry for localhost in %s: localhost always means "
                "127.0.0.1 and ::1",
                label,
            )
            continue
        addresses = tuple(a for a in (parse_ip_text(ip) for ip in _str_list(ips, name, where)) if a)
        hosts.append((canonical, addresses))
    limits = raw.get("limits", {})
    otel = raw.get("otel", {})
    return ProxyConfig(
        **{
            k: raw[k]
            for k in _SIMPLE
            if k in raw and k not in ("mode", "upstream_ca_files", "extends")
        },
        mode=Mode(raw.get("mode", "full")),
        upstream_ca_files=_str_list(raw.get("upstream_ca_files", []), "upstream_ca_files", where),
        domains=tuple((p, Access(a)) for p, a in raw.get("domains", {}).items() if a != "none"),
        unix_sockets=tuple(
            (p, Access(a)) for p, a in raw.get("unix_sockets", {}).items() if a != "none"
        ),
        mitm=MitmConfig(
            enabled=mitm_raw.get("enabled"),
            hooks=tuple(_to_hook(n, h) for n, h in mitm_raw.get("hooks", {}).items()),
            actions=tuple((n, _to_action(a)) for n, a in mitm_raw.get("actions", {}).items()),
            ca=MitmCa(**mitm_raw["ca"]) if "ca" in mitm_raw else None,
        ),
        hosts=tuple(hosts),
        routes=routes,
        credential_providers=tuple(
            CredentialProvider(
                id=pid,
                env=_as_tuple(p["env"]),
                hosts=_as_tuple(p["hosts"]),
                header=p.get("header", "authorization").lower(),
                scheme=p.get("scheme", "bearer"),
            )
            for pid, p in raw.get("credential_providers", {}).items()
        ),
        limits=_to_limits(limits),
        otel=OtelConfig(**otel),
        profile=profile,
        sources=sources,
    )


def _to_limits(raw: Raw) -> Limits:
    values: dict[str, Any] = {
        k: (int(v) if k.startswith("max_") else float(v)) for k, v in raw.items()
    }
    return Limits(**values)


def _as_tuple(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _to_hook(name: str, raw: Raw) -> MitmHook:
    return MitmHook(
        name=name,
        host=canonicalize_host(raw["host"]),
        methods=tuple(m.upper() for m in _as_tuple(raw["methods"])),
        path_prefixes=_as_tuple(raw["path_prefixes"]),
        action=_as_tuple(raw["action"]),
        query=tuple((k, _as_tuple(v)) for k, v in raw.get("query", {}).items()),
        headers=tuple((k.lower(), _as_tuple(v)) for k, v in raw.get("headers", {}).items()),
    )


def _to_action(raw: Raw) -> MitmAction:
    return MitmAction(
        strip_request_headers=tuple(
            h.lower() for h in _as_tuple(raw.get("strip_request_headers", []))
        ),
        inject_request_headers=tuple(
            MitmInjectHeader(**i) for i in raw.get("inject_request_headers", [])
        ),
    )


def validate_config(config: ProxyConfig) -> None:
    """Cross-key checks on a whole configuration (also run by `with_changes`).

    Raises:
        ConfigError: naming the key and the config's files.
    """
    label = ", ".join(config.sources) or "the configuration"
    where = _Where(f"permissions.{config.profile}.network", label)
    if not isinstance(config.mode, Mode):
        raise where.error("mode", f'must be "full" or "limited", not {config.mode!r}')
    for pattern, access in config.domains:
        if access not in (Access.ALLOW, Access.DENY):
            raise where.sub("domains").error(pattern, f'must be "allow" or "deny", not {access!r}')
        try:
            compiled = compile_pattern(pattern)
        except ConfigError as exc:
            raise ConfigError(f"{exc} in {label}", key=pattern, file=label) from None
        if compiled.kind is PatternKind.GLOBAL:
            if access == Access.DENY:
                raise where.sub("domains").error(
                    pattern, "is a global wildcard, which cannot be a deny entry"
                )
            if not config.dangerously_allow_all_domains:
                raise where.sub("domains").error(
                    pattern,
                    "allows every host; set `dangerously_allow_all_domains = true` to mean it",
                )
    if config.mitm.enabled is False:
        if config.credential_broker:
            raise where.error("credential_broker", "needs MITM, but `mitm.enabled = false`")
        if config.mitm.ca is not None:
            raise where.error("mitm.ca", "is set, but `mitm.enabled = false`")
    actions = dict(config.mitm.actions)
    for hook in config.mitm.hooks:
        for name in hook.action:
            if name not in actions:
                raise where.sub(f"mitm.hooks.{hook.name}").error(
                    "action", f"names {name!r}, which is not defined under mitm.actions"
                )
    for path, access in config.unix_sockets:
        if access == Access.ALLOW and (not path.startswith("/") or "\0" in path):
            raise where.sub("unix_sockets").error(path, "must be an absolute path without NUL")
    for key in ("proxy_url", "socks_url"):
        try:
            parse_listen_addr(getattr(config, key), 0)
        except ConfigError as exc:
            raise where.error(key, str(exc)) from None
    if config.admin_url is not None:
        try:
            parse_listen_addr(config.admin_url, 0)
        except ConfigError as exc:
            raise where.error("admin_url", str(exc)) from None
