"""The `NetproxyError` tree; each class carries the data needed to render it.

Blame picks the class: `ConfigError` (the user's configuration), `InvalidHost` (a host
name that fails canonicalisation, SPEC §3.1), `ClientProtocolError` (the client sent bytes
we refuse), `UpstreamError` (the origin failed: 502, or 504 on timeout). A policy denial is
not an exception: it is a `NetworkDecision` value.

Every class is picklable (``args == (message,)``; extra data keyword-only with defaults), so
errors cross xdist workers and threads intact.
"""

from __future__ import annotations

__all__ = [
    "ClientProtocolError",
    "ConfigError",
    "InvalidHost",
    "NetproxyError",
    "UpstreamError",
]


class NetproxyError(Exception):
    """Base of every error netproxy raises on purpose."""


class ConfigError(NetproxyError):
    """A configuration key, value, file or flag is wrong; the message names it.

    Attributes:
        key: the offending key (dotted within its table) or entry, when known.
        file: the file it came from, when it came from one.
    """

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.file = file


class InvalidHost(NetproxyError):
    """A host (or pattern) is not a valid name or address (SPEC §3.1)."""

    def __init__(self, message: str, *, host: str = "") -> None:
        super().__init__(message)
        self.host = host


class ClientProtocolError(NetproxyError):
    """The client sent bytes we refuse to process: answer `status`, then close."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UpstreamError(NetproxyError):
    """The destination failed: 502 `upstream-error`, or 504 `upstream-timeout`."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout

    @property
    def status(self) -> int:
        return 504 if self.timeout else 502

    @property
    def proxy_error(self) -> str:
        return "upstream-timeout" if self.timeout else "upstream-error"
