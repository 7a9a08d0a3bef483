"""A fake GitHub for every test: api.github.com served locally, reached through netproxy."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

CLI = [sys.executable, str(Path(__file__).with_name("ghstats.py"))]


@pytest.fixture
def github(netproxy: Any) -> Any:
    """A FakeHost standing in for api.github.com (HTTPS, certificate from the session CA)."""
    fake = netproxy.fake_host("api.github.com")
    fake.route("GET", "/repos/octo/hello", json={"full_name": "octo/hello", "stargazers_count": 42})
    fake.route("PUT", "/user/starred/octo/hello", status=204)
    return fake


@pytest.fixture
def ghstats(netproxy: Any) -> Any:
    """Run the CLI under the proxy: `ghstats("stars", "octo/hello")`."""

    def run(*args: str) -> Any:
        return netproxy.run([*CLI, *args])

    return run
