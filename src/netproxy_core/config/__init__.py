"""Configuration: frozen model, TOML loader, built-in profiles (SPEC §2).

Names load on first use (PEP 562): importing `config.model` alone stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)
