"""ghstats under netproxy: what it may reach, what it must not, and where the token goes."""

from __future__ import annotations

from typing import Any

import pytest

TOKEN = "ghp_" + "S3cr3t" * 6


def test_stars_reads_the_api(netproxy: Any, github: Any, ghstats: Any) -> None:
    result = ghstats("stars", "octo/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"
    assert [r.path for r in github.requests] == ["/repos/octo/hello"]
    netproxy.assert_allowed("api.github.com", port=443)
    # The telemetry ping never left the machine (and strict mode needs it acknowledged).
    netproxy.assert_blocked("telemetry.ghstats.example", reason="denied")


@pytest.mark.netproxy(credentials={"GH_TOKEN": TOKEN})
def test_star_uses_the_token_without_seeing_it(netproxy: Any, github: Any, ghstats: Any) -> None:
    assert netproxy.env()["GH_TOKEN"] != TOKEN  # the child only ever holds a dummy
    netproxy.expect_blocked("telemetry.ghstats.example")
    result = ghstats("star", "octo/hello")
    assert result.returncode == 0, result.stderr
    assert github.requests[-1].method == "PUT"
    assert github.requests[-1].headers["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.netproxy(mode="limited")
def test_read_only_mode_refuses_the_write(netproxy: Any, github: Any, ghstats: Any) -> None:
    netproxy.expect_blocked("telemetry.ghstats.example")
    result = ghstats("star", "octo/hello")
    assert result.returncode == 1
    netproxy.assert_blocked("api.github.com", reason="method_not_allowed", method="PUT")
    assert github.requests == []


def test_other_hosts_stay_unreachable(netproxy: Any, ghstats: Any) -> None:
    netproxy.expect_blocked("telemetry.ghstats.example")
    netproxy.fake_host("api.github.com")  # the fake exists, but the policy below wins
    netproxy.deny("api.github.com")
    result = ghstats("stars", "octo/hello")
    assert result.returncode != 0
    netproxy.assert_blocked("api.github.com", reason="denied")
    netproxy.assert_not_contacted("api.github.com")
