"""Idle plain-HTTP origin connections, kept for the next client connection (SPEC §16).

A client that opens a connection per request would otherwise cost the proxy an origin dial
per request too. When a fast-path client connection ends, its idle, reusable origin
connection is parked here under the same key the connection was reused by
(scheme, host, port, the checked addresses) and the compiled rules it was opened under; the
next request for that key — decided by the policy like every request — takes it.

Bounds: at most `PER_KEY` idle connections per key and `TOTAL` in all, each closed after
`IDLE_SECONDS` unused, when the origin closes or speaks out of turn, on a rule change (the
rules must be the very ones it was opened under), and when the proxy stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Final, Protocol

__all__ = ["IDLE_SECONDS", "OriginPool", "Poolable"]

PER_KEY: Final = 16
TOTAL: Final = 256
IDLE_SECONDS: Final = 5.0  # well under the usual origin keep-alive (nginx: 75 s)


class Poolable(Protocol):
    """An idle origin connection: can be closed, and says whether it is still usable."""

    rules: object  # the compiled rules it was opened under

    def usable(self) -> bool: ...

    def close(self) -> None: ...


class OriginPool:
    """Idle origin connections by key; all methods run on the event loop."""

    def __init__(self) -> None:
        self._idle: dict[Hashable, list[tuple[Poolable, asyncio.TimerHandle]]] = {}
        self._count = 0
        self._closed = False

    def __len__(self) -> int:
        return self._count

    def take(self, key: Hashable, rules: object) -> Poolable | None:
        """The most recently parked usable connection for `key` under `rules`, if any."""
        parked = self._idle.get(key)
        while parked:
            link, timer = parked.pop()
            self._count -= 1
            timer.cancel()
            if link.usable() and link.rules is rules:
                if not parked:
                    del self._idle[key]
                return link
            link.close()
        self._idle.pop(key, None)
        return None

    def give(self, key: Hashable, link: Poolable) -> bool:
        """Park `link`; False when it cannot be kept (the caller closes it)."""
        parked = self._idle.setdefault(key, [])
        if self._closed or not link.usable() or self._count >= TOTAL or len(parked) >= PER_KEY:
            if not parked:
                del self._idle[key]
            return False
        timer = asyncio.get_running_loop().call_later(IDLE_SECONDS, self.discard, key, link)
        parked.append((link, timer))
        self._count += 1
        return True

    def discard(self, key: Hashable, link: Poolable) -> None:
        """Close and forget a parked connection (idle too long, closed or spoke by the origin)."""
        parked = self._idle.get(key, [])
        for i, (held, timer) in enumerate(parked):
            if held is link:
                del parked[i]
                self._count -= 1
                timer.cancel()
                link.close()
                break
        if not parked:
            self._idle.pop(key, None)

    def close(self) -> None:
        """Close every parked connection; nothing is parked afterwards (proxy shutdown)."""
        self._closed = True
        for parked in self._idle.values():
            for link, timer in parked:
                timer.cancel()
                link.close()
        self._idle.clear()
        self._count = 0

    def reopen(self) -> None:
        """Accept connections again (a proxy may be run again after a shutdown)."""
        self._closed = False
