"""Upstream proxy chaining from the proxy process's own environment (SPEC §5.8).

Secure targets use ``HTTPS_PROXY``, then ``HTTP_PROXY``, then ``ALL_PROXY``; plain ones
``HTTP_PROXY`` then ``ALL_PROXY``; upper case before lower case; only ``http://`` values.
Loopback literals, ``localhost`` and routed targets are dialled directly, and so is anything
the process's ``NO_PROXY`` matches (curl's rules). Policy is decided before routing.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc
import h11

from ..errors import UpstreamError
from ..hosts import format_host_port, parse_ip
from .dial import dial_addresses, upstream_errors

__all__ = ["UpstreamProxies", "UpstreamProxy", "open_connect_tunnel"]

log = logging.getLogger("netproxy.proxy")


@dataclass(frozen=True, slots=True)
class UpstreamProxy:
    host: str
    port: int
    authorization: bytes | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"upstream proxy {format_host_port(self.host, self.port)}"


def _parse(value: str) -> UpstreamProxy | None:
    value = value.strip()
    if not value:
        return None
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme.lower() != "http" or not parts.hostname:
        return None
    auth = None
    if parts.username is not None:
        creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = b"Basic " + base64.b64encode(creds.encode())
    try:
        port = parts.port or 80
    except ValueError:
        return None
    return UpstreamProxy(parts.hostname, port, auth)


def _first(env: Mapping[str, str], *names: str) -> UpstreamProxy | None:
    """The first usable value: empty, unparsable and non-HTTP values (``socks5://``) are
    skipped, so a SOCKS ``ALL_PROXY`` or an empty ``HTTPS_PROXY`` does not hide the next one."""
    for name in names:
        for key in (name.upper(), name.lower()):
            proxy = _parse(env.get(key, ""))
            if proxy is not None:
                return proxy
            if env.get(key, "").strip():
                log.warning("ignoring %s: not an http:// proxy URL", key)
    return None


@dataclass(frozen=True, slots=True)
class UpstreamProxies:
    """The chaining decision for one proxy process (empty = always direct)."""

    secure: UpstreamProxy | None = None
    plain: UpstreamProxy | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> UpstreamProxies:
        env = os.environ if env is None else env
        no_proxy = env.get("NO_PROXY", env.get("no_proxy", ""))
        return cls(
            secure=_first(env, "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"),
            plain=_first(env, "HTTP_PROXY", "ALL_PROXY"),
            no_proxy=tuple(e.strip().lower() for e in no_proxy.split(",") if e.strip()),
        )

    def proxy_for(self, host: str, *, secure: bool, routed: bool) -> UpstreamProxy | None:
        """The upstream proxy to use for a destination, or None to dial directly."""
        proxy = self.secure if secure else self.plain
        if proxy is None or routed or host == "localhost" or host.endswith(".localhost"):
            return None
        ip = parse_ip(host)
        if ip is not None and ip.is_loopback:
            return None
        if self._bypassed(host):
            return None
        return proxy

    def _bypassed(self, host: str) -> bool:
        for entry in self.no_proxy:
            if entry == "*":
                return True
            entry = entry.lstrip(".")
            if entry.startswith("[") and entry.endswith("]"):
                entry = entry[1:-1]
            if host == entry or host.endswith("." + entry):
                return True
        return False


async def open_connect_tunnel(
    proxy: UpstreamProxy, host: str, port: int, *, timeout: float
) -> anyio.abc.SocketStream:
    """Dial `proxy` and ask it for a CONNECT tunnel to ``host:port``.

    Raises:
        UpstreamError: the proxy is unreachable or refuses (502), or times out (504).
    """
    stream = await dial_addresses([proxy.host], proxy.port, timeout=timeout, label=proxy.label)
    target = format_host_port(host, port).encode("ascii")
    conn = h11.Connection(h11.CLIENT)
    headers = [(b"host", target)]
    if proxy.authorization:
        headers.append((b"proxy-authorization", proxy.authorization))
    try:
        with upstream_errors(proxy.label), anyio.fail_after(timeout):
            await stream.send(
                conn.send(h11.Request(method=b"CONNECT", target=target, headers=headers))
            )
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive())
                    continue
                break
    except BaseException:
        await stream.aclose()
        raise
    if not isinstance(event, h11.Response) or not 200 <= event.status_code < 300:
        await stream.aclose()
        status = getattr(event, "status_code", "no response")
        raise UpstreamError(f"{proxy.label} refused CONNECT {target.decode()}: {status}")
    leftover, _closed = conn.trailing_data
    if leftover:
        await stream.aclose()
        raise UpstreamError(f"{proxy.label} sent bytes before the tunnel opened")
    return stream
