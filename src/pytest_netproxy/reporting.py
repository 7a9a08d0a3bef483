"""Blocked-request reporting and the run's audit log (SPEC §14.2, §14.3).

Per-test data travels in ``report.user_properties`` (serialised by pytest-xdist to the
controller), never in worker globals: `encode_blocked` puts a test's refusals there at fixture
teardown, `BlockedSummary` collects them from teardown reports wherever the terminal summary
runs. `AuditLogWriter` appends every event of the run as a JSON line (one ``os.write`` per line
on an ``O_APPEND`` descriptor, so xdist workers can share the file).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import pytest

from netproxy_core import PolicyDecisionEvent

__all__ = [
    "BLOCKED_PROPERTY",
    "SUMMARY_TITLE",
    "AuditLogWriter",
    "BlockedSummary",
    "encode_blocked",
]

BLOCKED_PROPERTY: Final = "netproxy_blocked"
SUMMARY_TITLE: Final = "netproxy blocked requests"


def encode_blocked(events: Iterable[PolicyDecisionEvent]) -> str:
    """The refusals among `events` as one JSON string: ``[[host, port, reason], …]``,
    in order, duplicates removed."""
    seen: dict[tuple[str, int, str], None] = {}
    for e in events:
        if not e.allowed:
            seen[(e.host, e.port, e.reason)] = None
    return json.dumps([list(k) for k in seen], separators=(",", ":"))


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class BlockedSummary:
    """Refusals per test id, collected from teardown reports (controller or single process)."""

    tests: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)

    def add_report(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        for name, value in report.user_properties:
            if name != BLOCKED_PROPERTY:
                continue
            entries = json.loads(str(value))
            if entries:
                bucket = self.tests.setdefault(report.nodeid, [])
                bucket.extend((str(h), int(p), str(r)) for h, p, r in entries)

    def lines(self) -> list[str]:
        out: list[str] = []
        for nodeid in sorted(self.tests):
            out.append(nodeid)
            out.extend(f"    {_host_port(h, p)} {r}" for h, p, r in self.tests[nodeid])
        return out


class AuditLogWriter:
    """Appends events as JSON lines to one file (shared by xdist workers)."""

    def __init__(self, path: str, *, truncate: bool) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd: int | None = os.open(path, flags | (os.O_TRUNC if truncate else 0), 0o600)
        self._lock = threading.Lock()

    def __call__(self, event: PolicyDecisionEvent) -> None:
        line = (json.dumps(event.to_dict(), separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
