"""AuditBus, PolicyDecisionEvent, BlockedRecord, SinkDispatcher and OtelSink (SPEC §10)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from opentelemetry.sdk._logs import export as otel_export

from helpers.events import OPTIONAL, REQUIRED, RFC3339_MS_Z
from netproxy_core.audit import (
    BLOCKED_RING_SIZE,
    RING_SIZE,
    AuditBus,
    PolicyDecisionEvent,
    SinkDispatcher,
)
from netproxy_core.config.model import OtelConfig
from netproxy_core.errors import ConfigError
from netproxy_core.otel import OtelSink, logs_endpoint
from netproxy_core.policy.model import (
    Decision,
    NetworkDecision,
    NetworkPolicyRequest,
    Protocol,
    Reason,
    Scope,
    Source,
)

ALLOW = NetworkDecision(Decision.ALLOW, Reason.ALLOW, Source.BASELINE_POLICY)
DENY = NetworkDecision(Decision.DENY, Reason.NOT_ALLOWED, Source.BASELINE_POLICY)


def _request(host: str = "api.example.test", method: str | None = "GET") -> NetworkPolicyRequest:
    return NetworkPolicyRequest(Protocol.HTTP, host, 80, method, "127.0.0.1:5555")


def _event(i: int = 0, decision: str = "allow") -> PolicyDecisionEvent:
    return PolicyDecisionEvent(
        scope="domain",
        decision=decision,
        source="baseline_policy",
        reason=decision,
        protocol="http",
        host=f"h{i}.example.test",
        port=80,
        method="GET",
        client=None,
        override=False,
        timestamp=datetime.now(UTC),
    )


# --- the event ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "client", "expected_method", "expected_client"),
    [("GET", "127.0.0.1:5555", "GET", "127.0.0.1:5555"), (None, None, "none", "unknown")],
)
def test_event_fields_exactly(
    method: str | None, client: str | None, expected_method: str, expected_client: str
) -> None:
    bus = AuditBus()
    bus.record(
        NetworkPolicyRequest(Protocol.HTTPS_CONNECT, "x.example.test", 443, method, client),
        DENY,
        mode="full",
    )
    [event] = bus.events()
    data = event.to_dict()
    assert set(data) == REQUIRED
    assert data["event.name"] == "netproxy.policy_decision"
    assert RFC3339_MS_Z.match(data["event.timestamp"])
    assert data["server.port"] == 443 and isinstance(data["server.port"], int)
    assert data["network.policy.override"] is False
    assert data["http.request.method"] == expected_method
    assert data["client.address"] == expected_client
    assert data["network.transport.protocol"] == "https_connect"
    assert (data["network.policy.decision"], data["network.policy.reason"]) == (
        "deny",
        "not_allowed",
    )
    assert data["network.policy.scope"] == "domain"
    assert event.timestamp.tzinfo is not None


def test_timestamp_is_utc_milliseconds() -> None:
    ts = datetime(2024, 2, 29, 23, 59, 58, 999_999, tzinfo=UTC)
    data = dataclasses.replace(_event(), timestamp=ts).to_dict()
    assert data["event.timestamp"] == "2024-02-29T23:59:58.999Z"


def test_only_the_four_optional_fields_pass() -> None:
    bus = AuditBus(
        extra={
            "netproxy.test_id": "t::1",
            "conversation.id": "c",
            "app.version": "1",
            "user.account_id": "u",
            "http.url": "http://x/secret",
            "path": "/p",
        }
    )
    bus.record(_request(), ALLOW, mode="full")
    data = bus.events()[-1].to_dict()
    assert set(data) == REQUIRED | OPTIONAL
    assert data["netproxy.test_id"] == "t::1"
    # even an event built by hand cannot smuggle other keys into to_dict()
    sneaky = dataclasses.replace(_event(), extra={"url.full": "http://x/?k=s"})
    assert set(sneaky.to_dict()) == REQUIRED


# --- rings ---------------------------------------------------------------------------------


def test_ring_keeps_last_10000_and_events_since() -> None:
    bus = AuditBus()
    for i in range(RING_SIZE + 5):
        bus.emit(_event(i))
    events = bus.events()
    assert len(events) == RING_SIZE and events[0].host == "h5.example.test"
    assert bus.emitted == RING_SIZE + 5
    tail, nxt = bus.events_since(RING_SIZE + 3)
    assert [e.host for e in tail] == [
        f"h{RING_SIZE + 3}.example.test",
        f"h{RING_SIZE + 4}.example.test",
    ]
    assert nxt == RING_SIZE + 5
    assert bus.events_since(0)[0] == events  # older than the ring: what it still holds
    assert bus.events_since(nxt) == ([], nxt)
    assert bus.events_since(nxt + 100) == ([], nxt)


def test_unwatched_allows_read_back_as_watched_ones() -> None:
    """With no sink, file or INFO logger an allow is built when read: the same event."""
    unwatched, watched = (
        AuditBus(extra={"netproxy.test_id": "t"}),
        AuditBus(extra={"netproxy.test_id": "t"}),
    )
    seen: list[PolicyDecisionEvent] = []
    watched.add_sink(seen.append, inline=True)
    steps = [(_request(f"h{i}.example.test"), DENY if i % 7 == 3 else ALLOW) for i in range(40)]
    before = datetime.now(UTC)
    for bus in (unwatched, watched):
        for n, (request, decision) in enumerate(steps):
            bus.record(request, decision, mode="full", host="canon.test" if n == 5 else None)
    after = datetime.now(UTC)

    def fields(events: list[PolicyDecisionEvent]) -> list[dict[str, object]]:
        return [{k: v for k, v in e.to_dict().items() if k != "event.timestamp"} for e in events]

    events = unwatched.events()
    assert fields(events) == fields(watched.events()) == fields(seen)
    assert events[5].host == "canon.test" and events[3].decision == "deny"
    assert all(before <= e.timestamp <= after for e in events)
    assert [e.timestamp for e in events] == sorted(e.timestamp for e in events)
    assert unwatched.events() == events  # built once: reading again gives the same events
    assert [e.host for e in unwatched.events_since(38)[0]] == [
        "h38.example.test",
        "h39.example.test",
    ]
    assert [r.host for r in unwatched.blocked()] == [
        f"h{i}.example.test" for i in (3, 10, 17, 24, 31, 38)
    ]


def test_unwatched_ring_overflow_keeps_the_newest() -> None:
    bus = AuditBus()
    bus.emit(_event(-1))
    for i in range(RING_SIZE + 2):
        bus.record(_request(f"h{i}.example.test"), ALLOW, mode="full")
    events = bus.events()
    assert len(events) == RING_SIZE and bus.emitted == RING_SIZE + 3
    assert (events[0].host, events[-1].host) == (
        "h2.example.test",
        f"h{RING_SIZE + 1}.example.test",
    )


def test_blocked_ring_200_total_never_reset() -> None:
    bus = AuditBus()
    for i in range(BLOCKED_RING_SIZE + 50):
        bus.record(_request(f"b{i}.example.test"), DENY, mode="limited")
    bus.record(_request("ok.example.test"), ALLOW, mode="full")
    bus.record(
        _request("ask.example.test"),
        NetworkDecision(Decision.ASK, Reason.NOT_ALLOWED, Source.DECIDER),
        mode="full",
    )
    records = bus.blocked()
    assert len(records) == BLOCKED_RING_SIZE
    assert bus.blocked_total == BLOCKED_RING_SIZE + 51
    record = records[0].to_dict()
    assert set(record) == {
        "host",
        "reason",
        "client",
        "method",
        "mode",
        "protocol",
        "decision",
        "source",
        "port",
        "timestamp",
    }
    assert record["host"] == "b51.example.test" and record["mode"] == "limited"
    assert RFC3339_MS_Z.match(record["timestamp"])
    assert records[-1].decision == "ask"
    assert len(bus.blocked(drain=True)) == BLOCKED_RING_SIZE
    assert bus.blocked() == [] and bus.blocked_total == BLOCKED_RING_SIZE + 51


def test_non_domain_scope_is_kept() -> None:
    bus = AuditBus()
    decision = NetworkDecision(
        Decision.DENY, Reason.METHOD_NOT_ALLOWED, Source.MODE_GUARD, scope=Scope.NON_DOMAIN
    )
    bus.record(_request(), decision, mode="limited")
    assert bus.events()[-1].to_dict()["network.policy.scope"] == "non_domain"


# --- outputs -------------------------------------------------------------------------------


def test_audit_log_file_json_lines_0600(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    bus = AuditBus(audit_log=str(path))
    bus.record(_request("a.example.test"), ALLOW, mode="full")
    bus.record(_request("b.example.test"), DENY, mode="full")
    lines = path.read_text().splitlines()  # readable before close: flushed per event
    bus.close()
    assert [json.loads(line)["server.address"] for line in lines] == [
        "a.example.test",
        "b.example.test",
    ]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_audit_log_unwritable_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open audit_log"):
        AuditBus(audit_log=str(tmp_path / "missing-dir" / "audit.jsonl"))


def test_logger_gets_json_line(caplog: pytest.LogCaptureFixture) -> None:
    bus = AuditBus()
    with caplog.at_level(logging.INFO, logger="netproxy.audit"):
        bus.record(_request(), ALLOW, mode="full")
    [record] = [r for r in caplog.records if r.name == "netproxy.audit"]
    assert record.levelno == logging.INFO
    assert json.loads(record.getMessage())["server.address"] == "api.example.test"
    assert record.netproxy_event["event.name"] == "netproxy.policy_decision"  # type: ignore[attr-defined]


# --- sinks ---------------------------------------------------------------------------------


def test_raising_sink_is_isolated() -> None:
    bus = AuditBus()
    got: list[str] = []

    def broken(event: PolicyDecisionEvent) -> None:
        raise RuntimeError("sink bug")

    bus.add_sink(broken, inline=True)
    bus.add_sink(broken)
    bus.add_sink(lambda e: got.append(e.host), inline=True)
    bus.record(_request(), ALLOW, mode="full")
    assert bus.flush(5)
    assert got == ["api.example.test"]
    bus.close()


def test_slow_sink_does_not_block_emit_and_keeps_order() -> None:
    bus = AuditBus()
    release = threading.Event()
    got: list[str] = []

    def slow(event: PolicyDecisionEvent) -> None:
        release.wait(10)
        got.append(event.host)

    bus.add_sink(slow)
    started = time.monotonic()
    for i in range(20):
        bus.emit(_event(i))
    assert time.monotonic() - started < 0.5  # emit never waits for the sink
    assert not bus.flush(0.05)
    release.set()
    assert bus.flush(5)
    assert got == [f"h{i}.example.test" for i in range(20)]
    bus.close()


def test_dispatcher_thread_is_lazy_and_overflow_drops() -> None:
    release = threading.Event()
    dispatcher = SinkDispatcher(lambda e: release.wait(10), maxsize=2)
    before = {t.ident for t in threading.enumerate()}
    assert {t.ident for t in threading.enumerate()} == before  # nothing started yet
    for i in range(6):
        dispatcher(_event(i))
    assert dispatcher.dropped >= 3
    release.set()
    dispatcher.close(5)
    assert not any(
        t.name == "netproxy-audit-sink" and t.is_alive()
        for t in threading.enumerate()
        if t.ident not in before
    )
    dispatcher(_event())  # after close: dropped, no new thread
    assert dispatcher.dropped >= 4


def test_close_runs_closers_and_remove_sink() -> None:
    bus = AuditBus()
    closed: list[str] = []
    got: list[str] = []
    sink = got.append
    bus.add_sink(lambda e: None, inline=True, close=lambda: closed.append("x"))
    bus.add_sink(sink)  # type: ignore[arg-type]
    bus.remove_sink(sink)  # type: ignore[arg-type]
    bus.emit(_event())
    bus.close()
    assert closed == ["x"] and got == []


# --- OpenTelemetry -------------------------------------------------------------------------


def test_otel_records_carry_exactly_the_event_fields() -> None:
    exporter_type = (
        getattr(otel_export, "InMemoryLogRecordExporter", None) or otel_export.InMemoryLogExporter
    )
    exporter = exporter_type()
    sink = OtelSink(exporter=exporter)
    bus = AuditBus(extra={"netproxy.test_id": "t1"})
    bus.add_sink(sink, inline=True, close=sink.close)
    bus.record(_request(), DENY, mode="full")
    [event] = bus.events()
    assert sink.flush()
    [data] = exporter.get_finished_logs()
    record = data.log_record
    assert dict(record.attributes or {}) == event.to_dict()
    assert record.event_name == "netproxy.policy_decision"
    assert record.severity_text == "INFO"
    assert record.timestamp == int(event.timestamp.timestamp() * 1_000_000) * 1000
    assert data.resource.attributes["service.name"] == "netproxy"
    bus.close()


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/logs"),
        ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/logs"),
        ("https://otel.example.test/v1/logs", "https://otel.example.test/v1/logs"),
        ("http://collector:4318/prefix", "http://collector:4318/prefix/v1/logs"),
    ],
)
def test_logs_endpoint(endpoint: str, url: str) -> None:
    assert logs_endpoint(endpoint) == url


@pytest.mark.parametrize("bad", ["127.0.0.1:4318", "ftp://x/", "http://"])
def test_logs_endpoint_rejects(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"otel\.endpoint"):
        logs_endpoint(bad)


def test_otel_unknown_protocol_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"otel\.protocol"):
        OtelSink(OtelConfig(enabled=True, protocol="carrier-pigeon"))


def test_otel_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate an environment without the SDK: importing it fails.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk._logs", None)
    with pytest.raises(ConfigError, match=r"pip install 'pytest-netproxy\[otel\]'"):
        OtelSink(OtelConfig(enabled=True))
