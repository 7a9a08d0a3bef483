"""`netproxy-core run [serve options] [--socks] -- CMD…` (SPEC §12).

Starts a proxy on ephemeral loopback ports, runs CMD with the child environment (SPEC §9;
credentials virtualised when the broker is on), forwards SIGINT/SIGTERM to it, stops the
proxy, prints a summary of allowed and blocked destinations to stderr and returns CMD's
exit status (128 + N when CMD was killed by signal N).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Final

from .audit import PolicyDecisionEvent
from .background import BackgroundProxy
from .child_env import child_env
from .config.model import ProxyConfig
from .errors import NetproxyError
from .hosts import format_host_port
from .isolate import Isolation, check_isolation

__all__ = ["Summary", "run_command"]

PROG: Final = "netproxy-core"
FORWARDED: Final = (signal.SIGINT, signal.SIGTERM)
Popen = subprocess.Popen[bytes]


class Summary:
    """Counts of policy decisions per destination (an audit sink; thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.allowed: Counter[str] = Counter()
        self.blocked: Counter[tuple[str, str]] = Counter()

    def __call__(self, event: PolicyDecisionEvent) -> None:
        dest = format_host_port(event.host, event.port)
        with self._lock:
            if str(event.decision) == "allow":
                self.allowed[dest] += 1
            else:
                self.blocked[(dest, str(event.reason))] += 1

    def lines(self) -> list[str]:
        with self._lock:
            allowed, blocked = dict(self.allowed), dict(self.blocked)
        if not allowed and not blocked:
            return ["netproxy: summary: no network requests"]
        out = [
            f"netproxy: summary: {len(allowed)} destination(s) allowed, "
            f"{len({d for d, _ in blocked})} blocked"
        ]
        for dest, count in sorted(allowed.items()):
            out.append(f"netproxy:   allowed {dest} ({_times(count)})")
        for (dest, reason), count in sorted(blocked.items()):
            out.append(f"netproxy:   blocked {dest} ({_times(count)}, {reason})")
        return out


def _times(count: int) -> str:
    return f"{count} request" if count == 1 else f"{count} requests"


def run_config(config: ProxyConfig, args: argparse.Namespace) -> ProxyConfig:
    """Ephemeral loopback listeners unless addresses were given on the command line."""
    changes: dict[str, str] = {}
    if not getattr(args, "http_addr", None):
        changes["proxy_url"] = "127.0.0.1:0"
    if not getattr(args, "socks_addr", None):
        changes["socks_url"] = "127.0.0.1:0"
    return config.with_changes(**changes) if changes else config


@contextlib.contextmanager
def _home(args: argparse.Namespace) -> Iterator[Path]:
    """``--home`` when given, else a private directory removed at the end."""
    if getattr(args, "home", None):
        yield Path(args.home)
        return
    with tempfile.TemporaryDirectory(prefix="netproxy-run-") as tmp:
        yield Path(tmp)


def run_command(config: ProxyConfig, args: argparse.Namespace, cmd: Sequence[str]) -> int:
    """Run `cmd` behind a fresh proxy; returns the exit status for `netproxy-core run`."""
    isolate = bool(getattr(args, "isolate", False))
    if isolate:
        check_isolation()  # IsolationUnavailable: exit 2, one line; never runs unisolated
    config = run_config(config, args)
    socks = bool(getattr(args, "socks", False))
    if socks and not config.enable_socks5:
        raise NetproxyError("--socks needs the SOCKS5 listener (drop --no-socks5)")
    if _find_program(cmd[0]) is None:
        print(f"{PROG}: error: command not found: {cmd[0]}", file=sys.stderr)
        return 127
    summary = Summary()
    with _home(args) as home, BackgroundProxy(config, home=home, sinks=(summary,)) as proxy:
        env = child_env(
            proxy, os.environ, socks=socks, allow_local_binding=config.allow_local_binding
        )
        try:
            if isolate:
                with Isolation.for_proxy(proxy) as iso:
                    status = _run_child(cmd, env, iso.popen)
            else:
                status = _run_child(cmd, env)
        finally:
            proxy.close()
            for line in summary.lines():
                print(line, file=sys.stderr)
            sys.stderr.flush()
    return status


def _find_program(name: str) -> str | None:
    if os.sep in name or (os.altsep and os.altsep in name):
        return name if os.path.exists(name) else None
    return shutil.which(name)


def _run_child(
    cmd: Sequence[str], env: dict[str, str], spawn: Callable[..., Popen] = subprocess.Popen
) -> int:
    try:
        child = spawn(list(cmd), env=env)
    except FileNotFoundError:
        print(f"{PROG}: error: command not found: {cmd[0]}", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"{PROG}: error: permission denied: {cmd[0]}", file=sys.stderr)
        return 126
    except OSError as exc:
        print(f"{PROG}: error: cannot run {cmd[0]}: {exc.strerror}", file=sys.stderr)
        return 126
    with _forward_signals(child):
        status = child.wait()
    return 128 - status if status < 0 else status


@contextlib.contextmanager
def _forward_signals(child: subprocess.Popen[bytes]) -> Iterator[None]:
    """Pass SIGINT/SIGTERM on to `child` while it runs.

    A Ctrl-C typed at a terminal already reaches the child (same foreground process group),
    so SIGINT is not sent a second time when our group owns the controlling terminal.
    """

    def forward(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and _terminal_delivers_sigint():
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _terminal_delivers_sigint() -> bool:
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False
