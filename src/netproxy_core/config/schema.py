"""Per-layer type and key checking of one raw ``network`` table (SPEC §2.2).

Each check raises one `ConfigError` naming the key, its table and the file, and suggests the
closest known key; values stay raw so that layers can still be merged.
Not here: reading files, layering, profiles and conversion to `ProxyConfig` (`loader.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from ..errors import ConfigError, InvalidHost
from ..hosts import canonicalize_host, format_host_port, parse_ip, split_host_port
from ..patterns import PatternKind, compile_pattern
from .model import Limits

__all__ = [
    "NETWORK_KEYS",
    "SIMPLE_KEYS",
    "Raw",
    "Where",
    "check_network",
    "check_str",
    "check_str_list",
    "check_table",
    "hosts_entry",
    "parse_ip_text",
    "parse_route",
    "quote_key",
    "route_entry",
]

Raw = dict[str, Any]


class Where:
    """Where a value sits: table name and file, for messages."""

    __slots__ = ("file", "table")

    def __init__(self, table: str, file: str) -> None:
        self.table, self.file = table, file

    def sub(self, key: str) -> Where:
        return Where(f"{self.table}.{quote_key(key)}", self.file)

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(
            f"`{key}` in [{self.table}] of {self.file} {problem}", key=key, file=self.file
        )


def quote_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else f'"{key}"'


# --- value checkers ---------------------------------------------------------------------


def _bool(value: Any, key: str, where: Where) -> bool:
    if not isinstance(value, bool):
        raise where.error(key, f"must be true or false, not {_type(value)}")
    return value


def check_str(value: Any, key: str, where: Where) -> str:
    if not isinstance(value, str):
        raise where.error(key, f"must be a string, not {_type(value)}")
    return value


def _seconds(value: Any, key: str, where: Where) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise where.error(key, "must be a positive number of seconds")
    return float(value)


def _count(value: Any, key: str, where: Where) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise where.error(key, "must be a positive whole number")
    return value


def check_str_list(value: Any, key: str, where: Where) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise where.error(key, "must be a list of strings")
    return tuple(value)


def check_table(value: Any, key: str, where: Where) -> Raw:
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


def _check_keys(table: Mapping[str, Any], known: Iterable[str], where: Where) -> None:
    known = list(known)
    for key in table:
        if key not in known:
            import difflib  # only for the error message

            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(
                f"unknown key `{key}` in [{where.table}] of {where.file}{hint}",
                key=key,
                file=where.file,
            )


# --- per-layer schema ---------------------------------------------------------------------

_SIMPLE: Final[dict[str, Callable[[Any, str, Where], Any]]] = {
    "enabled": _bool,
    "proxy_url": check_str,
    "enable_socks5": _bool,
    "socks_url": check_str,
    "enable_socks5_udp": _bool,
    "allow_upstream_proxy": _bool,
    "dangerously_allow_non_loopback_proxy": _bool,
    "mode": check_str,
    "allow_local_binding": _bool,
    "dangerously_allow_all_unix_sockets": _bool,
    "credential_broker": _bool,
    "dangerously_allow_plaintext_credential_injection": _bool,
    "upstream_ca_files": check_str_list,
    "admin_url": check_str,
    "admin_token": check_str,
    "dangerously_allow_non_loopback_admin": _bool,
    "proxy_auth_token": check_str,
    "dangerously_allow_all_domains": _bool,
    "audit_log": check_str,
    "extends": check_str,
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
SIMPLE_KEYS: Final = tuple(_SIMPLE)
NETWORK_KEYS: Final = (*_SIMPLE, *_TABLES)
_LIMIT_KEYS: Final = {f.name: f.type for f in Limits.__dataclass_fields__.values()}
_HOOK_KEYS: Final = ("host", "methods", "path_prefixes", "query", "headers", "action")
_ACTION_KEYS: Final = ("strip_request_headers", "inject_request_headers")
_INJECT_KEYS: Final = ("name", "secret_env_var", "secret_file", "prefix")
_PROVIDER_KEYS: Final = ("env", "hosts", "header", "scheme")
_SCHEMES: Final = ("bearer", "token", "basic", "raw")


def check_network(table: Raw, where: Where) -> None:
    """Type-check one layer's network table (values stay raw for merging)."""
    _check_keys(table, NETWORK_KEYS, where)
    for key, check in _SIMPLE.items():
        if key in table:
            check(table[key], key, where)
    if "mode" in table and table["mode"] not in ("full", "limited"):
        raise where.error("mode", f'must be "full" or "limited", not {table["mode"]!r}')
    for key in ("domains", "unix_sockets"):
        entries = check_table(table.get(key, {}), key, where)
        for pattern, access in entries.items():
            if access not in ("allow", "deny", "none"):
                raise where.sub(key).error(pattern, 'must be "allow", "deny" or "none"')
        if key == "domains":
            _check_domains(entries, where.sub(key))
    _check_mitm(table.get("mitm", {}), where)
    for name, ips in check_table(table.get("hosts", {}), "hosts", where).items():
        for ip in check_str_list(ips, name, where.sub("hosts")):
            if parse_ip_text(ip) is None:
                raise where.sub("hosts").error(name, f"has {ip!r}, which is not an IP address")
    for target, dest in check_table(table.get("routes", {}), "routes", where).items():
        parse_route(target, check_str(dest, target, where.sub("routes")), where.sub("routes"))
    for pid, spec in check_table(
        table.get("credential_providers", {}), "credential_providers", where
    ).items():
        pwhere = where.sub("credential_providers").sub(pid)
        _check_keys(
            check_table(spec, pid, where.sub("credential_providers")), _PROVIDER_KEYS, pwhere
        )
        for key in ("env", "hosts"):
            if not check_str_list(spec.get(key, []), key, pwhere):
                raise pwhere.error(key, "must list at least one entry")
        if spec.get("scheme", "bearer") not in _SCHEMES:
            raise pwhere.error("scheme", f"must be one of {', '.join(_SCHEMES)}")
        check_str(spec.get("header", "authorization"), "header", pwhere)
    limits = check_table(table.get("limits", {}), "limits", where)
    _check_keys(limits, _LIMIT_KEYS, where.sub("limits"))
    for key, value in limits.items():
        checker = _count if key.startswith("max_") else _seconds
        checker(value, key, where.sub("limits"))
    otel = check_table(table.get("otel", {}), "otel", where)
    _check_keys(otel, ("enabled", "endpoint", "protocol"), where.sub("otel"))
    if "enabled" in otel:
        _bool(otel["enabled"], "enabled", where.sub("otel"))


