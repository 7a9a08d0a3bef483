"""DNS with a deadline, failing closed (SPEC §4.2 step 5).

`Resolver.resolve` returns every address a name has, or ``()`` on failure or timeout: the
policy turns an empty answer into `not_allowed_local`. Static `hosts` entries are consulted
by the caller first.
"""

from __future__ import annotations

import ipaddress
import socket

import anyio

from ..hosts import IPAddress

__all__ = ["Resolver"]


class Resolver:
    """Resolves allowed names; one per proxy so tests can substitute answers."""

    def __init__(self, *, timeout: float = 2.0) -> None:
        self.timeout = timeout

    async def resolve(self, host: str, port: int) -> tuple[IPAddress, ...]:
        try:
            with anyio.fail_after(self.timeout):
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (TimeoutError, OSError, UnicodeError):
            return ()
        seen: dict[IPAddress, None] = {}
        for _family, _type, _proto, _name, sockaddr in infos:
            text = str(sockaddr[0])
            try:
                seen[ipaddress.ip_address(text.partition("%")[0])] = None
            except ValueError:
                return ()  # an answer we cannot classify: fail closed
        return tuple(seen)
