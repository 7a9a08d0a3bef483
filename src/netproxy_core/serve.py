"""`netproxy-core serve`: run until SIGINT/SIGTERM, reload on SIGHUP, print the ready line.

The ready line is ONE JSON object on stdout (SPEC §12); logs go to stderr.

Start-up order: a loopback ``--http-addr`` is bound and listening straight after the flags
are parsed (`bind_flag_http`), the other listeners once the configuration is loaded
(`bind_early`) — all before the engine (anyio, handlers, TLS, the CA) is even imported. A
client may connect at once: its connection waits in the kernel's accept queue and is served
as soon as the engine is up. The ready line still comes only once every listener is served
and the CA files it names exist.

This module's own imports are kept light for the same reason.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from .config.model import ProxyConfig
    from .proxy import ProxyHandle

__all__ = ["bind_early", "bind_flag_http", "ready_line", "serve_forever"]

GC_YOUNGEST = 10_000  # allocations between collections of the youngest generation

_BACKLOG = 4096  # as the engine's own listeners


def ready_line(handle: ProxyHandle, admin_token: str | None = None) -> str:
    import json

    from .config.addresses import format_addr

    def addr(value: tuple[str, int] | None) -> str | None:
        return format_addr(*value) if value else None

    return json.dumps(
        {
            "event": "ready",
            "http": addr(handle.http_addr),
            "socks": addr(handle.socks_addr),
            "admin": addr(handle.admin_addr),
            "admin_token": admin_token if handle.admin_addr else None,
            "ca_cert": str(handle.ca_cert_path) if handle.ca_cert_path else None,
            "ca_bundle": str(handle.ca_bundle_path) if handle.ca_bundle_path else None,
            "pid": os.getpid(),
        }
    )


def _write_atomic(path: Path, text: str) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ready-")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def _backend_options() -> dict[str, Any]:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]  # noqa: F401  # `speed` extra
    except ImportError:
        return {}
    return {"use_uvloop": True}


# --- binding before the engine loads ----------------------------------------------------------


def bind_flag_http(value: str | None) -> socket.socket | None:
    """The HTTP listener for an ``--http-addr`` flag, bound before the configuration loads.

    Only a plain loopback IP literal with a port (``127.0.0.1:3128``, ``[::1]:3128``, with an
    optional ``http://``) qualifies: the flag beats every config layer, and a loopback address
    is bound as given whatever the configuration says (SPEC §2.2), so the answer cannot change.
    Anything else returns None and is bound later by `bind_early` or the engine, which also
    report any error exactly as before.
    """
    target = _loopback_literal(value) if value else None
    return _listening_socket(*target) if target else None


def _loopback_literal(value: str) -> tuple[str, int] | None:
    text = value.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0]
    host, sep, port = text.rpartition(":")
    if not sep or "@" in text or not (port.isascii() and port.isdigit()) or len(port) > 5:
        return None
    family = socket.AF_INET
    if host.startswith("[") and host.endswith("]"):
        host, family = host[1:-1], socket.AF_INET6
    elif ":" in host:
        return None
    try:
        canonical = socket.inet_ntop(family, socket.inet_pton(family, host))
    except (OSError, ValueError):
        return None
    loopback = host == "::1" if family == socket.AF_INET6 else host.startswith("127.")
    if canonical != host or not loopback or int(port) > 65535:
        return None
    return host, int(port)


def bind_early(
    config: ProxyConfig, early_http: socket.socket | None = None
) -> dict[str, socket.socket]:
    """Listening sockets for the HTTP and SOCKS5 listeners, bound before the engine loads.

    Bound exactly as the engine would bind them (same address rules, reuse-address, v6-only,
    backlog); `NetworkProxy` adopts them, so connections queued meanwhile are served.
    `early_http` (from `bind_flag_http`) is kept when it is where `config` puts the HTTP
    listener, else closed. Returns ``{"HTTP": sock, "SOCKS5": sock}`` for what could be bound;
    anything else (a bad address, a port in use) is left to the engine, which reports it
    exactly as without this step.
    """
    from .config.addresses import bind_addr
    from .config.model import ProxyConfig
    from .errors import NetproxyError

    def where(value: str, default_port: int) -> tuple[str, int] | None:
        try:
            return bind_addr(
                value,
                default_port,
                what="listener",
                allow_non_loopback=config.dangerously_allow_non_loopback_proxy,
                flag="dangerously_allow_non_loopback_proxy",
                unix=config.unix_sockets_enabled,
                warn=False,  # the engine's own bind logs it
            )
        except NetproxyError:
            return None

    early: dict[str, socket.socket] = {}
    http = where(config.proxy_url, 3128)
    if early_http is not None:
        at = early_http.getsockname()
        if http is not None and at[0] == http[0] and http[1] in (0, at[1]):
            early["HTTP"] = early_http
        else:
            early_http.close()
    if http is not None and "HTTP" not in early and (sock := _listening_socket(*http)):
        early["HTTP"] = sock
    if http is not None and config.enable_socks5:
        socks = where(config.socks_url, 8081)
        default_socks = ProxyConfig.__dataclass_fields__["socks_url"].default
        if socks is not None and http[1] == 0 and config.socks_url == default_socks:
            socks = (socks[0], 0)  # the engine's rule: an ephemeral HTTP port, ephemeral SOCKS
        if socks is not None and (sock := _listening_socket(*socks)) is not None:
            early["SOCKS5"] = sock
    return early


def _listening_socket(host: str, port: int) -> socket.socket | None:
    """A non-blocking TCP socket listening on IP literal `host`, as anyio would make it."""
    if "%" in host:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if sys.platform == "win32":  # pragma: no cover
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        return None
    return sock


# --- serving ----------------------------------------------------------------------------------


def serve_forever(
    config: ProxyConfig,
    args: argparse.Namespace,
    reload: Callable[[], ProxyConfig],
    notice: str | None = None,
    *,
    early_http: socket.socket | None = None,
) -> int:
    """Serve `config` until a terminating signal; returns the exit status.

    `notice` goes to stderr once the listeners are up (never before a start-up error).
    `early_http`: the HTTP listener `bind_flag_http` bound (this call owns it from now on).
    """
    early = bind_early(config, early_http)
    try:
        import anyio  # the engine loads while the listeners already queue connections

        return anyio.run(
            _serve, config, args, reload, notice, early, backend_options=_backend_options()
        )
    finally:
        for sock in early.values():  # adopted ones are closed already; this is a no-op then
            sock.close()


async def _serve(
    config: ProxyConfig,
    args: argparse.Namespace,
    reload: Callable[[], ProxyConfig],
    notice: str | None,
    early: dict[str, socket.socket],
) -> int:
    import gc
    import logging
    import signal
    from pathlib import Path

    import anyio

    from .errors import NetproxyError
    from .proxy import NetworkProxy, default_home

    log = logging.getLogger("netproxy.proxy")
    home = Path(args.home) if args.home else default_home()
    proxy = await NetworkProxy.builder().config(config).home(home).reloader(reload).build()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with proxy._serving(prebound=early) as handle:
            handle._in_context = True  # as `async with proxy.run()`
            line = ready_line(handle, getattr(proxy, "admin_token", None))
            if notice:
                print(notice, file=sys.stderr, flush=True)
            if args.ready_file:  # first, so whoever reads stdout finds the file too
                _write_atomic(Path(args.ready_file), line)
            print(line, flush=True)
            # The start-up heap (modules, the CA, compiled rules) lives as long as the process:
            # moved out of the collector's generations, full collections stop rescanning it.
            # Requests allocate dozens of short-lived containers each, freed by reference
            # counting; a youngest generation of 700 would be collected every few requests.
            gc.freeze()
            gc.set_threshold(GC_YOUNGEST, *gc.get_threshold()[1:])
            async for signum in signals:
                if signum != signal.SIGHUP:
                    log.info(
                        "received %s: shutting down (up to %ss for open exchanges)",
                        signal.Signals(signum).name,
                        config.limits.shutdown_grace,
                    )
                    break
                try:
                    new = proxy.reload_from_sources()
                    log.info("reloaded configuration from %s", ", ".join(new.sources) or "flags")
                except NetproxyError as exc:
                    log.error("reload failed, keeping the previous configuration: %s", exc)
    return 0
