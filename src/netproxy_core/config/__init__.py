"""Configuration: frozen model, TOML loader, built-in profiles (SPEC §2).

Names load on first use (PEP 562): importing `config.model` alone stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .addresses import format_addr, is_loopback_host, parse_listen_addr
    from .loader import load_config, load_config_text, validate_config
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

_LAZY: dict[str, str] = {
    "format_addr": "addresses",
    "is_loopback_host": "addresses",
    "parse_listen_addr": "addresses",
    "load_config": "loader",
    "load_config_text": "loader",
    "validate_config": "loader",
    **dict.fromkeys(
        (
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
        ),
        "model",
    ),
}

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
    "format_addr",
    "is_loopback_host",
    "load_config",
    "load_config_text",
    "parse_listen_addr",
    "validate_config",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
