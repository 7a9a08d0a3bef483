"""Live policy state: the config in force and its compiled rules (SPEC §2.1 runtime layer).

The only mutable shared state of a proxy. The configuration in force is the loaded (base)
configuration with the runtime layer on top — `allow`, `deny`, `set_mode`, `set_enabled`
(the library API and the admin API) — so a reload of the files keeps runtime changes, which
sit highest in the SPEC §2.1 precedence. Every change builds a new validated `ProxyConfig`,
compiles it, and swaps both in one assignment, so a request always sees one consistent rule
set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from .config.model import Access, Mode, ProxyConfig
from .errors import ConfigError, InvalidHost
from .hosts import canonicalize_host
from .patterns import compile_pattern
from .policy.engine import Rules

__all__ = ["RuntimeState"]

log = logging.getLogger("netproxy.proxy")


class RuntimeState:
    """Holds (`config`, `rules`) = base config + runtime layer, swapped atomically."""

    __slots__ = ("_base", "_domains", "_enabled", "_lock", "_mode", "_pair")

    def __init__(self, config: ProxyConfig) -> None:
        self._lock = threading.Lock()
        self._base = config
        self._domains: list[tuple[str, Access]] = []
        self._mode: Mode | None = None
        self._enabled: bool | None = None
        self._pair = (config, Rules.from_config(config))

    def __repr__(self) -> str:
        config = self.config
        return (
            f"<RuntimeState mode={config.mode} allow={list(config.allowed_patterns)} "
            f"deny={list(config.denied_patterns)}>"
        )

    @property
    def config(self) -> ProxyConfig:
        return self._pair[0]

    @property
    def rules(self) -> Rules:
        return self._pair[1]

    def replace(self, config: ProxyConfig) -> None:
        """Swap in a new base configuration (reload); the runtime layer stays on top."""
        with self._lock:
            self._swap(config, self._domains, self._mode, self._enabled)

    def allow(self, *patterns: str) -> None:
        self._upsert(patterns, Access.ALLOW)

    def deny(self, *patterns: str) -> None:
        self._upsert(patterns, Access.DENY)

    def set_mode(self, mode: str | Mode) -> None:
        try:
            value = Mode(mode)
        except ValueError:
            raise ConfigError(
                f'mode must be "full" or "limited", not {mode!r}', key="mode"
            ) from None
        with self._lock:
            self._swap(self._base, self._domains, value, self._enabled)
        log.info("network mode set to %s", value)

    def set_enabled(self, enabled: bool) -> None:
        with self._lock:
            self._swap(self._base, self._domains, self._mode, enabled)

    def _upsert(self, patterns: Iterable[str], access: Access) -> None:
        entries = [(p.strip(), access) for p in patterns]
        for pattern, _ in entries:
            compile_pattern(pattern)  # raises ConfigError naming the entry
        with self._lock:
            self._swap(self._base, [*self._domains, *entries], self._mode, self._enabled)

    def _swap(
        self,
        base: ProxyConfig,
        domains: list[tuple[str, Access]],
        mode: Mode | None,
        enabled: bool | None,
    ) -> None:
        """Validate base + runtime layer, then commit all of it (or nothing)."""
        merged = list(base.domains)
        for pattern, access in domains:
            key = _normal(pattern)
            merged = [(p, a) for p, a in merged if _normal(p) != key]
            merged.append((pattern, access))
        changes: dict[str, object] = {"domains": tuple(merged)}
        if mode is not None:
            changes["mode"] = mode
        if enabled is not None:
            changes["enabled"] = enabled
        config = base.with_changes(**changes)
        self._pair = (config, Rules.from_config(config))
        self._base, self._domains, self._mode, self._enabled = base, domains, mode, enabled


def _normal(pattern: str) -> str:
    text = pattern.strip()
    if "*" in text or "?" in text:
        return text.lower()
    try:
        return canonicalize_host(text)
    except InvalidHost:
        return text.lower()
