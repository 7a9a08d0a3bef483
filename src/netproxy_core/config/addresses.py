"""Listener address parsing (SPEC §2.2 "Listener addresses"). Pure.

Accepted: ``host:port``, ``scheme://host:port[/path]``, ``[v6]:port``, a bare IPv6 literal,
``localhost`` (→ 127.0.0.1). Any other host name is an error: a listener never binds to what
a name happens to resolve to.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError, InvalidHost
from ..hosts import canonicalize_host, parse_ip, split_host_port

__all__ = ["bind_addr", "format_addr", "is_loopback_host", "parse_listen_addr"]


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


log = logging.getLogger("netproxy.proxy")


def bind_addr(
    value: str,
    default_port: int,
    *,
    what: str,
    allow_non_loopback: bool,
    flag: str,
    unix: bool,
    warn: bool = True,
) -> tuple[str, int]:
    """Where a listener binds: `value` parsed, clamped to 127.0.0.1 (same port, with a warning)
    unless it is loopback or `allow_non_loopback` is set — and always clamped when unix
    sockets are enabled (SPEC §5.6).

    Args:
        what: the listener, for the warning ("listener", "admin API").
        flag: the config key that would keep a non-loopback address.
        unix: unix-socket forwarding is enabled.
        warn: log the clamping (off for a dry run that the real bind repeats).
    """
    host, port = parse_listen_addr(value, default_port)
    if not is_loopback_host(host) and (unix or not allow_non_loopback):
        if not warn:
            return "127.0.0.1", port
        log.warning(
            "%s address %s is not loopback; binding 127.0.0.1:%d instead%s",
            what,
            format_addr(host, port),
            port,
            " (unix sockets are enabled)" if unix else f" (set {flag} to keep it)",
        )
        host = "127.0.0.1"
    return host, port


def is_loopback_host(ip: str) -> bool:
    address = parse_ip(ip)
    return address is not None and address.is_loopback


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
