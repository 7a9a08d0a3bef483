# ruff: noqa: E501  (expected output lines are kept whole to stay readable)
"""Marker, options, ini, [tool.netproxy], header, audit log, strict mode (SPEC §14.2, §14.3)."""

from __future__ import annotations

import json
import textwrap

import pytest

pytest_plugins = ["pytester"]  # a module-level request: sub-directory conftests may not

ARGS = ("-q", "-p", "no:cacheprovider")

READ_WRITE = """
def test_read_and_write(netproxy):
    fake = netproxy.fake_host("api.example.com", tls=False)
    fake.route("GET", "/items", body=b"list")
    fake.route("POST", "/items", status=201, body=b"made")
    get = netproxy.run(["curl", "-sS", fake.url + "/items"])
    post = netproxy.run(["curl", "-sS", "-X", "POST", fake.url + "/items"])
    assert get.stdout == "list"
    print("POST-RESULT", post.stdout == "made")
    netproxy.assert_allowed("api.example.com", method="GET")
"""

CONFIG = """
default_permissions = "suite"
[permissions.suite.network]
mode = "full"
[permissions.suite.network.domains]
"api.example.com" = "allow"
"""


def test_header_names_profile_mode_and_config(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["netproxy: profile=full, mode=full, config=none"])


def test_limited_profile_runs_a_suite_read_only(pytester: pytest.Pytester) -> None:
    cfg = pytester.makefile(".toml", netproxy=CONFIG)
    pytester.makepyfile(test_suite=READ_WRITE)
    full = pytester.runpytest_subprocess(*ARGS, "-s", f"--netproxy-config={cfg}")
    full.assert_outcomes(passed=1)
    full.stdout.fnmatch_lines(["*POST-RESULT True*"])
    limited = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-s", f"--netproxy-config={cfg}", "--netproxy-profile=limited"
    )
    limited.assert_outcomes(passed=1)
    limited.stdout.fnmatch_lines(
        [
            f"netproxy: profile=limited, mode=limited, config={cfg}",
            "*POST-RESULT False*",
            "*netproxy blocked requests*",
            "test_suite.py::test_read_and_write",
            "    api.example.com:80 method_not_allowed",
        ]
    )


def test_pyproject_tool_netproxy_and_ini_profile(pytester: pytest.Pytester) -> None:
    doc = CONFIG.replace("[permissions", "[tool.netproxy.permissions").replace(
        'default_permissions = "suite"', '[tool.netproxy]\ndefault_permissions = "suite"'
    )
    pytester.makefile(
        ".toml", pyproject=doc + '\n[tool.pytest.ini_options]\nnetproxy_profile = "limited"\n'
    )
    pytester.makepyfile(test_suite=READ_WRITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "netproxy: profile=limited, mode=limited, config=*pyproject.toml [[]tool.netproxy[]]",
            "*POST-RESULT False*",
        ]
    )


def test_bad_config_is_a_usage_error(pytester: pytest.Pytester) -> None:
    cfg = pytester.makefile(".toml", bad="[permissions.x.network]\nallow_local_bindings = true\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(*ARGS, f"--netproxy-config={cfg}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*allow_local_bindings*did you mean*allow_local_binding*"])


def test_marker_keywords_validated_and_registered(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.netproxy(allow=["a.example.com"], alow=["x"], sock5=False)
            def test_typo(netproxy):
                pass

            @pytest.mark.netproxy(allow=["api.example.com"], deny=["evil.example.com"],
                                  mode="limited", allow_local_binding=True, mitm=True,
                                  socks5=False, config={"hosts": {"x.example.com": ["192.0.2.1"]}})
            def test_all_keywords(netproxy):
                config = netproxy.config
                assert config.allowed_patterns == ("api.example.com",)
                assert config.denied_patterns == ("evil.example.com",)
                assert str(config.mode) == "limited" and config.allow_local_binding
                assert config.mitm.enabled is True and netproxy.socks_url is None
                assert netproxy.env()["NO_PROXY"] == "localhost,127.0.0.1,::1"

            @pytest.mark.netproxy(allow=["outer.example.com"], mode="limited")
            class TestClassMarks:
                @pytest.mark.netproxy(allow=["inner.example.com"], mode="full")
                def test_closest_wins(self, netproxy):
                    assert set(netproxy.config.allowed_patterns) == {
                        "outer.example.com", "inner.example.com"}
                    assert str(netproxy.config.mode) == "full"
            """
        )
    )
    result = pytester.runpytest_subprocess(*ARGS, "--strict-markers")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*unknown keyword(s) for @pytest.mark.netproxy: 'alow' (did you mean 'allow'?), 'sock5' (did you mean 'socks5'?)*"
        ]
    )


def test_netproxy_config_fixture_overrides_in_conftest(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        textwrap.dedent(
            """
            import pytest

            @pytest.fixture
            def netproxy_config():
                return {"allow": ["api.example.com"], "mode": "limited"}
            """
        )
    )
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest

            def test_from_conftest(netproxy):
                assert netproxy.config.allowed_patterns == ("api.example.com",)
                assert str(netproxy.config.mode) == "limited"

            @pytest.mark.netproxy(mode="full")
            def test_marker_beats_fixture(netproxy):
                assert str(netproxy.config.mode) == "full"

            @pytest.mark.netproxy(config={"allow_local_bindings": True})
            def test_bad_key(netproxy):
                pass
            """
        )
    )
    result = pytester.runpytest_subprocess(*ARGS)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*unknown keyword(s) for netproxy config: 'allow_local_bindings' (did you mean 'allow_local_binding'?)*"
        ]
    )


