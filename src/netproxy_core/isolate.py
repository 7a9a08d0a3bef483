"""Enforced egress on Linux: run a command whose only way out is the proxy (SPEC §12 --isolate).

The command runs in its own user + network namespace. Inside, loopback is up and the proxy's
HTTP and SOCKS5 addresses (the very ``127.0.0.1:PORT`` values the child environment names) are
served by `isolate_bridge`, which relays each connection over a unix socket in a private
directory to an `Isolation` relay outside, which connects to the real proxy. Nothing else has a
route out: other addresses are unreachable, DNS fails. See docs/isolation.md for the threat model.

Usage::

    with BackgroundProxy(cfg) as proxy, Isolation.for_proxy(proxy) as iso:
        proc = iso.popen(["curl", "https://example.com"], env=child_env(proxy, os.environ))
        proc.wait()

`check_isolation()` raises `IsolationUnavailable` up front when namespaces cannot be created;
`Isolation.popen` raises it too, and never runs a command unisolated.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

from . import isolate_bridge
from .errors import NetproxyError

__all__ = [
    "IsolatedPopen",
    "Isolation",
    "IsolationUnavailable",
    "check_isolation",
    "isolation_unavailable_reason",
]

READY_TIMEOUT: Final = 30.0
Addr = tuple[str, int]


class IsolationUnavailable(NetproxyError):
    """Network-namespace isolation cannot be set up here; the message says why."""


class _HasAddrs(Protocol):
    @property
    def http_addr(self) -> Addr | None: ...
    @property
    def socks_addr(self) -> Addr | None: ...


def _bridge_argv() -> list[str]:
    path = Path(isolate_bridge.__file__)
    if path.is_file():
        return [sys.executable, "-I", "-S", str(path), isolate_bridge.MARKER]
    return [sys.executable, "-m", "netproxy_core.isolate_bridge", isolate_bridge.MARKER]


@functools.cache
def isolation_unavailable_reason() -> str | None:
    """Why isolation cannot work on this machine, or None when it can (probed once)."""
    if not sys.platform.startswith("linux"):
        return f"network isolation needs Linux namespaces; this is {sys.platform}"
    try:
        with Isolation(http_addr=None, socks_addr=None) as iso:
            proc = iso.popen(["true"] if shutil.which("true") else [sys.executable, "-c", ""])
            proc.wait(timeout=READY_TIMEOUT)
    except IsolationUnavailable as exc:
        return str(exc)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"network isolation probe failed: {exc}"
    return None


def check_isolation() -> None:
    """Raise `IsolationUnavailable` (one line saying why) unless isolation works here."""
    reason = isolation_unavailable_reason()
    if reason is not None:
        raise IsolationUnavailable(reason)


class Isolation:
    """Relays from a private directory to the proxy, and a launcher for isolated commands.

    Args:
        http_addr / socks_addr: the proxy's listeners on the host (``(host, port)``); each one
            given is reachable inside at the same address, nothing else is.

    Use as a context manager; leaving it stops the relays, ends every isolated process still
    running (and anything they left in their namespaces) and removes the directory.
    """

    def __init__(self, *, http_addr: Addr | None, socks_addr: Addr | None) -> None:
        self._targets = [a for a in (http_addr, socks_addr) if a is not None]
        self._dir: Path | None = None
        self._forwards: list[tuple[str, int, str]] = []
        self._forwarders: list[isolate_bridge.Forwarder] = []
        self._procs: list[IsolatedPopen] = []

    @classmethod
    def for_proxy(cls, proxy: _HasAddrs) -> Isolation:
        """Bridge `proxy`'s HTTP and SOCKS5 listeners (a handle or `BackgroundProxy`)."""
        return cls(http_addr=proxy.http_addr, socks_addr=proxy.socks_addr)

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise RuntimeError("Isolation is not open; use it as a context manager")
        return self._dir

    def __enter__(self) -> Isolation:
        base = None if len(tempfile.gettempdir()) < 60 else "/tmp"
        self._dir = Path(tempfile.mkdtemp(prefix="netproxy-isolate-", dir=base))  # 0700
        try:
            for index, (host, port) in enumerate(self._targets):
                path = str(self._dir / f"{index}.sock")
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(path)
                listener.listen(128)
                target = (_connect_host(host), port)
                self._forwarders.append(
                    isolate_bridge.Forwarder(listener, functools.partial(_dial, target)).start()
                )
                self._forwards.append((host, port, path))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for proc in self._procs:
            proc.end()
        self._procs.clear()
        for forwarder in self._forwarders:
            forwarder.close()
        self._forwarders.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def argv(self, cmd: Sequence[str], status_fd: int) -> list[str]:
        """The bridge command line that runs `cmd` isolated, reporting on `status_fd`."""
        out = [*_bridge_argv(), "--status-fd", str(status_fd)]
        for host, port, path in self._forwards:
            out += ["--forward", host, str(port), path]
        return [*out, "--", *cmd]

    def popen(self, cmd: str | Sequence[str], **kwargs: Any) -> IsolatedPopen:
        """`subprocess.Popen` for `cmd` in its own network namespace (same keyword arguments).

        Returns once CMD has started. Raises `IsolationUnavailable` when no namespace can be
        made, and the usual `FileNotFoundError` / `PermissionError` when CMD cannot start.
        """
        self.directory  # noqa: B018 - raises when not open
        proc = IsolatedPopen(self, _as_argv(cmd, kwargs.pop("shell", False)), **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        input: bytes | str | None = None,
        capture_output: bool = False,
        timeout: float | None = None,
        check: bool = False,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run` for `cmd` in its own network namespace."""
        if capture_output:
            kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
        if input is not None:
            kwargs["stdin"] = subprocess.PIPE
        with self.popen(cmd, **kwargs) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                proc.kill()
                exc.stdout, exc.stderr = proc.communicate()
                raise
            except BaseException:
                proc.kill()
                raise
        code = proc.returncode
        if check and code:
            raise subprocess.CalledProcessError(code, proc.args, output=out, stderr=err)
        return subprocess.CompletedProcess(proc.args, code, out, err)


class IsolatedPopen(subprocess.Popen[Any]):
    """The bridge process running an isolated command.

    `pid` is the bridge's; `child_pid` is the command's; `args` is the command. Signals sent
    with `send_signal` / `terminate` are forwarded to the command; `kill` ends the bridge, the
    command and anything left in the namespace. `returncode` is the command's (negative for a
    signal, as usual).
    """

    child_pid: int

    def __init__(self, isolation: Isolation, cmd: list[str], **kwargs: Any) -> None:
        if "executable" in kwargs or "preexec_fn" in kwargs:
            raise TypeError("executable= and preexec_fn= are not supported with isolation")
        self.command = cmd
        ours, theirs = socket.socketpair()
        pass_fds = (*kwargs.pop("pass_fds", ()), theirs.fileno())
        try:
            super().__init__(isolation.argv(cmd, theirs.fileno()), pass_fds=pass_fds, **kwargs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.args = cmd  # what the caller ran, not the bridge's command line
        self._lifeline: socket.socket | None = ours
        self._netns: int | None = None
        try:
            self.child_pid = self._await_ready(ours)
        except BaseException:
            self.end()
            for stream in (self.stdin, self.stdout, self.stderr):
                if stream is not None:
                    stream.close()
            raise
        with contextlib.suppress(OSError):  # holds the namespace, so its id stays unique
            self._netns = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def _await_ready(self, sock: socket.socket) -> int:
        line = _read_line(sock, READY_TIMEOUT)
        word, _, rest = line.partition(" ")
        if word == "ready":
            return int(rest)
        with contextlib.suppress(subprocess.TimeoutExpired):
            super().wait(timeout=5)
        if word == "error":
            raise IsolationUnavailable(
                f"network isolation is not available: {rest}; refusing to run the command"
                " without it"
            )
        if word == "spawn-error":
            code, _, message = rest.partition(" ")
            raise OSError(int(code) or errno.ENOEXEC, message, self.command[0])
        status = "did not start in time" if not line else f"said {line!r}"
        raise IsolationUnavailable(f"network isolation failed: the namespace bridge {status}")

    def wait(self, timeout: float | None = None) -> int:
        code = super().wait(timeout)
        self.end()
        return code

    def poll(self) -> int | None:
        code = super().poll()
        if code is not None:
            self.end()
        return code

    def end(self) -> None:
        """Kill the bridge (if alive) and everything in its namespace; release the lifeline."""
        lifeline, self._lifeline = self._lifeline, None
        if lifeline is None:
            return
        with contextlib.suppress(OSError):
            lifeline.sendall(isolate_bridge.BYE)
        lifeline.close()  # the bridge ends its namespace on EOF
        if self.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                super().wait(timeout=5)
        if self.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, 9)
            super().wait()
        netns, self._netns = self._netns, None
        if netns is not None:
            st = os.fstat(netns)
            isolate_bridge.kill_netns((st.st_dev, st.st_ino))
            os.close(netns)


def _as_argv(cmd: str | Sequence[str], shell: bool) -> list[str]:
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd] if shell else [cmd]
    if shell:
        return ["/bin/sh", "-c", *cmd]
    return list(cmd)


def _connect_host(host: str) -> str:
    """Where the outside relay dials: a wildcard listener is reached over loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _dial(target: Addr) -> socket.socket:
    sock = socket.create_connection(target, timeout=30)
    sock.settimeout(None)
    return sock


def _read_line(sock: socket.socket, timeout: float) -> str:
    """One status line from the bridge ("" on EOF or timeout)."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return ""
        try:
            chunk = sock.recv(4096)
        except OSError:
            return ""
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")
