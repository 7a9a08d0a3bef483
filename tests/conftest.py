"""Shared fixtures: trustme CA, recording origins, a proxy factory on ephemeral ports."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

from helpers.origins import Origin, run_origin, write_ca
from netproxy_core import BackgroundProxy, ProxyConfig
from netproxy_core.config.model import Access, Mode

settings.register_profile("ci", max_examples=150, deadline=None)
settings.register_profile("deep", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def origin_ca() -> trustme.CA:
    """The CA that signs test origins' certificates (the proxy trusts it via upstream_ca_files)."""
    return trustme.CA()


@pytest.fixture(scope="session")
def origin_ca_file(origin_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ca(origin_ca, tmp_path_factory.mktemp("origin-ca"))


@pytest.fixture
def origin() -> Iterator[Origin]:
    with run_origin() as o:
        yield o


@pytest.fixture
def tls_origin(origin_ca: trustme.CA) -> Iterator[Origin]:
    with run_origin(origin_ca) as o:
        yield o


ProxyFactory = Callable[..., AbstractContextManager[BackgroundProxy]]


@pytest.fixture
def start_proxy(tmp_path: Path, origin_ca_file: Path) -> ProxyFactory:
    """`with start_proxy(allow=[...], deny=[...], routes={...}, **config) as p:` on ports 0.

    The origin CA is always trusted for outbound TLS; upstream proxy variables of this process
    are ignored (upstream_env={}) unless `upstream_env` is given.
    """

    @contextmanager
    def factory(
        *,
        allow: tuple[str, ...] | list[str] = (),
        deny: tuple[str, ...] | list[str] = (),
        routes: dict[str, str] | None = None,
        mode: str = "full",
        upstream_env: dict[str, str] | None = None,
        decider: Any = None,
        **config: Any,
    ) -> Iterator[BackgroundProxy]:
        domains = tuple((p, Access.ALLOW) for p in allow) + tuple((p, Access.DENY) for p in deny)
        cfg = ProxyConfig(
            proxy_url="127.0.0.1:0",
            socks_url="127.0.0.1:0",
            domains=domains,
            mode=Mode(mode),
            routes=tuple((routes or {}).items()),
            upstream_ca_files=(str(origin_ca_file),),
            **config,
        )
        with BackgroundProxy(
            cfg,
            home=tmp_path / "home",
            decider=decider,
            upstream_env=upstream_env if upstream_env is not None else {},
        ) as proxy:
            yield proxy

    return factory
