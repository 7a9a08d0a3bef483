# ruff: noqa: E501  (expected output lines are kept whole to stay readable)
"""Blocked-requests summary under xdist, clean-up after tests, credentials (SPEC §14.1, §14.3)."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]  # a module-level request: sub-directory conftests may not

ARGS = ("-p", "no:cacheprovider")

BLOCKING = """
import pytest

@pytest.mark.parametrize("n", range(6))
def test_blocks(netproxy, n):
    netproxy.run(["curl", "-sS", f"http://host{n}.example.com/"])
    netproxy.assert_blocked(f"host{n}.example.com", reason="not_allowed")

def test_no_fixture():
    pass
"""


@pytest.mark.parametrize("workers", [None, "2"], ids=["single", "xdist-2"])
def test_summary_lists_each_tests_blocks(pytester: pytest.Pytester, workers: str | None) -> None:
    pytester.makepyfile(test_blocking=BLOCKING)
    extra = ("-n", workers) if workers else ()
    result = pytester.runpytest_subprocess(*ARGS, *extra)
    result.assert_outcomes(passed=7)
    lines = [
        f"test_blocking.py::test_blocks[[]{n}[]]\n    host{n}.example.com:80 not_allowed"
        for n in range(6)
    ]
    result.stdout.fnmatch_lines(["*= netproxy blocked requests =*", *"\n".join(lines).splitlines()])
    assert "test_no_fixture" not in result.stdout.str().split("netproxy blocked requests")[1]


def test_nothing_left_behind_after_pass_or_fail(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import os, sys, threading
            import pytest

            SNAPSHOTS = []

            def snapshot():
                return (sorted(t.name for t in threading.enumerate()),
                        len(os.listdir("/proc/self/fd")),
                        {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"})

            def work(netproxy):
                fake = netproxy.fake_host("api.example.com")
                fake.route("GET", "/", body=b"ok")
                netproxy.allow("api.example.com")
                assert netproxy.run(["curl", "-sS", fake.url + "/"]).stdout == "ok"
                netproxy.popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               stdout=-1)
                netproxy.fake_host("plain.example.com", tls=False)

            def test_warm_up(netproxy):
                work(netproxy)

            @pytest.fixture
            def guard():
                SNAPSHOTS.append(snapshot())
                yield
                SNAPSHOTS.append(snapshot())

            def test_passing(guard, netproxy):
                work(netproxy)

            def test_failing(guard, netproxy):
                work(netproxy)
                assert False, "deliberate"

            def test_compare():
                before_pass, after_pass, before_fail, after_fail = SNAPSHOTS
                assert before_pass == after_pass
                assert before_fail == after_fail
            """
        )
    )
    result = pytester.runpytest_subprocess(*ARGS, "-p", "no:randomly")
    result.assert_outcomes(passed=3, failed=1)


def test_credentials_become_dummies_and_reach_bound_host(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import sys
            import pytest

            REAL = "ghp_" + "R" * 36
            SCRIPT = (
                "import os, httpx\\n"
                "t = os.environ['GH_TOKEN']\\n"
                "r = httpx.get('https://api.github.com/user', headers={'Authorization': 'Bearer ' + t})\\n"
                "print(t)\\n"
            )

            def test_runtime_credentials(netproxy):
                fake = netproxy.fake_host("api.github.com")
                fake.route("GET", "/user", json={"login": "me"})
                netproxy.allow("api.github.com")
                netproxy.credentials(GH_TOKEN=REAL)
                env = netproxy.env()
                assert env["GH_TOKEN"] != REAL and env["GH_TOKEN"].startswith("ghp_")
                assert env["NETPROXY_CREDENTIAL_BROKER_ACTIVE"] == "1"
                out = netproxy.run([sys.executable, "-c", SCRIPT])
                assert out.returncode == 0, out.stderr
                assert REAL not in out.stdout
                assert fake.requests[0].headers["authorization"] == "Bearer " + REAL

            @pytest.mark.netproxy(allow=["api.github.com"], credentials={"GH_TOKEN": REAL})
            def test_marker_credentials(netproxy):
                fake = netproxy.fake_host("api.github.com")
                fake.route("GET", "/user", json={"login": "me"})
                out = netproxy.run([sys.executable, "-c", SCRIPT])
                assert out.returncode == 0, out.stderr
                assert REAL not in out.stdout
                assert fake.requests[0].headers["authorization"] == "Bearer " + REAL
            """
        )
    )
    result = pytester.runpytest_subprocess(*ARGS)
    result.assert_outcomes(passed=2)
