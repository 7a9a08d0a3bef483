"""Plugin settings and per-test configuration (SPEC §14.2, §2.1).

`PluginSettings` is read once per process (CLI > ini > ``[tool.netproxy]`` > default).
`build_config` turns config overrides (the `netproxy_config` fixture, the marker's ``config=``,
`make_netproxy(**kw)`) into a validated `ProxyConfig`; `MarkerOptions.from_node` validates the
``@pytest.mark.netproxy`` keywords and names any it does not know.

Not here: starting proxies (``fixtures``), the handle tests touch (``handle``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

from netproxy_core import ConfigError, ProxyConfig, load_config
from netproxy_core.config.model import Access, Limits, MitmConfig, Mode

__all__ = [
    "MARKER_KEYWORDS",
    "MarkerOptions",
    "PluginSettings",
    "build_config",
    "suite_config",
]

MARKER_KEYWORDS: Final = (
    "allow",
    "deny",
    "mode",
    "profile",
    "allow_local_binding",
    "mitm",
    "socks5",
    "credentials",
    "config",
    "strict",
)
_CONFIG_KEYS: Final = frozenset(f.name for f in dataclasses.fields(ProxyConfig)) - {
    "profile",
    "sources",
}
_EXTRA_KEYS: Final = frozenset({"allow", "deny"})


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginSettings:
    """What the command line, ini file and ``pyproject.toml`` say for this run.

    Attributes:
        profile: ``--netproxy-profile`` / ini ``netproxy_profile`` (None: the file's default).
        config_paths: ``--netproxy-config`` / ini ``netproxy_config`` files, lowest first.
        documents: ``[tool.netproxy]`` of ``pyproject.toml`` when no config file is given.
        audit_log: ``--netproxy-audit-log`` (absolute) or None.
        strict: ``--netproxy-strict`` / ini ``netproxy_strict``.
    """

    profile: str | None = None
    config_paths: tuple[str, ...] = ()
    documents: tuple[tuple[dict[str, Any], str], ...] = ()
    audit_log: str | None = None
    strict: bool = False

    @classmethod
    def from_pytest(cls, config: pytest.Config) -> PluginSettings:
        """Read the options; a bad ``[tool.netproxy]`` is a `pytest.UsageError`."""
        profile = config.getoption("netproxy_profile") or config.getini("netproxy_profile") or None
        paths = [os.path.abspath(p) for p in config.getoption("netproxy_config") or ()]
        if not paths:
            paths = [os.fspath(p) for p in config.getini("netproxy_config")]
        documents: tuple[tuple[dict[str, Any], str], ...] = ()
        if not paths:
            documents = _pyproject_documents(config)
        audit_log = config.getoption("netproxy_audit_log") or config.getini("netproxy_audit_log")
        strict = bool(config.getoption("netproxy_strict")) or _ini_bool(config, "netproxy_strict")
        return cls(
            profile=str(profile) if profile else None,
            config_paths=tuple(paths),
            documents=documents,
            audit_log=os.path.abspath(audit_log) if audit_log else None,
            strict=strict,
        )

    @property
    def sources_label(self) -> str:
        return ", ".join([*self.config_paths, *(label for _, label in self.documents)]) or "none"


def _ini_bool(config: pytest.Config, name: str) -> bool:
    value = config.getini(name)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise pytest.UsageError(f"ini {name} must be true or false, not {value!r}")


def _pyproject_documents(config: pytest.Config) -> tuple[tuple[dict[str, Any], str], ...]:
    inipath = config.inipath
    path = inipath if inipath and inipath.name == "pyproject.toml" else None
    if path is None:
        candidate = Path(config.rootpath) / "pyproject.toml"
        path = candidate if candidate.is_file() else None
    if path is None:
        return ()
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise pytest.UsageError(f"netproxy: cannot read {path}: {exc}") from None
    table = doc.get("tool", {}).get("netproxy")
    if table is None:
        return ()
    if not isinstance(table, dict):
        raise pytest.UsageError(f"netproxy: [tool.netproxy] in {path} must be a table")
    return ((table, f"{path} [tool.netproxy]"),)


def suite_config(settings: PluginSettings, profile: str | None = None) -> ProxyConfig:
    """The suite's configuration for `profile` (default: the settings' profile).

    Raises:
        ConfigError: a bad file, key or profile name.
    """
    return load_config(
        settings.config_paths,
        profile=profile or settings.profile,
        documents=settings.documents,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkerOptions:
    """The merged ``@pytest.mark.netproxy(...)`` keywords of one test (closest mark wins;
    ``allow``/``deny`` lists accumulate)."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    mode: str | None = None
    profile: str | None = None
    allow_local_binding: bool | None = None
    mitm: bool | None = None
    socks5: bool | None = None
    credentials: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    strict: bool | None = None

    @classmethod
    def from_node(cls, node: pytest.Item) -> MarkerOptions:
        """Merge every ``netproxy`` mark on `node`.

        Raises:
            ValueError: positional arguments, unknown keywords (named), or values of the
                wrong type.
        """
        marks = list(node.iter_markers("netproxy"))
        values: dict[str, Any] = {}
        allow: list[str] = []
        deny: list[str] = []
        config: dict[str, Any] = {}
        credentials: dict[str, str] = {}
        for mark in reversed(marks):  # farthest first, so the closest mark wins
            if mark.args:
                raise ValueError(
                    "@pytest.mark.netproxy takes keywords only "
                    f"({', '.join(MARKER_KEYWORDS)}), got positional {mark.args!r}"
                )
            unknown = sorted(set(mark.kwargs) - set(MARKER_KEYWORDS))
            if unknown:
                raise ValueError(
                    _unknown_message(unknown, MARKER_KEYWORDS, "@pytest.mark.netproxy")
                )
            for key, value in mark.kwargs.items():
                if key in ("allow", "deny"):
                    target = allow if key == "allow" else deny
                    target.extend(_patterns(key, value))
                elif key == "config":
                    config.update(_mapping(key, value))
                elif key == "credentials":
                    credentials.update({str(k): str(v) for k, v in _mapping(key, value).items()})
                elif key in ("mode", "profile"):
                    if not isinstance(value, str):
                        raise ValueError(f"netproxy marker: {key} must be a string, not {value!r}")
                    values[key] = value
                else:
                    if not isinstance(value, bool):
                        raise ValueError(f"netproxy marker: {key} must be True or False")
                    values[key] = value
        return cls(
            allow=tuple(allow),
            deny=tuple(deny),
            credentials=credentials,
            config=config,
            **values,
        )

    def overrides(self) -> dict[str, Any]:
        """The marker as config overrides for `build_config` (precedence over the fixture)."""
        out: dict[str, Any] = dict(self.config)
        if self.allow:
            out["allow"] = [*out.get("allow", ()), *self.allow]
        if self.deny:
            out["deny"] = [*out.get("deny", ()), *self.deny]
        if self.mode is not None:
            out["mode"] = self.mode
        if self.allow_local_binding is not None:
            out["allow_local_binding"] = self.allow_local_binding
        if self.mitm is not None:
            out["mitm"] = self.mitm
        if self.socks5 is not None:
            out["enable_socks5"] = self.socks5
        return out


