"""Live policy state: the config in force and its compiled rules (SPEC §2.1 runtime layer).

The only mutable shared state of a proxy. Changes (`allow`, `deny`, `set_mode`, `reload`)
build a new validated `ProxyConfig`, compile it, and swap both in one assignment, so a
request always sees one consistent rule set.
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
    """Holds (`config`, `rules`) and applies runtime changes atomically."""

    __slots__ = ("_lock", "_pair")

    def __init__(self, config: ProxyConfig) -> None:
        self._pair = (config, Rules.from_config(config))
        self._lock = threading.Lock()

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
        """Swap in a whole new configuration (reload)."""
        rules = Rules.from_config(config)
        with self._lock:
            self._pair = (config, rules)

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
            config = self._pair[0].with_changes(mode=value)
            self._pair = (config, Rules.from_config(config))
        log.info("network mode set to %s", value)

    def set_enabled(self, enabled: bool) -> None:
        with self._lock:
            config = self._pair[0].with_changes(enabled=enabled)
            self._pair = (config, Rules.from_config(config))

    def _upsert(self, patterns: Iterable[str], access: Access) -> None:
        for pattern in patterns:
            compile_pattern(pattern)  # raises ConfigError naming the entry
        with self._lock:
            config = self._pair[0]
            domains = list(config.domains)
            for pattern in patterns:
                key = _normal(pattern)
                domains = [(p, a) for p, a in domains if _normal(p) != key]
                domains.append((pattern.strip(), access))
            config = config.with_changes(domains=tuple(domains))
            self._pair = (config, Rules.from_config(config))


def _normal(pattern: str) -> str:
    text = pattern.strip()
    try:
        return canonicalize_host(text) if "*" not in text and "?" not in text else text.lower()
    except InvalidHost:
        return text.lower()
