"""`NetproxyHandle`: the object a test touches as ``netproxy`` (SPEC §14.1).

Wraps one running proxy (a `BackgroundProxy`): URLs and CA paths, the child environment, subprocess
helpers, runtime policy changes, credentials, fake hosts, this proxy's decisions and the
assertion helpers. `close()` stops everything the handle started (children, fake hosts, the
proxy thread) and is safe to call twice.

Not here: building the configuration (``settings``), fixture lifetimes (``fixtures``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from netproxy_core import (
    BackgroundProxy,
    BlockedRecord,
    CertificateAuthority,
    PolicyDecisionEvent,
    ProxyConfig,
    Reason,
    child_env,
    strip_managed_env,
)
from netproxy_core.config.model import Mode
from netproxy_core.isolate import Isolation, check_isolation

from . import assertions
from .assertions import Expectation, normalize_host
from .fakehost import FakeHost

__all__ = ["NetproxyHandle"]

_RUN_TIMEOUT = 60.0
_KILL_WAIT = 5.0


class NetproxyHandle:
    """A running proxy for one test (or one `make_netproxy` call).

    Attributes:
        proxy: the underlying `BackgroundProxy` (on the worker's shared loop).
        test_id: the pytest node id stamped on every event (``netproxy.test_id``).
        strict: fail the test at teardown on a refusal it did not assert or expect.
    """

    def __init__(
        self,
        proxy: BackgroundProxy,
        *,
        ca: CertificateAuthority,
        test_id: str,
        strict: bool = False,
        home: Path | None = None,
    ) -> None:
        self.proxy = proxy
        self.test_id = test_id
        self.strict = strict
        self._ca = ca
        self._home = home
        self._ca_files: tuple[Path, Path] | None = None
        self._fakes: list[FakeHost] = []
        self._children: list[subprocess.Popen[Any]] = []
        self._expected: list[Expectation] = []
        self._credentials: dict[str, str] = {}
        self._isolation: Isolation | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.http_url
        return (
            f"<netproxy {state} test={self.test_id!r} decisions={len(self.decisions)} "
            f"fake_hosts={[f.name for f in self._fakes]}>"
        )

    # --- endpoints ----------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return self.proxy.http_url

    @property
    def socks_url(self) -> str | None:
        return self.proxy.socks_url

    @property
    def ca_cert_path(self) -> Path | None:
        files = self._session_ca_files()
        return self.proxy.ca_cert_path or (files[0] if files else None)

    @property
    def ca_bundle_path(self) -> Path | None:
        files = self._session_ca_files()
        return self.proxy.ca_bundle_path or (files[1] if files else None)

    def _session_ca_files(self) -> tuple[Path, Path] | None:
        """The session CA's public files for a proxy without a CA of its own (``mitm=False``).

        Fake hosts' certificates come from the session CA, so children must trust it even
        when nothing is intercepted (SPEC §9: the plugin's proxies always have a CA).
        """
        if self.proxy.ca_cert_path is not None or self._home is None:
            return None
        if self._ca_files is None:
            self._ca_files = self._ca.write_public_files(self._home, self.config.upstream_ca_files)
        return self._ca_files

    @property
    def config(self) -> ProxyConfig:
        """The configuration in force now (runtime changes included)."""
        return self.proxy.config

    # --- children -----------------------------------------------------------------------

    def env(self, base: Mapping[str, str] | None = None, *, socks: bool = False) -> dict[str, str]:
        """The environment for a child process (SPEC §9).

        Args:
            base: the starting environment (default: this process's, minus any proxy
                variables it already had). Not mutated.
            socks: ``ALL_PROXY`` = the ``socks5h://`` URL.
        """
        start = dict(strip_managed_env(os.environ) if base is None else base)
        start.update(self._credentials)
        return child_env(
            self,
            start,
            socks=socks,
            allow_local_binding=self.config.allow_local_binding,
        )

    def run(
        self, args: Sequence[str] | str, *, isolate: bool = False, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run` with `env()`, captured text output and a 60 s timeout (each
        overridable by keyword).

        ``isolate=True`` (Linux): the child's only way out is this proxy (docs/isolation.md);
        raises `IsolationUnavailable` when namespaces cannot be created, never runs unisolated.
        """
        kwargs.setdefault("env", self.env())
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", _RUN_TIMEOUT)
        kwargs.setdefault("check", False)
        if isolate:
            return self._isolated().run(args, **kwargs)
        return subprocess.run(args, **kwargs)

    def popen(
        self, args: Sequence[str] | str, *, isolate: bool = False, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """`subprocess.Popen` with `env()`; a child still running at teardown is killed.

        ``isolate=True``: as for `run`; the result is an `IsolatedPopen` (``child_pid`` is
        the command's pid, ``pid`` the namespace bridge's).
        """
        kwargs.setdefault("env", self.env())
        child: subprocess.Popen[Any]
        if isolate:
            child = self._isolated().popen(args, **kwargs)
        else:
            child = subprocess.Popen(args, **kwargs)
        self._children.append(child)
        return child

    def _isolated(self) -> Isolation:
        """This proxy's `Isolation` (relays opened on first use, closed with the handle)."""
        if self._isolation is None:
            check_isolation()
            handle = self.proxy.handle
            if handle is None:
                raise RuntimeError("the proxy is not running (the test's fixture was torn down)")
            isolation = Isolation(http_addr=handle.http_addr, socks_addr=handle.socks_addr)
            self._isolation = isolation.__enter__()
        return self._isolation

    # --- runtime policy -----------------------------------------------------------------

    def allow(self, *patterns: str) -> None:
        self.proxy.allow(*patterns)

    def deny(self, *patterns: str) -> None:
        self.proxy.deny(*patterns)

    def set_mode(self, mode: str | Mode) -> None:
        self.proxy.set_mode(mode)

    def credentials(self, **real: str) -> None:
        """Turn the credential broker on and hand it real values (SPEC §8).

        `env()` then carries same-shaped dummies instead (e.g. ``credentials(GH_TOKEN=…)``);
        the proxy swaps a dummy for the real value only on intercepted TLS to a host the
        credential is bound to. The real values stay in this process's memory.
        """
        engine = self._engine()
        if not self.config.credential_broker:
            self.proxy.reload(self.config.with_changes(credential_broker=True))
        if getattr(engine, "broker", None) is None:
            raise RuntimeError("this netproxy_core build has no credential broker")
        self._credentials.update({k: str(v) for k, v in real.items()})

    def fake_host(self, name: str, *, port: int | None = None, tls: bool = True) -> FakeHost:
        """Serve a `FakeHost` reachable through this proxy as ``name:port``.

        The host is NOT allowed by this: the policy stays what the test says.
        """
        host = normalize_host(name)
        public_port = port if port is not None else (443 if tls else 80)
        context = self._ca.server_context(host) if tls else None
        fake = FakeHost(host, port=public_port, tls=tls, ssl_context=context)
        self.proxy.call(fake.start)
        self._fakes.append(fake)
        key = f"[{host}]:{public_port}" if ":" in host else f"{host}:{public_port}"
        target = f"{fake.address[0]}:{fake.address[1]}"
        config = self.config
        routes = (*(r for r in config.routes if r[0] != key), (key, target))
        self.proxy.reload(config.with_changes(routes=routes))
        return fake

    def _engine(self) -> Any:
        engine = self.proxy.proxy
        if engine is None:
            raise RuntimeError("the netproxy fixture's proxy is not running")
        return engine

    # --- what happened ------------------------------------------------------------------

    @property
    def decisions(self) -> list[PolicyDecisionEvent]:
        """This proxy's decision events (since the last `clear()`), oldest first."""
        return self.proxy.events()

    @property
    def blocked(self) -> list[BlockedRecord]:
        """This proxy's blocked records (since the last `clear()`), oldest first."""
        return self.proxy.blocked()

    def clear(self) -> None:
        """Forget the decisions and blocked records recorded so far."""
        self._engine().clear_records()

    # --- assertions ---------------------------------------------------------------------

    def assert_allowed(
        self, host: str, *, method: str | None = None, port: int | None = None
    ) -> None:
        __tracebackhide__ = True
        assertions.assert_allowed(self.decisions, self.config, host, method=method, port=port)

    def assert_blocked(
        self,
        host: str,
        *,
        reason: str | Reason | None = None,
        method: str | None = None,
        port: int | None = None,
    ) -> None:
        __tracebackhide__ = True
        self._expected.append(
            assertions.assert_blocked(
                self.decisions, self.config, host, reason=reason, method=method, port=port
            )
        )

    def assert_not_contacted(self, host: str) -> None:
        __tracebackhide__ = True
        assertions.assert_not_contacted(self.decisions, self.config, host)

    def assert_no_blocked(self) -> None:
        __tracebackhide__ = True
        assertions.assert_no_blocked(self.decisions, self.config)

    def expect_blocked(self, host: str, *, reason: str | Reason | None = None) -> None:
        """Declare a refusal this test expects (strict mode); another reason is unexpected."""
        want = None if reason is None else str(reason)
        if want is not None and want not in {r.value for r in Reason}:
            known = ", ".join(r.value for r in Reason)
            raise ValueError(f"unknown reason {want!r}; reasons are: {known}")
        self._expected.append(Expectation(normalize_host(host), want))

    def unexpected_blocks(self) -> list[PolicyDecisionEvent]:
        """Refusals not covered by `assert_blocked` / `expect_blocked` (strict mode)."""
        return assertions.unexpected_blocks(self.decisions, self._expected)

    # --- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Kill remaining children, stop fake hosts, stop the proxy. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for child in self._children:
                _reap(child)
            if self._isolation is not None:
                self._isolation.close()
            for fake in self._fakes:
                self.proxy.call(fake.stop)
        finally:
            self._credentials.clear()
            self.proxy.close()


def _reap(child: subprocess.Popen[Any]) -> None:
    if child.poll() is None:
        child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(_KILL_WAIT)
    for stream in (child.stdin, child.stdout, child.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
