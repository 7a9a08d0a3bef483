"""Per-test cost of the `netproxy` fixture (SPEC §14.3: at most 15 ms per test, median).

Runs ONE pytest subprocess holding 200 tests that use the `netproxy` fixture and 200 that do
not, interleaved so both see the same machine state, and records each test's setup + call +
teardown time from its reports. Prints the median per group, the added cost and the ratio.

    python3 bench/bench_fixture.py [--tests N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TARGET_MS = 15.0

CONFTEST = textwrap.dedent(
    """
    import json, os
    _durations = {}

    def pytest_runtest_logreport(report):
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(session):
        with open(os.environ["BENCH_OUT"], "w") as f:
            json.dump(_durations, f)
    """
)

TESTS = textwrap.dedent(
    """
    import pytest

    @pytest.mark.parametrize("i", range({n}))
    def test_with(netproxy, i):
        assert netproxy.http_url

    @pytest.mark.parametrize("i", range({n}))
    def test_without(i):
        assert i >= 0
    """
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=200, help="tests per group (default 200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "conftest.py").write_text(CONFTEST)
        (root / "test_bench.py").write_text(TESTS.format(n=args.tests))
        out = root / "durations.json"
        # Interleave: -p no:randomly keeps order; run both groups in one process so the
        # session CA is made once, as in a real suite (its cost lands on the first test).
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root)],
            cwd=root,
            env={**_env(), "BENCH_OUT": str(out)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        durations: dict[str, float] = json.loads(out.read_text())
    with_ms = [v * 1000 for k, v in durations.items() if "test_with[" in k]
    without_ms = [v * 1000 for k, v in durations.items() if "test_without[" in k]
    med_with, med_without = statistics.median(with_ms), statistics.median(without_ms)
    added = med_with - med_without
    print(f"tests per group:          {len(with_ms)} with netproxy, {len(without_ms)} without")
    print(f"median per test, with:    {med_with:.2f} ms")
    print(f"median per test, without: {med_without:.2f} ms")
    print(f"added by the fixture:     {added:.2f} ms (target <= {TARGET_MS:.0f} ms)")
    print(f"ratio with/without:       {med_with / med_without:.1f}x")
    print(f"p90 with:                 {statistics.quantiles(with_ms, n=10)[-1]:.2f} ms")
    return 0 if added <= TARGET_MS else 2


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


if __name__ == "__main__":
    sys.exit(main())
