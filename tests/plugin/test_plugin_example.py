"""The example suite (examples/plugin_suite) runs green with its README command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "plugin_suite"


def test_example_suite_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout
    assert "netproxy: profile=ci, mode=full" in result.stdout
    assert "api.github.com:443 method_not_allowed" in result.stdout