def _check_domains(entries: Raw, where: Where) -> None:
    for pattern, access in entries.items():
        try:
            compiled = compile_pattern(pattern)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} in [{where.table}] of {where.file}", key=pattern, file=where.file
            ) from None
        if compiled.kind is PatternKind.GLOBAL and access == "deny":
            raise where.error(pattern, "is a global wildcard, which cannot be a deny entry")


def _check_mitm(value: Any, where: Where) -> None:
    if isinstance(value, bool):
        return
    mitm = check_table(value, "mitm", where)
    mwhere = where.sub("mitm")
    _check_keys(mitm, ("enabled", "hooks", "actions", "ca"), mwhere)
    if "enabled" in mitm:
        _bool(mitm["enabled"], "enabled", mwhere)
    if "ca" in mitm:
        ca = check_table(mitm["ca"], "ca", mwhere)
        _check_keys(ca, ("certificate_file", "private_key_file"), mwhere.sub("ca"))
        for key in ("certificate_file", "private_key_file"):
            if key not in ca:
                raise mwhere.sub("ca").error(key, "is required")
            check_str(ca[key], key, mwhere.sub("ca"))
    for name, hook in check_table(mitm.get("hooks", {}), "hooks", mwhere).items():
        hwhere = mwhere.sub("hooks").sub(name)
        _check_keys(check_table(hook, name, mwhere.sub("hooks")), _HOOK_KEYS, hwhere)
        for key in ("host", "methods", "path_prefixes", "action"):
            if key not in hook:
                raise hwhere.error(key, "is required")
        host = check_str(hook["host"], "host", hwhere)
        if "*" in host or "?" in host:
            raise hwhere.error("host", "must be an exact host (no wildcard)")
        try:
            canonicalize_host(host)
        except InvalidHost as exc:
            raise hwhere.error("host", f"is not a valid host: {exc}") from None
        for key in ("methods", "path_prefixes", "action"):
            if not check_str_list(hook[key], key, hwhere):
                raise hwhere.error(key, "must not be empty")
        for key in ("query", "headers"):
            for name2, values in check_table(hook.get(key, {}), key, hwhere).items():
                check_str_list(values, name2, hwhere.sub(key))
    for name, action in check_table(mitm.get("actions", {}), "actions", mwhere).items():
        awhere = mwhere.sub("actions").sub(name)
        _check_keys(check_table(action, name, mwhere.sub("actions")), _ACTION_KEYS, awhere)
        check_str_list(action.get("strip_request_headers", []), "strip_request_headers", awhere)
        injects = action.get("inject_request_headers", [])
        if not isinstance(injects, list):
            raise awhere.error("inject_request_headers", "must be a list of tables")
        for item in injects:
            _check_inject(check_table(item, "inject_request_headers", awhere), awhere)


