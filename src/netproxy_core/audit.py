"""Audit events and blocked records (SPEC §10).

`AuditBus.record` is called exactly once per policy evaluation (by `handlers/decide.py`). It
logs to the ``netproxy.audit`` logger, keeps the last 10,000 events in a ring, appends JSON
lines to `audit_log`, records refusals in the blocked ring (200) and hands the event to every
registered sink.

When nobody would see an allow at once (no sink, no audit log, the logger below INFO: `serve`
on its own), the ring keeps the evaluation's parts and its time instead, and the event is built
when the ring is read. That is most of an allowed request's audit cost on the hot path; what a
reader gets is the same event.

Sinks never stall or break request handling: by default each sink runs on its own thread
behind a bounded queue (`SinkDispatcher`), in emission order; a sink that raises is logged and
skipped. `add_sink(fn, inline=True)` calls a sink on the event loop instead (for quick sinks
that must see an event before the client sees the response); `flush()` waits until every
threaded sink has caught up.

Events never carry URLs, paths, query strings, header values or credentials: the type has no
field that could hold one, and `to_dict()` passes only the four optional SPEC fields.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Final, cast

from .errors import ConfigError
from .policy.model import Decision, NetworkDecision, NetworkPolicyRequest, Scope

__all__ = [
    "EVENT_NAME",
    "AuditBus",
    "BlockedRecord",
    "EventSink",
    "PolicyDecisionEvent",
    "SinkDispatcher",
]

EVENT_NAME: Final = "netproxy.policy_decision"
RING_SIZE: Final = 10_000
BLOCKED_RING_SIZE: Final = 200

log = logging.getLogger("netproxy.audit")
_internal = logging.getLogger("netproxy.proxy")


def _rfc3339(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class PolicyDecisionEvent:
    """One `netproxy.policy_decision` event (SPEC §10)."""

    scope: str
    decision: str
    source: str
    reason: str
    protocol: str
    host: str
    port: int
    method: str | None
    client: str | None
    override: bool
    timestamp: datetime
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The event under its SPEC §10 field names."""
        data: dict[str, Any] = {
            "event.name": EVENT_NAME,
            "event.timestamp": _rfc3339(self.timestamp),
            "network.policy.scope": self.scope,
            "network.policy.decision": self.decision,
            "network.policy.source": self.source,
            "network.policy.reason": self.reason,
            "network.transport.protocol": self.protocol,
            "server.address": self.host,
            "server.port": self.port,
            "http.request.method": self.method or "none",
            "client.address": self.client or "unknown",
            "network.policy.override": self.override,
        }
        data.update((k, v) for k, v in self.extra.items() if k in OPTIONAL_FIELDS)
        return data

    @property
    def allowed(self) -> bool:
        return self.decision == Decision.ALLOW


OPTIONAL_FIELDS: Final = frozenset(
    {"netproxy.test_id", "conversation.id", "app.version", "user.account_id"}
)


@dataclass(frozen=True, slots=True)
class BlockedRecord:
    """A refusal kept in the blocked ring (SPEC §10)."""

    host: str
    reason: str
    client: str | None
    method: str | None
    mode: str
    protocol: str
    decision: str
    source: str
    port: int
    timestamp: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "reason": self.reason,
            "client": self.client,
            "method": self.method,
            "mode": self.mode,
            "protocol": self.protocol,
            "decision": self.decision,
            "source": self.source,
            "port": self.port,
            "timestamp": _rfc3339(self.timestamp),
        }


EventSink = Callable[[PolicyDecisionEvent], None]
# An allow no one watched as it happened: (request, decision, host, time.time()).
_Deferred = tuple[NetworkPolicyRequest, NetworkDecision, str, float]