def test_audit_log_has_every_event_with_test_id(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            def test_one(netproxy):
                netproxy.run(["curl", "-sS", "http://one.example.com/"])

            def test_two(netproxy):
                netproxy.run(["curl", "-sS", "http://two.example.com/"])
            """
        )
    )
    log = pytester.path / "audit.jsonl"
    result = pytester.runpytest_subprocess(*ARGS, f"--netproxy-audit-log={log}")
    result.assert_outcomes(passed=2)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["server.address"], e["netproxy.test_id"]) for e in events] == [
        ("one.example.com", "test_audit_log_has_every_event_with_test_id.py::test_one"),
        ("two.example.com", "test_audit_log_has_every_event_with_test_id.py::test_two"),
    ]
    assert {e["event.name"] for e in events} == {"netproxy.policy_decision"}


STRICT = """
import pytest

def test_unasserted_block(netproxy):
    netproxy.run(["curl", "-sS", "http://evil.example.com/"])

def test_asserted_block(netproxy):
    netproxy.run(["curl", "-sS", "http://evil.example.com/"])
    netproxy.assert_blocked("evil.example.com")

def test_expected_block(netproxy):
    netproxy.expect_blocked("evil.example.com", reason="not_allowed")
    netproxy.run(["curl", "-sS", "http://evil.example.com/"])

def test_expected_with_other_reason(netproxy):
    netproxy.expect_blocked("evil.example.com", reason="denied")
    netproxy.run(["curl", "-sS", "http://evil.example.com/"])

@pytest.mark.netproxy(strict=False)
def test_marker_turns_strict_off(netproxy):
    netproxy.run(["curl", "-sS", "http://evil.example.com/"])
"""


@pytest.mark.parametrize("how", ["option", "ini"])
def test_strict_mode_fails_unasserted_blocks(pytester: pytest.Pytester, how: str) -> None:
    pytester.makepyfile(test_strict=STRICT)
    args = list(ARGS)
    if how == "option":
        args.append("--netproxy-strict")
    else:
        pytester.makeini("[pytest]\nnetproxy_strict = true\n")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=5, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_unasserted_block*",
            "*netproxy strict mode: unexpected blocked request(s): evil.example.com:80 (not_allowed)*",
            "*ERROR at teardown of test_expected_with_other_reason*",
        ]
    )
    if how == "option":  # negative control: without strict mode every test passes
        pytester.runpytest_subprocess(*ARGS).assert_outcomes(passed=5)


def test_assertion_messages_list_decisions_and_policy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.netproxy(allow=["api.example.com"], deny=["evil.example.com"])
            def test_wrong_expectation(netproxy):
                fake = netproxy.fake_host("api.example.com", tls=False)
                netproxy.run(["curl", "-sS", fake.url + "/"])
                netproxy.run(["curl", "-sS", "http://evil.example.com/"])
                netproxy.assert_blocked("api.example.com", reason="denied")
            """
        )
    )
    result = pytester.runpytest_subprocess(*ARGS)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*AssertionError: expected 'api.example.com' to be blocked with reason 'denied'",
            "E*decisions recorded by this test (2):",
            "E*  allow  GET  api.example.com:80   reason=allow   source=baseline_policy  protocol=http",
            "E*  deny   GET  evil.example.com:80  reason=denied  source=baseline_policy  protocol=http",
            "E*policy in force: profile=full  mode=full  allow=[[]api.example.com[]]  deny=[[]evil.example.com[]]  allow_local_binding=false",
        ]
    )
    assert "assertions.py" not in result.stdout.str()