def _check_inject(item: Raw, where: Where) -> None:
    iwhere = where.sub("inject_request_headers")
    _check_keys(item, _INJECT_KEYS, iwhere)
    check_str(item.get("name"), "name", iwhere)
    sources = [k for k in ("secret_env_var", "secret_file") if k in item]
    if len(sources) != 1:
        raise iwhere.error("secret_env_var", "or `secret_file`: exactly one must be given")
    value = check_str(item[sources[0]], sources[0], iwhere)
    if sources[0] == "secret_file" and not os.path.isabs(value):
        raise iwhere.error("secret_file", "must be an absolute path")


def parse_ip_text(text: str) -> str | None:
    """Canonical IP literal or None."""
    try:
        host = canonicalize_host(text)
    except InvalidHost:
        return None
    return host if parse_ip(host) is not None else None


def route_entry(target: str, dest: str) -> tuple[str, str]:
    """One canonical `routes` entry, ``host[:port]`` → ``ip:port`` (config file and flag).

    Raises:
        ValueError: saying what is wrong with the entry.
    """
    try:
        host, port = split_host_port(target)
        canonical = canonicalize_host(host)
        key = canonical if port is None else format_host_port(canonical, port)
    except InvalidHost as exc:
        raise ValueError(f"is not a valid host[:port]: {exc}") from None
    try:
        dhost, dport = split_host_port(dest)
    except InvalidHost:
        dhost, dport = dest, None
    if dport is None and dest.count(":") > 1:  # unbracketed IPv6 with a port: "::1:8443"
        head, _, tail = dest.rpartition(":")
        if tail.isdigit() and parse_ip_text(head) is not None:
            dhost, dport = head, int(tail)
    ip = parse_ip_text(dhost)
    if ip is None or dport is None:
        raise ValueError(f"must map to an IP:port, not {dest!r}")
    return key, format_host_port(ip, dport)


def hosts_entry(name: str, ips: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """One canonical `hosts` entry, name → IP literals (config file and flag).

    Raises:
        ValueError: saying what is wrong with the entry.
    """
    try:
        canonical = canonicalize_host(name)
    except InvalidHost as exc:
        raise ValueError(f"is not a valid host: {exc}") from None
    addresses = []
    for ip in ips:
        address = parse_ip_text(ip.strip())
        if address is None:
            raise ValueError(f"has {ip!r}, which is not an IP address")
        addresses.append(address)
    return canonical, tuple(addresses)


def parse_route(target: str, dest: str, where: Where) -> tuple[str, str]:
    try:
        return route_entry(target, dest)
    except ValueError as exc:
        raise where.error(target, str(exc)) from None
