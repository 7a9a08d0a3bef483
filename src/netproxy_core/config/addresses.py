"""Listener address parsing (SPEC §2.2 "Listener addresses"). Pure.

Accepted: ``host:port``, ``scheme://host:port[/path]``, ``[v6]:port``, a bare IPv6 literal,
``localhost`` (→ 127.0.0.1). Any other host name is an error: a listener never binds to what
a name happens to resolve to.
"""

from __future__ import annotations

from ..errors import ConfigError, InvalidHost
from ..hosts import canonicalize_host, parse_ip, split_host_port

__all__ = ["format_addr", "is_loopback_host", "parse_listen_addr"]


def parse_listen_addr(value: str, default_port: int) -> tuple[str, int]:
    """Return ``(ip, port)`` for a listener address.

    Raises:
        ConfigError: empty value, bad port, or a host name other than ``localhost``.
    """
    text = value.strip()
    if not text:
        raise ConfigError("listener address is empty")
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0].rpartition("@")[2]
    try:
        host, port = split_host_port(text)
        canonical = canonicalize_host(host) if host else ""
    except InvalidHost as exc:
        raise ConfigError(f"invalid listener address {value!r}: {exc}") from None
    if not canonical:
        raise ConfigError(f"listener address {value!r} has no host")
    if canonical == "localhost":
        canonical = "127.0.0.1"
    elif parse_ip(canonical) is None:
        raise ConfigError(
            f"listener address {value!r} names host {canonical!r}; use an IP address or localhost"
        )
    return canonical, default_port if port is None else port


def is_loopback_host(ip: str) -> bool:
    address = parse_ip(ip)
    return address is not None and address.is_loopback


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