class AuditBus:
    """Fan-out of decision events for one proxy instance (no global state)."""

    def __init__(
        self, *, audit_log: str | None = None, extra: Mapping[str, str] | None = None
    ) -> None:
        self._ring: collections.deque[PolicyDecisionEvent | _Deferred] = collections.deque(
            maxlen=RING_SIZE
        )
        self._deferred = False  # the ring may hold a `_Deferred`
        self._blocked: collections.deque[BlockedRecord] = collections.deque(
            maxlen=BLOCKED_RING_SIZE
        )
        self._sinks: list[_SinkEntry] = []
        self._lock = threading.Lock()
        self.emitted = 0
        self.blocked_total = 0
        self.extra: dict[str, str] = {
            k: v for k, v in (extra or {}).items() if k in OPTIONAL_FIELDS
        }
        self._file: IO[str] | None = None
        if audit_log == "-":
            self._file = sys.stdout
        elif audit_log:
            try:
                fd = os.open(audit_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as exc:
                raise ConfigError(
                    f"cannot open audit_log {audit_log}: {exc.strerror}", key="audit_log"
                ) from None
            self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def add_sink(
        self,
        sink: EventSink,
        *,
        inline: bool = False,
        close: Callable[[], None] | None = None,
    ) -> None:
        """Deliver every future event to `sink`.

        Args:
            sink: called with each `PolicyDecisionEvent`; exceptions are logged and dropped.
            inline: call it on the emitting (event-loop) thread, before the request goes on;
                only for sinks that return at once. Default: its own thread (`SinkDispatcher`).
            close: called once by `close()` after the last event was delivered.
        """
        deliver: EventSink = sink if inline else SinkDispatcher(sink)
        self._sinks.append(_SinkEntry(sink, deliver, close))

    def remove_sink(self, sink: EventSink) -> None:
        for entry in [e for e in self._sinks if e.sink is sink]:
            self._sinks.remove(entry)
            entry.shut(timeout=0.0)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until threaded sinks received every event emitted so far; False on timeout."""
        deadline = time.monotonic() + timeout
        ok = True
        for entry in tuple(self._sinks):
            if isinstance(entry.deliver, SinkDispatcher):
                ok = entry.deliver.flush(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def record(
        self,
        request: NetworkPolicyRequest,
        decision: NetworkDecision,
        *,
        mode: str,
        host: str | None = None,
    ) -> None:
        """Emit the event for one evaluation (built later if only the ring would see it)."""
        now = time.time()
        host = request.host if host is None else host
        if decision.decision is Decision.ALLOW and not self._watched():
            with self._lock:
                self._ring.append((request, decision, host, now))
                self._deferred = True
                self.emitted += 1
            return
        self.emit(self._event(request, decision, host, now), mode=mode)

    def _watched(self) -> bool:
        """Someone sees each event as it is emitted (a sink, the audit log, the logger)."""
        return bool(self._sinks) or self._file is not None or log.isEnabledFor(logging.INFO)

    def _event(
        self, request: NetworkPolicyRequest, decision: NetworkDecision, host: str, when: float
    ) -> PolicyDecisionEvent:
        return PolicyDecisionEvent(
            scope=str(decision.scope if decision.scope else Scope.DOMAIN),
            decision=str(decision.decision),
            source=str(decision.source),
            reason=str(decision.reason),
            protocol=str(request.protocol),
            host=host,
            port=request.port,
            method=request.method,
            client=request.client_addr,
            override=decision.override,
            timestamp=datetime.fromtimestamp(when, UTC),
            extra=self.extra,
        )

    def emit(self, event: PolicyDecisionEvent, *, mode: str = "full") -> None:
        with self._lock:
            self._ring.append(event)
            self.emitted += 1
            if not event.allowed:
                self.blocked_total += 1
                self._blocked.append(
                    BlockedRecord(
                        host=event.host,
                        reason=event.reason,
                        client=event.client,
                        method=event.method,
                        mode=mode,
                        protocol=event.protocol,
                        decision=event.decision,
                        source=event.source,
                        port=event.port,
                        timestamp=event.timestamp,
                    )
                )
        if log.isEnabledFor(logging.INFO) or self._file is not None:
            data = event.to_dict()
            line = json.dumps(data, separators=(",", ":"))
            log.info("%s", line, extra={"netproxy_event": data})
            if self._file is not None:
                try:
                    self._file.write(line + "\n")
                    self._file.flush()
                except (OSError, ValueError) as exc:
                    _internal.warning("cannot write the audit log: %s", exc)
        for entry in tuple(self._sinks):
            try:
                entry.deliver(event)
            except Exception:  # a broken sink must never break request handling
                _internal.exception("audit sink %r raised; event dropped for it", entry.sink)

    def events(self) -> list[PolicyDecisionEvent]:
        with self._lock:
            return self._held()

    def events_since(self, since: int) -> tuple[list[PolicyDecisionEvent], int]:
        """Events after the first `since` emitted (as far as the ring holds), and the count."""
        with self._lock:
            held = self._held()
            first_held = self.emitted - len(held)
            skip = max(0, since - first_held)
            return held[skip:], self.emitted

    def _held(self) -> list[PolicyDecisionEvent]:
        """The ring's events, oldest first, building the deferred ones once (lock held)."""
        if self._deferred:
            events = [
                e if isinstance(e, PolicyDecisionEvent) else self._event(*e) for e in self._ring
            ]
            self._ring = collections.deque(events, maxlen=RING_SIZE)
            self._deferred = False
            return events
        return cast("list[PolicyDecisionEvent]", list(self._ring))  # nothing deferred

    def blocked(self, *, drain: bool = False) -> list[BlockedRecord]:
        with self._lock:
            records = list(self._blocked)
            if drain:
                self._blocked.clear()
            return records

    def clear(self) -> None:
        with self._lock:
            self._ring.clear()
            self._deferred = False
            self._blocked.clear()

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what threaded sinks still hold (up to `timeout`), close sinks and the file.

        Blocking: call it from a worker thread when an event loop is running.
        """
        deadline = time.monotonic() + timeout
        sinks, self._sinks = self._sinks, []
        for entry in sinks:
            entry.shut(timeout=max(0.0, deadline - time.monotonic()))
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None


@dataclass(slots=True, eq=False)
class _SinkEntry:
    sink: EventSink
    deliver: EventSink
    closer: Callable[[], None] | None

    def shut(self, *, timeout: float) -> None:
        if isinstance(self.deliver, SinkDispatcher):
            self.deliver.close(timeout)
        if self.closer is not None:
            try:
                self.closer()
            except Exception:
                _internal.exception("closing audit sink %r failed", self.sink)


class SinkDispatcher:
    """Runs a (possibly slow) sink on its own thread behind a bounded queue, in order.

    The thread starts with the first event, so a proxy that never emits leaves no thread.
    On overflow events are dropped and counted (`dropped`), never waited for.

    A quick sink still sees each event before the request goes on: when nothing is queued
    ahead of it, the emitter waits for the delivery. Only the sink's own slowness counts: once
    its callback has run for `sync_wait` seconds the wait ends, and a sink that is that slow
    `max_misses` times is never waited for again, so a slow or stuck sink costs the event loop
    at most ``sync_wait * max_misses`` in total. Waiting for a busy machine to schedule the
    sink thread at all is bounded by `schedule_wait`.
    """

    sync_wait: Final = 0.05
    schedule_wait: Final = 1.0
    max_misses: Final = 3

    def __init__(self, sink: EventSink, *, maxsize: int = 10_000) -> None:
        self._sink = sink
        self._queue: queue.Queue[PolicyDecisionEvent | None] = queue.Queue(maxsize)
        self._cond = threading.Condition()
        self._pending = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._misses = 0
        self._running_since: float | None = None
        self.dropped = 0

    def __repr__(self) -> str:
        return f"<SinkDispatcher {self._sink!r} pending={self._pending} dropped={self.dropped}>"

    def __call__(self, event: PolicyDecisionEvent) -> None:
        with self._cond:
            if self._closed:
                self.dropped += 1
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="netproxy-audit-sink", daemon=True
                )
                self._thread.start()
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self.dropped += 1
                return
            self._pending += 1
            if self._pending == 1 and self._misses < self.max_misses:
                self._wait_delivery()

    def _wait_delivery(self) -> None:
        """Wait (holding `_cond`) until the sink took the event, or proved slow."""
        deadline = time.monotonic() + self.schedule_wait
        while self._pending:
            now = time.monotonic()
            started = self._running_since
            if started is not None and now - started >= self.sync_wait:
                self._misses += 1  # the sink itself is slow
                return
            if now >= deadline:
                return  # the machine did not run the sink thread at all
            self._cond.wait(min(self.sync_wait, deadline - now))

    def _run(self) -> None:
        for event in iter(self._queue.get, None):
            with self._cond:
                self._running_since = time.monotonic()
            try:
                self._sink(event)
            except Exception:
                _internal.exception("audit sink %r raised; event dropped for it", self._sink)
            with self._cond:
                self._running_since = None
                self._pending -= 1
                self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event was handed to the sink; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to `timeout`), then stop the thread."""
        with self._cond:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self.flush(timeout)
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # a stuck sink: leave its daemon thread behind
            _internal.warning("audit sink %r did not finish; abandoning it", self._sink)
            return
        thread.join(timeout=max(0.1, timeout))
