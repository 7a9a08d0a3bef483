"""`netproxy-core serve`: run until SIGINT/SIGTERM, reload on SIGHUP, print the ready line.

The ready line is ONE JSON object on stdout (SPEC §12); logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from .config.addresses import format_addr
from .config.model import ProxyConfig
from .errors import NetproxyError
from .proxy import NetworkProxy, ProxyHandle, default_home

__all__ = ["ready_line", "serve_forever"]

log = logging.getLogger("netproxy.proxy")


def ready_line(handle: ProxyHandle, admin_token: str | None = None) -> str:
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


def serve_forever(
    config: ProxyConfig,
    args: argparse.Namespace,
    reload: Callable[[], ProxyConfig],
    notice: str | None = None,
) -> int:
    """Serve `config` until a terminating signal; returns the exit status.

    `notice` goes to stderr once the listeners are up (never before a start-up error).
    """
    return anyio.run(_serve, config, args, reload, notice, backend_options=_backend_options())


async def _serve(
    config: ProxyConfig,
    args: argparse.Namespace,
    reload: Callable[[], ProxyConfig],
    notice: str | None = None,
) -> int:
    home = Path(args.home) if args.home else default_home()
    proxy = await NetworkProxy.builder().config(config).home(home).reloader(reload).build()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with proxy.run() as handle:
            line = ready_line(handle, getattr(proxy, "admin_token", None))
            if notice:
                print(notice, file=sys.stderr, flush=True)
            if args.ready_file:  # first, so whoever reads stdout finds the file too
                _write_atomic(Path(args.ready_file), line)
            print(line, flush=True)
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
