"""pytest11 entry point of netproxy (SPEC §14): hooks only, and the fixtures re-exported.

Options mirror ini keys (CLI first, then ini, then ``[tool.netproxy]``, then defaults); the
``netproxy`` marker is registered; the header names the profile, mode and config; the blocked
requests summary is built from teardown reports, so it is right under pytest-xdist.
"""

from __future__ import annotations

import pytest

from netproxy_core import ConfigError

from .fixtures import (
    SETTINGS_KEY,
    WRITER_KEY,
    _netproxy_session,
    make_netproxy,
    netproxy,
    netproxy_ca,
    netproxy_config,
)
from .reporting import SUMMARY_TITLE, AuditLogWriter, BlockedSummary
from .settings import MARKER_KEYWORDS, PluginSettings, suite_config

__all__ = [
    "_netproxy_session",
    "make_netproxy",
    "netproxy",
    "netproxy_ca",
    "netproxy_config",
    "pytest_addoption",
    "pytest_configure",
    "pytest_report_header",
    "pytest_unconfigure",
]

_HEADER_KEY = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("netproxy", "netproxy network policy")
    group.addoption(
        "--netproxy-profile",
        dest="netproxy_profile",
        default=None,
        metavar="NAME",
        help="profile for every netproxy fixture, e.g. limited (ini: netproxy_profile)",
    )
    group.addoption(
        "--netproxy-config",
        dest="netproxy_config",
        action="append",
        default=None,
        metavar="PATH",
        help="netproxy TOML config; repeat for layers (ini: netproxy_config; default: "
        "[tool.netproxy] in pyproject.toml)",
    )
    group.addoption(
        "--netproxy-audit-log",
        dest="netproxy_audit_log",
        default=None,
        metavar="PATH",
        help="write every decision event of the run as JSON lines (ini: netproxy_audit_log)",
    )
    group.addoption(
        "--netproxy-strict",
        dest="netproxy_strict",
        action="store_true",
        default=False,
        help="fail a test whose blocked requests it did not assert (ini: netproxy_strict)",
    )
    parser.addini("netproxy_profile", "netproxy profile for the suite", type="string", default="")
    parser.addini("netproxy_config", "netproxy TOML config files", type="paths", default=[])
    parser.addini("netproxy_audit_log", "netproxy audit log (JSON lines)", default="")
    parser.addini("netproxy_strict", "netproxy strict mode", type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"netproxy({', '.join(f'{k}=…' for k in MARKER_KEYWORDS)}): "
        "configure this test's netproxy proxy",
    )
    settings = PluginSettings.from_pytest(config)
    try:
        suite = suite_config(settings)
    except ConfigError as exc:
        raise pytest.UsageError(f"netproxy: {exc}") from None
    config.stash[SETTINGS_KEY] = settings
    config.stash[_HEADER_KEY] = (
        f"netproxy: profile={suite.profile}, mode={suite.mode}, config={settings.sources_label}"
    )
    config.pluginmanager.register(_SummaryHooks(), "netproxy-summary")
    writer = None
    if settings.audit_log:
        is_worker = hasattr(config, "workerinput")
        try:
            writer = AuditLogWriter(settings.audit_log, truncate=not is_worker)
        except OSError as exc:
            raise pytest.UsageError(
                f"netproxy: cannot open --netproxy-audit-log {settings.audit_log}: {exc.strerror}"
            ) from None
    config.stash[WRITER_KEY] = writer


def pytest_unconfigure(config: pytest.Config) -> None:
    writer = config.stash.get(WRITER_KEY, None)
    if writer is not None:
        writer.close()


def pytest_report_header(config: pytest.Config) -> str:
    return config.stash[_HEADER_KEY]


class _SummaryHooks:
    """Collects refusals from teardown reports and prints them (controller or single process)."""

    def __init__(self) -> None:
        self.summary = BlockedSummary()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.summary.add_report(report)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.summary.tests:
            terminalreporter.write_sep("=", SUMMARY_TITLE)
            for line in self.summary.lines():
                terminalreporter.write_line(line)
