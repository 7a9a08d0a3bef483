"""SPEC §10 audit gaps: a `builder.event_sink(fn)` sink sees each event before the client
sees the response, with the `PolicyDecisionEvent` attributes the spec names."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from pathlib import Path

import httpx

from helpers.events import RFC3339_MS_Z
from netproxy_core import NetworkProxy, PolicyDecisionEvent, ProxyConfig

BLOCKED = "blocked.example.test"


async def _sink_lags(home: Path, proxies: int, requests: int) -> tuple[int, PolicyDecisionEvent]:
    """Requests whose event had not reached the sink when the client got the response."""
    lagging = 0
    last: PolicyDecisionEvent | None = None
    for _ in range(proxies):
        got: list[PolicyDecisionEvent] = []
        proxy = await (
            NetworkProxy.builder()
            .config(ProxyConfig())
            .http_addr("127.0.0.1:0")
            .socks_addr("127.0.0.1:0")
            .home(home)
            .event_sink(got.append)
            .build()
        )
        async with (
            proxy.run() as handle,
            httpx.AsyncClient(proxy=handle.http_url, trust_env=False, timeout=10) as client,
        ):
            for i in range(requests):
                response = await client.get(f"http://{BLOCKED}/path?q=secret")
                assert response.status_code == 403
                lagging += len(got) != i + 1
        assert len(got) == requests
        last = got[-1]
    assert last is not None
    return lagging, last


def test_event_sink_sees_each_event_before_the_response(tmp_path: Path) -> None:
    # The first event of a proxy used to race the sink thread's start (about half lost).
    lagging, event = asyncio.run(_sink_lags(tmp_path / "home", proxies=10, requests=20))
    assert lagging == 0
    assert (event.scope, event.decision, event.source, event.reason) == (
        "domain",
        "deny",
        "baseline_policy",
        "not_allowed",
    )
    assert (event.protocol, event.host, event.port, event.method) == ("http", BLOCKED, 80, "GET")
    assert event.client is not None and re.fullmatch(r"127\.0\.0\.1:\d+", event.client)
    assert event.override is False
    assert event.timestamp.utcoffset() == timedelta(0) and event.timestamp.tzinfo is not None
    data = event.to_dict()
    assert data["event.name"] == "netproxy.policy_decision"
    assert RFC3339_MS_Z.match(data["event.timestamp"])
    assert data["server.port"] == 80 and data["network.policy.override"] is False
    assert "secret" not in repr(data) and "/path" not in repr(data)
