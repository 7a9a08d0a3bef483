"""Configuration: frozen model, TOML loader, built-in profiles (SPEC §2)."""

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
