"""The plugin's fixtures: `netproxy`, `netproxy_ca`, `make_netproxy`, `netproxy_config`
(SPEC §14.1). Set up, yield, tear down; nothing more.

Per worker (session scope): the CA, whose leaf key is made with it, its PEM file (which the
proxies trust as an upstream root, so fake hosts' certificates verify), and a home directory
for the proxies' public CA files; one event-loop thread (`WorkerLoop`). Per test: one
`NetworkProxy` on ephemeral ports, run on that loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from netproxy_core import CertificateAuthority, ConfigError, ProxyConfig

from .assertions import format_decisions, format_policy
from .handle import NetproxyHandle
from .loop import WorkerLoop
from .reporting import BLOCKED_PROPERTY, AuditLogWriter, encode_blocked
from .settings import MarkerOptions, PluginSettings, build_config, suite_config

__all__ = [
    "SETTINGS_KEY",
    "WRITER_KEY",
    "make_netproxy",
    "netproxy",
    "netproxy_ca",
    "netproxy_config",
]

SETTINGS_KEY = pytest.StashKey[PluginSettings]()
WRITER_KEY = pytest.StashKey[AuditLogWriter | None]()


@dataclass(slots=True, eq=False)
class _Session:
    """Per-worker resources shared by every proxy of the run."""

    settings: PluginSettings
    ca: CertificateAuthority
    ca_file: Path
    home: Path
    writer: AuditLogWriter | None
    loop: WorkerLoop
    _suites: dict[str | None, ProxyConfig] = field(default_factory=dict)

    def suite(self, profile: str | None) -> ProxyConfig:
        if profile not in self._suites:
            self._suites[profile] = suite_config(self.settings, profile)
        return self._suites[profile]

    def start(self, config: ProxyConfig, *, test_id: str, strict: bool) -> NetproxyHandle:
        config = config.with_changes(
            proxy_url="127.0.0.1:0",
            socks_url="127.0.0.1:0",
            admin_url="127.0.0.1:0" if config.admin_url is not None else None,
            upstream_ca_files=(*config.upstream_ca_files, str(self.ca_file)),
        )
        sinks = (self.writer,) if self.writer is not None else ()
        proxy = self.loop.start(
            config,
            ca=self.ca,
            home=self.home,
            sinks=sinks,
            audit_fields={"netproxy.test_id": test_id},
        )
        return NetproxyHandle(proxy, ca=self.ca, test_id=test_id, strict=strict, home=self.home)


def _fail(message: str) -> NoReturn:
    __tracebackhide__ = True
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def netproxy_ca() -> CertificateAuthority:
    """The session's CA (one per xdist worker): signs MITM leaves and fake hosts' certificates."""
    return CertificateAuthority.generate()


@pytest.fixture(scope="session")
def _netproxy_session(
    pytestconfig: pytest.Config,
    netproxy_ca: CertificateAuthority,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[_Session]:
    home = tmp_path_factory.mktemp("netproxy")
    ca_file = home / "session-ca.pem"
    ca_file.write_bytes(netproxy_ca.cert_pem)
    loop = WorkerLoop()
    try:
        yield _Session(
            settings=pytestconfig.stash[SETTINGS_KEY],
            ca=netproxy_ca,
            ca_file=ca_file,
            home=home,
            writer=pytestconfig.stash.get(WRITER_KEY, None),
            loop=loop,
        )
    finally:
        loop.close()


@pytest.fixture
def netproxy_config() -> dict[str, Any]:
    """Config overrides for this test's proxies (SPEC §2.2 keys); override in a conftest."""
    return {}


def _teardown(request: pytest.FixtureRequest, handle: NetproxyHandle) -> None:
    __tracebackhide__ = True
    try:
        events = handle.decisions
        config = handle.config
        unexpected = handle.unexpected_blocks() if handle.strict else []
    finally:
        handle.close()
    request.node.user_properties.append((BLOCKED_PROPERTY, encode_blocked(events)))
    if unexpected:
        names = ", ".join(sorted({f"{e.host}:{e.port} ({e.reason})" for e in unexpected}))
        _fail(
            f"netproxy strict mode: unexpected blocked request(s): {names}\n"
            "assert them with netproxy.assert_blocked(host) or declare them with "
            "netproxy.expect_blocked(host)\n"
            f"{format_decisions(events)}\n{format_policy(config)}"
        )


@pytest.fixture
def netproxy(
    request: pytest.FixtureRequest,
    netproxy_config: Mapping[str, Any],
    _netproxy_session: _Session,
) -> Iterator[NetproxyHandle]:
    """A running proxy for this test: suite profile < `netproxy_config` < marker."""
    session = _netproxy_session
    try:
        marker = MarkerOptions.from_node(request.node)
        base = session.suite(marker.profile)
        config = build_config(base, netproxy_config, marker.overrides())
        if marker.credentials:
            config = config.with_changes(credential_broker=True)
    except (ValueError, ConfigError) as exc:
        _fail(f"netproxy: {exc}")
    strict = session.settings.strict if marker.strict is None else marker.strict
    try:
        handle = session.start(config, test_id=request.node.nodeid, strict=strict)
    except ConfigError as exc:
        _fail(f"netproxy: cannot start the proxy: {exc}")
    try:
        if marker.credentials:
            handle.credentials(**marker.credentials)
    except BaseException:
        handle.close()
        raise
    yield handle
    _teardown(request, handle)


@pytest.fixture
def make_netproxy(
    request: pytest.FixtureRequest,
    netproxy_config: Mapping[str, Any],
    _netproxy_session: _Session,
) -> Iterator[Callable[..., NetproxyHandle]]:
    """``make_netproxy(**config_overrides)``: another proxy with the `netproxy` API, stopped
    at teardown. Overrides are SPEC §2.2 keys (plus ``allow``/``deny`` lists) applied over the
    suite profile and `netproxy_config`."""
    session = _netproxy_session
    handles: list[NetproxyHandle] = []

    def make(**overrides: Any) -> NetproxyHandle:
        __tracebackhide__ = True
        config = build_config(session.suite(None), netproxy_config, overrides)
        handle = session.start(config, test_id=request.node.nodeid, strict=session.settings.strict)
        handles.append(handle)
        return handle

    yield make
    failures: list[BaseException] = []
    for handle in handles:
        try:
            _teardown(request, handle)
        except BaseException as exc:  # tear every proxy down before reporting
            failures.append(exc)
    if failures:
        raise failures[0]
