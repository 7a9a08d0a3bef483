"""Load config files: layering, profile selection, conversion to `ProxyConfig` (SPEC §2).

Every user mistake becomes one `ConfigError` whose message names the key, its table and the
file, and suggests the closest known key. Raw dictionaries never leave this module and
`schema.py`, which type-checks each layer's ``network`` table before it is merged.
Not here: per-key checks of one raw layer (`schema.py`); the built-in overlays (`builtin.py`).

Choices where the spec is silent (documented in docs/configuration.md):
- Top-level keys other than ``default_permissions`` and ``permissions`` are ignored, and so are
  keys of ``[permissions.<name>]`` other than ``network`` and ``extends``: a shared config file
  (for example a coding agent's) carries many unrelated settings. Inside a ``network`` table
  every key is checked.
- A ``domains`` value may also be ``"none"``: it removes an entry a lower layer added.
- ``mitm = true`` / ``false`` is accepted as shorthand for ``mitm.enabled``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ..errors import ConfigError, InvalidHost
from ..hosts import canonicalize_host
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
from .schema import NETWORK_KEYS as NETWORK_KEYS  # re-exported: importable from here as before
from .schema import (
    SIMPLE_KEYS,
    Raw,
    Where,
    check_network,
    check_str,
    check_str_list,
    check_table,
    hosts_entry,
    parse_route,
    quote_key,
    route_entry,
)
from .schema import parse_ip_text as parse_ip_text  # re-exported, as NETWORK_KEYS

__all__ = ["load_config", "load_config_text", "validate_config"]

log = logging.getLogger("netproxy.config")


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
    import tomllib  # only with config files: `serve` with flags alone starts without it

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
        where = Where(f"permissions.{quote_key(name)}", file)
        profile = check_table(profile, name, Where("permissions", file))
        network = dict(check_table(profile.get("network", {}), "network", where))
        if "extends" in profile:
            network.setdefault("extends", check_str(profile["extends"], "extends", where))
        check_network(network, where.sub("network"))
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
    import tomllib

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
        import difflib

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
    where = Where(f"permissions.{profile}.network", label)
    mitm_raw = raw.get("mitm", {})
    if isinstance(mitm_raw, bool):
        mitm_raw = {"enabled": mitm_raw}
    routes = tuple(parse_route(t, d, where.sub("routes")) for t, d in raw.get("routes", {}).items())
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
        addresses = tuple(
            a for a in (parse_ip_text(ip) for ip in check_str_list(ips, name, where)) if a
        )
        hosts.append((canonical, addresses))
    limits = raw.get("limits", {})
    otel = raw.get("otel", {})
    return ProxyConfig(
        **{
            k: raw[k]
            for k in SIMPLE_KEYS
            if k in raw and k not in ("mode", "upstream_ca_files", "extends")
        },
        mode=Mode(raw.get("mode", "full")),
        upstream_ca_files=check_str_list(
            raw.get("upstream_ca_files", []), "upstream_ca_files", where
        ),
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
    where = Where(f"permissions.{config.profile}.network", label)
    if not isinstance(config.mode, Mode):
        raise where.error("mode", f'must be "full" or "limited", not {config.mode!r}')
    try:
        for name, ips in config.hosts:
            hosts_entry(name, ips)
    except ValueError as exc:
        raise where.sub("hosts").error(name, str(exc)) from None
    try:
        for target, dest in config.routes:
            route_entry(target, dest)
    except ValueError as exc:
        raise where.sub("routes").error(target, str(exc)) from None
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
