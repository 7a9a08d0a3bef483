"""Smoke test of the fixtures: the proxy forwards to an allowed origin and blocks others."""

from __future__ import annotations

import httpx

from helpers.origins import Origin


def test_forward_allowed_and_block_other(start_proxy, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    routes = {"api.example.test:80": origin.addr}
    with (
        start_proxy(allow=["api.example.test"], routes=routes) as p,
        httpx.Client(proxy=p.http_url) as client,
    ):
        ok = client.get("http://api.example.test/hello?x=1")
        assert ok.status_code == 200
        assert ok.json()["path"] == "/hello?x=1"
        blocked = client.get("http://other.example.test/")
        assert blocked.status_code == 403
        assert blocked.headers["x-proxy-error"] == "blocked-by-allowlist"
    assert origin.requests[0].headers["host"] == "api.example.test"
