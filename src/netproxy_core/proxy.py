"""`NetworkProxy`: builder, listeners, connection limits, graceful shutdown (SPEC §13, §15).

Assembly only: protocol work happens in `handlers/`. One proxy instance owns its state,
audit bus, CA and connection table; two proxies in one process never share anything.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from .audit import AuditBus, BlockedRecord, EventSink, PolicyDecisionEvent
from .broker import CredentialBroker
from .certs import CertificateAuthority
from .config.addresses import bind_addr, format_addr
from .config.loader import load_config, validate_config
from .config.model import Mode, ProxyConfig
from .errors import ConfigError
from .handlers.context import Decider, ProxyContext
from .handlers.decide import decide
from .handlers.fast_forward import serve_http_connection
from .handlers.intercept import MitmInterceptor
from .handlers.socks import serve_socks_client
from .mitm_hooks import compile_hooks
from .net.adopt import close_now, peer_address
from .net.listener import TransportListener
from .net.resolve import Resolver
from .net.upstream import UpstreamProxies
from .policy.model import NetworkDecision, NetworkPolicyRequest
from .state import RuntimeState

try:  # anyio's per-task cancel-scope stacks (private: read to honour shields, see `_shielded`)
    from anyio._backends._asyncio import _task_states as _anyio_task_states
except ImportError:  # pragma: no cover - another anyio layout
    _anyio_task_states = None  # type: ignore[assignment]

__all__ = ["NetworkProxy", "NetworkProxyBuilder", "ProxyHandle", "default_home"]

log = logging.getLogger("netproxy.proxy")
_DEFAULT_SOCKS_URL = ProxyConfig.__dataclass_fields__["socks_url"].default


def default_home() -> Path:
    """``$NETPROXY_HOME`` or ``~/.netproxy``."""
    env = os.environ.get("NETPROXY_HOME")
    return Path(env) if env else Path.home() / ".netproxy"


class NetworkProxyBuilder:
    """Fluent construction of a `NetworkProxy` (SPEC §13)."""

    def __init__(self) -> None:
        self._config = ProxyConfig()
        self._http: str | None = None
        self._socks: str | None = None
        self._admin: str | None = None
        self._decider: Decider | None = None
        self._sinks: list[tuple[EventSink, bool]] = []
        self._reloader: Callable[[], ProxyConfig] | None = None
        self._ca: CertificateAuthority | None = None
        self._home: Path | None = None
        self._resolver: Resolver | None = None
        self._extra: dict[str, str] = {}
        self._upstream_env: dict[str, str] | None = None

    def config(self, config: ProxyConfig) -> NetworkProxyBuilder:
        self._config = config
        return self

    def http_addr(self, addr: str) -> NetworkProxyBuilder:
        self._http = addr
        return self

    def socks_addr(self, addr: str) -> NetworkProxyBuilder:
        self._socks = addr
        return self

    def admin_addr(self, addr: str) -> NetworkProxyBuilder:
        self._admin = addr
        return self

    def policy_decider(self, decider: Decider) -> NetworkProxyBuilder:
        self._decider = decider
        return self

    def event_sink(self, sink: EventSink, *, inline: bool = False) -> NetworkProxyBuilder:
        """Deliver every decision event to `sink` (on its own thread unless `inline`).

        A sink that raises or is slow never breaks or stalls request handling; `inline=True`
        calls it on the event loop before the request proceeds (only for instant sinks).
        """
        self._sinks.append((sink, inline))
        return self

    def reloader(self, load: Callable[[], ProxyConfig]) -> NetworkProxyBuilder:
        """How `POST /reload` and SIGHUP re-read the configuration (default: its files)."""
        self._reloader = load
        return self

    def certificate_authority(self, ca: CertificateAuthority) -> NetworkProxyBuilder:
        """Share a CA (e.g. one per pytest session) instead of generating one."""
        self._ca = ca
        return self

    def home(self, path: str | os.PathLike[str]) -> NetworkProxyBuilder:
        self._home = Path(path)
        return self

    def resolver(self, resolver: Resolver) -> NetworkProxyBuilder:
        self._resolver = resolver
        return self

    def audit_fields(self, **fields: str) -> NetworkProxyBuilder:
        """Optional event fields (``netproxy.test_id``, ``conversation.id`` …)."""
        self._extra.update(fields)
        return self

    def upstream_env(self, env: dict[str, str]) -> NetworkProxyBuilder:
        """Environment to read upstream proxy variables from (default: this process's)."""
        self._upstream_env = env
        return self

    async def build(self) -> NetworkProxy:
        config = self._config
        changes: dict[str, Any] = {}
        if self._http is not None:
            changes["proxy_url"] = self._http
        if self._socks is not None:
            changes["socks_url"] = self._socks
        if self._admin is not None:
            changes["admin_url"] = self._admin
        if changes:
            config = config.with_changes(**changes)
        return NetworkProxy(
            config,
            decider=self._decider,
            sinks=[s for s, inline in self._sinks if not inline],
            inline_sinks=[s for s, inline in self._sinks if inline],
            reloader=self._reloader,
            ca=self._ca,
            home=self._home,
            resolver=self._resolver,
            audit_fields=self._extra,
            upstream=UpstreamProxies.from_env(self._upstream_env),
        )


@dataclass(slots=True, eq=False)
class _Connection:
    """One served connection: its task when the proxy started that task itself
    (`TransportListener.serve_started`), else the cancel scope its task entered.

    A task of the proxy's own has no cancel scope of its own (entering and leaving one costs
    more than the rest of a CONNECT's bookkeeping): `cancel` cancels the task as a scope
    would — not while it is inside a shielded anyio scope, and again each time `_drain`
    asks, as anyio re-delivers a cancellation at every unshielded wait.
    """

    scope: anyio.CancelScope | None = None
    task: asyncio.Task[None] | None = None
    started: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True  # a task not yet started closes its stream at once
        if self.scope is not None:
            self.scope.cancel()
        elif (
            self.started
            and self.task is not None
            and not self.task.done()
            and not _shielded(self.task)
        ):
            self.task.cancel()


def _shielded(task: asyncio.Task[None]) -> bool:
    """The task is inside a shielded anyio cancel scope (anyio would not cancel it now).

    Read from anyio's private state; another layout reads as unshielded (a shutdown past its
    grace then cancels the task outright).
    """
    state = None if _anyio_task_states is None else _anyio_task_states.get(task)
    scope: Any = getattr(state, "cancel_scope", None)
    while scope is not None:
        if getattr(scope, "_shield", False):
            return True
        scope = getattr(scope, "_parent_scope", None)
    return False


@dataclass(slots=True, eq=False)
class ProxyHandle:
    """A running proxy: the addresses actually bound and `shutdown()`."""

    proxy: NetworkProxy
    http_addr: tuple[str, int] | None
    socks_addr: tuple[str, int] | None
    admin_addr: tuple[str, int] | None = None
    ca_cert_path: Path | None = None
    ca_bundle_path: Path | None = None
    _stop: anyio.Event = field(default_factory=anyio.Event)
    _done: anyio.Event = field(default_factory=anyio.Event)
    _task: asyncio.Task[None] | None = None
    _in_context: bool = False  # started by `async with proxy.run()`

    @property
    def http_url(self) -> str | None:
        return f"http://{format_addr(*self.http_addr)}" if self.http_addr else None

    @property
    def socks_url(self) -> str | None:
        return f"socks5h://{format_addr(*self.socks_addr)}" if self.socks_addr else None

    async def shutdown(self) -> None:
        """Stop accepting, let open exchanges finish (up to `shutdown_grace`), close."""
        self._stop.set()
        await self._done.wait()

    async def wait(self) -> None:
        await self._done.wait()


class _RunCall:
    """`await proxy.run()` or `async with proxy.run() as handle`."""

    def __init__(self, proxy: NetworkProxy) -> None:
        self._proxy = proxy
        self._cm: Any = None

    def __await__(self) -> Generator[Any, None, ProxyHandle]:
        return self._start_detached().__await__()

    async def _start_detached(self) -> ProxyHandle:
        started: asyncio.Future[ProxyHandle] = asyncio.get_running_loop().create_future()

        async def main() -> None:
            try:
                async with self._proxy._serving() as handle:
                    started.set_result(handle)
                    await handle._stop.wait()
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                    return
                raise

        task = asyncio.get_running_loop().create_task(main())
        handle = await started
        handle._task = task
        return handle

    async def __aenter__(self) -> ProxyHandle:
        self._cm = self._proxy._serving()
        handle: ProxyHandle = await self._cm.__aenter__()
        handle._in_context = True  # `await handle.shutdown()` inside the block must not hang
        return handle

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(*exc)


class NetworkProxy:
    """The proxy engine. Build with `NetworkProxy.builder()`; serve with `run()`."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        decider: Decider | None = None,
        sinks: list[EventSink] | None = None,
        inline_sinks: list[EventSink] | None = None,
        reloader: Callable[[], ProxyConfig] | None = None,
        ca: CertificateAuthority | None = None,
        home: Path | None = None,
        resolver: Resolver | None = None,
        audit_fields: dict[str, str] | None = None,
        upstream: UpstreamProxies | None = None,
    ) -> None:
        validate_config(config)  # a hand-built ProxyConfig gets the loader's checks too
        self.state = RuntimeState(config)
        otel = None
        if config.otel.enabled:
            from .otel import OtelSink

            otel = OtelSink(config.otel)  # ConfigError without the `otel` extra
        self.audit = AuditBus(audit_log=config.audit_log, extra=audit_fields)
        for sink in sinks or ():
            self.audit.add_sink(sink)
        for sink in inline_sinks or ():
            self.audit.add_sink(sink, inline=True)
        if otel is not None:  # the SDK batches and exports on its own thread
            self.audit.add_sink(otel, inline=True, close=otel.close)
        self._reloader = reloader
        self.admin_token: str | None = None
        self.home = home or default_home()
        if ca is None and config.mitm_possible:
            ca = (
                CertificateAuthority.from_files(
                    config.mitm.ca.certificate_file, config.mitm.ca.private_key_file
                )
                if config.mitm.ca is not None
                else CertificateAuthority.generate()
            )
        self.ca = ca if config.mitm_possible else None
        # Hooks are compiled (secrets read, matchers checked) now: bad hooks fail the build.
        self._interceptor = MitmInterceptor(compile_hooks(config.mitm))
        self.ctx = ProxyContext(
            state=self.state,
            audit=self.audit,
            resolver=resolver or Resolver(timeout=config.limits.dns_timeout),
            decider=decider,
            ca=self.ca,
            upstream=upstream or UpstreamProxies.from_env(),
            intercept=self._interceptor if self.ca is not None else None,
        )
        # One broker per proxy: it virtualises child envs and swaps dummies at request time.
        self.broker = CredentialBroker.from_config(config) if config.credential_broker else None
        if self.broker is not None:
            self.ctx.broker = self.broker
            self.ctx.broker_hosts = self.broker.is_bound
        self._connections: dict[_Connection, None] = {}
        self._over_limit_logged = False
        self.handle: ProxyHandle | None = None

    def __repr__(self) -> str:
        return f"<NetworkProxy {self.state!r}>"

    @staticmethod
    def builder() -> NetworkProxyBuilder:
        return NetworkProxyBuilder()

    @property
    def config(self) -> ProxyConfig:
        return self.state.config

    # The running listeners (None until `run()`), so `child_env(proxy)` works on the engine too.
    @property
    def http_url(self) -> str | None:
        return self.handle.http_url if self.handle else None

    @property
    def socks_url(self) -> str | None:
        return self.handle.socks_url if self.handle else None

    @property
    def ca_cert_path(self) -> Path | None:
        return self.handle.ca_cert_path if self.handle else None

    @property
    def ca_bundle_path(self) -> Path | None:
        return self.handle.ca_bundle_path if self.handle else None

    # --- policy API ---------------------------------------------------------------------

    async def evaluate(self, request: NetworkPolicyRequest) -> NetworkDecision:
        """Evaluate a request without traffic (audited like a real one)."""
        return await decide(self.ctx, request)

    def allow(self, *patterns: str) -> None:
        self.state.allow(*patterns)

    def deny(self, *patterns: str) -> None:
        self.state.deny(*patterns)

    def set_mode(self, mode: str | Mode) -> None:
        self.state.set_mode(mode)

    def events(self) -> list[PolicyDecisionEvent]:
        return self.audit.events()

    def blocked(self) -> list[BlockedRecord]:
        return self.audit.blocked()

    def clear_records(self) -> None:
        """Forget recorded events and blocked records (the blocked total is kept)."""
        self.audit.clear()

    def reload(self, config: ProxyConfig) -> None:
        """Swap in a new configuration (listener addresses stay as bound).

        Raises:
            ConfigError: a MITM hook of `config` does not compile (the old config stays).
        """
        hooks = compile_hooks(config.mitm)
        if config.credential_broker and self.broker is None and self.ca is not None:
            # Turned on at runtime (the pytest plugin's `credentials()`); kept once made.
            self.broker = CredentialBroker.from_config(config)
            self.ctx.broker, self.ctx.broker_hosts = self.broker, self.broker.is_bound
        self.state.replace(config)
        self._interceptor.hooks = hooks
        self.ctx._origin_tls = None
        if isinstance(self.ctx.resolver, Resolver):  # limits apply live (SPEC §15)
            self.ctx.resolver.timeout = config.limits.dns_timeout

    def reload_from_sources(self) -> ProxyConfig:
        """Re-read the configuration (admin ``POST /reload``, SIGHUP) and swap it in.

        Uses the builder's `reloader`, else the current config's files and profile. Listener
        addresses, the audit log, OpenTelemetry export and the admin token stay as started.

        Raises:
            NetproxyError: the new configuration is bad; the old one stays in force.
        """
        if self._reloader is not None:
            config = self._reloader()
        elif self.config.sources:
            config = load_config(list(self.config.sources), profile=self.config.profile)
        else:
            raise ConfigError("nothing to reload: this proxy was not configured from files")
        self.reload(config)
        return config

    # --- running ------------------------------------------------------------------------

    def run(self) -> _RunCall:
        return _RunCall(self)

    def _bind_addr(self, value: str, default_port: int) -> tuple[str, int]:
        config = self.config
        return bind_addr(
            value,
            default_port,
            what="listener",
            allow_non_loopback=config.dangerously_allow_non_loopback_proxy,
            flag="dangerously_allow_non_loopback_proxy",
            unix=config.unix_sockets_enabled,
        )

    @asynccontextmanager
    async def _serving(
        self, *, prebound: dict[str, socket.socket] | None = None
    ) -> AsyncIterator[ProxyHandle]:
        """Bind, serve, drain. `prebound`: listening sockets by listener ("HTTP", "SOCKS5"),
        bound ahead by `serve` (`serve.bind_early`); adopted where that listener would bind."""
        config = self.config
        early = dict(prebound or {})

        async def listen(host: str, port: int, what: str) -> anyio.abc.Listener[Any]:
            sock = early.pop(what, None)
            if sock is not None:
                at = sock.getsockname()
                if at[0] == host and (port == 0 or at[1] == port):
                    return TransportListener([sock])
                sock.close()
            return await _listen(host, port, what)

        if not config.enabled:
            raise ConfigError(
                "the proxy is disabled (enabled = false); nothing to serve", key="enabled"
            )
        listeners: list[tuple[anyio.abc.Listener[Any], Callable[..., Any]]] = []
        self.ctx.shutting_down = False  # a proxy may be run again after a shutdown
        self.ctx.origin_pool.reopen()
        try:
            http_host, http_port = self._bind_addr(config.proxy_url, 3128)
            http = await listen(http_host, http_port, "HTTP")
            listeners.append((http, serve_http_connection))
            socks = None
            if config.enable_socks5:
                socks_host, socks_port = self._bind_addr(config.socks_url, 8081)
                if http_port == 0 and config.socks_url == _DEFAULT_SOCKS_URL:
                    # An ephemeral HTTP listener asks for a throwaway proxy: never grab the
                    # fixed default SOCKS port behind the caller's back (parallel runs collide).
                    socks_port = 0
                socks = await listen(socks_host, socks_port, "SOCKS5")
                listeners.append((socks, serve_socks_client))
            handle = ProxyHandle(self, _bound(http), _bound(socks) if socks else None)
            if config.admin_url is not None:
                admin, serve_admin = await self._admin_listener(config)
                listeners.append((admin, serve_admin))
                handle.admin_addr = _bound(admin)
            if self.ca is not None:
                handle.ca_cert_path, handle.ca_bundle_path = self.ca.write_public_files(
                    self.home, config.upstream_ca_files
                )
            self.handle = handle
            async with anyio.create_task_group() as conns:
                try:
                    async with anyio.create_task_group() as accepts:
                        for listener, serve in listeners:
                            accepts.start_soon(self._accept_loop, listener, serve, conns)
                        accepts.start_soon(self._stop_when_asked, handle, listeners)
                        try:
                            yield handle
                        finally:
                            accepts.cancel_scope.cancel()
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._shutdown(conns, listeners)
                    handle._done.set()
        finally:
            for sock in early.values():  # not adopted
                sock.close()
            for listener, _ in listeners:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()
            with anyio.CancelScope(shield=True):  # lets threaded sinks drain, off the loop
                await anyio.to_thread.run_sync(self.audit.close)

    async def _stop_when_asked(
        self,
        handle: ProxyHandle,
        listeners: list[tuple[anyio.abc.Listener[Any], Callable[..., Any]]],
    ) -> None:
        """`await handle.shutdown()` inside `async with proxy.run()`: drain now.

        (A detached `await proxy.run()` is stopped by its own task leaving the context.)
        """
        await handle._stop.wait()
        if not handle._in_context:
            return
        with anyio.CancelScope(shield=True):
            await self._drain(listeners)
        handle._done.set()

    async def _admin_listener(
        self, config: ProxyConfig
    ) -> tuple[anyio.abc.Listener[Any], Callable[..., Any]]:
        from .admin import AdminApi, admin_bind_addr, write_admin_token

        host, port = admin_bind_addr(config)
        listener = await _listen(host, port, "the admin API")
        if self.admin_token is None:
            self.admin_token = config.admin_token or secrets.token_urlsafe(32)
        try:
            write_admin_token(self.home, self.admin_token)
        except OSError as exc:
            await listener.aclose()
            raise ConfigError(
                f"cannot write the admin token under {self.home}: {exc.strerror}"
            ) from None
        return listener, AdminApi(self, self.admin_token).serve

    async def _accept_loop(
        self,
        listener: anyio.abc.Listener[Any],
        serve: Callable[..., Any],
        conns: anyio.abc.TaskGroup,
    ) -> None:
        try:
            if isinstance(listener, TransportListener):
                # Each connection's task starts in the accept callback: no listener wake-up
                # and no anyio task machinery per connection (`_drain` ends these tasks).
                loop = asyncio.get_running_loop()
                await listener.serve_started(lambda stream: self._start(loop, stream, serve))
            else:

                async def handler(stream: anyio.abc.SocketStream) -> None:
                    await self._serve_connection(stream, serve, self._admit(stream))

                await listener.serve(handler, task_group=conns)
        except* anyio.ClosedResourceError:  # closed by a shutdown (a multi-listener groups it)
            pass

    def _admit(self, stream: anyio.abc.SocketStream) -> _Connection | None:
        """Register a new connection, or None when `max_connections` are open already."""
        limits = self.config.limits
        if len(self._connections) >= limits.max_connections:
            if not self._over_limit_logged:
                log.warning(
                    "more than %d connections: refusing new ones until some close",
                    limits.max_connections,
                )
                self._over_limit_logged = True
            return None
        self._over_limit_logged = False
        conn = _Connection()
        self._connections[conn] = None
        return conn

    def _start(
        self,
        loop: asyncio.AbstractEventLoop,
        stream: anyio.abc.SocketStream,
        serve: Callable[..., Any],
    ) -> None:
        """From the accept callback: register the connection and start its task."""
        try:
            conn = self._admit(stream)
            if conn is None:
                close_now(stream)
                return
            conn.task = loop.create_task(self._serve_connection(stream, serve, conn))
        except Exception:  # never let an accept callback fail: the loop would only log it
            log.exception("cannot serve an accepted connection")
            close_now(stream)

    async def _serve_connection(
        self,
        stream: anyio.abc.SocketStream,
        serve: Callable[..., Any],
        conn: _Connection | None,
    ) -> None:
        client: str | None = None
        try:
            if conn is None or conn.cancelled:  # over the limit, or cancelled before it began
                return
            conn.started = True
            peer = peer_address(stream)
            client = format_addr(str(peer[0]), int(peer[1])) if peer is not None else None
            if conn.task is not None:  # the proxy's own task: `_Connection.cancel` cancels it
                try:
                    await serve(self.ctx, stream, client)
                except Exception:
                    log.exception("connection from %s failed", client)
                return
            with anyio.CancelScope() as scope:
                conn.scope = scope
                try:
                    await serve(self.ctx, stream, client)
                except Exception:
                    log.exception("connection from %s failed", client)
        finally:
            if conn is not None:
                self._connections.pop(conn, None)
            if not close_now(stream):
                with anyio.CancelScope(shield=True):
                    await stream.aclose()

    async def _shutdown(
        self,
        tg: anyio.abc.TaskGroup,
        listeners: list[tuple[anyio.abc.Listener[Any], Callable[..., Any]]],
    ) -> None:
        await self._drain(listeners)
        tg.cancel_scope.cancel()

    async def _drain(
        self, listeners: list[tuple[anyio.abc.Listener[Any], Callable[..., Any]]]
    ) -> None:
        """Stop accepting, let open exchanges finish up to `shutdown_grace`, cancel the rest."""
        for listener, _ in listeners:
            await listener.aclose()
        self.ctx.shutting_down = True
        for idle in list(self.ctx.idle_waits):
            idle.cancel()
        grace = self.config.limits.shutdown_grace
        with anyio.move_on_after(grace):
            while self._connections:
                await anyio.sleep(0.02)
        conns = list(self._connections)
        for conn in conns:
            conn.cancel()
        # Tasks the proxy started itself (not in a task group): cancel them until they end,
        # as a cancelled scope would (a shielded part is let finish).
        tasks = {conn.task for conn in conns if conn.task is not None and not conn.task.done()}
        while tasks:
            _, tasks = await asyncio.wait(tasks, timeout=0.02)
            for conn in conns:
                if conn.task in tasks:
                    conn.cancel()
        self.ctx.origin_pool.close()


async def _listen(host: str, port: int, what: str) -> anyio.abc.Listener[Any]:
    try:
        bound = await anyio.create_tcp_listener(
            local_host=host, local_port=port, reuse_port=False, backlog=4096
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot listen for {what} on {format_addr(host, port)}: {exc.strerror}"
        ) from None
    raw = anyio.abc.SocketAttribute.raw_socket
    return TransportListener([listener.extra(raw) for listener in bound.listeners])


def _bound(listener: anyio.abc.Listener[Any]) -> tuple[str, int]:
    sockaddr = listener.extra(anyio.abc.SocketAttribute.local_address)
    return str(sockaddr[0]), int(sockaddr[1])