def _patterns(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"netproxy marker: {key} must be a list of patterns, not {value!r}")


def _mapping(key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"netproxy marker: {key} must be a dict, not {value!r}")
    return value


def _unknown_message(unknown: list[str], known: Iterable[str], where: str) -> str:
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(known), n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown keyword(s) for {where}: {', '.join(parts)}; known: {', '.join(known)}"


def build_config(base: ProxyConfig, *layers: Mapping[str, Any]) -> ProxyConfig:
    """Apply override layers (lowest first) to `base` and validate the result.

    Each layer maps `ProxyConfig` keys (SPEC §2.2 names) to values in their TOML shape or
    their typed shape: ``domains``/``unix_sockets`` as ``{pattern: "allow"|"deny"}``,
    ``routes`` as ``{"host[:port]": "ip:port"}``, ``hosts`` as ``{name: [ips]}``, ``mode`` as
    a string, ``mitm`` as a bool, ``limits`` as a dict. ``allow`` and ``deny`` (lists of
    patterns) add domain entries.

    Raises:
        ConfigError: an unknown key (named, with a suggestion) or a bad value.
    """
    config = base
    for layer in layers:
        changes: dict[str, Any] = {}
        unknown = sorted(set(layer) - _CONFIG_KEYS - _EXTRA_KEYS)
        if unknown:
            raise ConfigError(
                _unknown_message(unknown, sorted(_CONFIG_KEYS | _EXTRA_KEYS), "netproxy config"),
                key=unknown[0],
            )
        for key, value in layer.items():
            if key in _EXTRA_KEYS:
                continue
            changes[key] = _convert(config, key, value)
        domains = list(changes.pop("domains", config.domains))
        for access, key in ((Access.ALLOW, "allow"), (Access.DENY, "deny")):
            for pattern in _patterns(key, layer.get(key, ())):
                domains = [(p, a) for p, a in domains if p != pattern]
                domains.append((pattern, access))
        changes["domains"] = tuple(domains)
        config = config.with_changes(**changes)
    return config


def _convert(config: ProxyConfig, key: str, value: Any) -> Any:
    try:
        if key in ("domains", "unix_sockets"):
            items = value.items() if isinstance(value, Mapping) else value
            return tuple((str(p), Access(a)) for p, a in items)
        if key == "routes":
            items = value.items() if isinstance(value, Mapping) else value
            return tuple((str(t).lower(), str(d)) for t, d in items)
        if key == "hosts":
            items = value.items() if isinstance(value, Mapping) else value
            return tuple((str(h).lower(), tuple(str(ip) for ip in ips)) for h, ips in items)
        if key == "mode":
            return Mode(value)
        if key == "mitm" and isinstance(value, bool):
            return dataclasses.replace(config.mitm, enabled=value)
        if key == "mitm" and isinstance(value, Mapping):
            return dataclasses.replace(config.mitm, **value)
        if key == "mitm" and not isinstance(value, MitmConfig):
            raise TypeError("expected a bool or a mapping")
        if key == "limits" and isinstance(value, Mapping):
            return dataclasses.replace(config.limits, **value)
        if key == "limits" and not isinstance(value, Limits):
            raise TypeError("expected a mapping")
        if key == "upstream_ca_files":
            return tuple(os.fspath(p) for p in value)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"netproxy config: bad value for {key!r}: {exc}", key=key) from None
    return value
