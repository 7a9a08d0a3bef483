"""Built-in profiles `full`, `limited`, `offline` as overlays on a raw profile (SPEC §2.1).

Each overlay takes the file's default profile (or ``{}``) and returns the profile to use, so
``--profile limited`` means "the same policy, read-only".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = ["BUILTIN_PROFILES"]

Raw = dict[str, Any]


def _full(base: Raw) -> Raw:
    return {**base, "mode": "full"}


def _limited(base: Raw) -> Raw:
    mitm = base.get("mitm", {})
    mitm = {"enabled": mitm} if isinstance(mitm, bool) else dict(mitm)
    mitm["enabled"] = True
    return {**base, "mode": "limited", "mitm": mitm}


def _offline(base: Raw) -> Raw:
    domains = {p: a for p, a in base.get("domains", {}).items() if a != "allow"}
    return {**base, "domains": domains, "enable_socks5": False}


BUILTIN_PROFILES: Final[Mapping[str, Callable[[Raw], Raw]]] = {
    "full": _full,
    "limited": _limited,
    "offline": _offline,
}
