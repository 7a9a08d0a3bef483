"""The process inside the network namespace for `--isolate` (stdlib only; runs as a script).

`netproxy_core.isolate` starts ``python -I -S isolate_bridge.py --status-fd N --forward HOST PORT
SOCKET … -- CMD…``. The bridge:

1. enters a new user + network namespace (``unshare(2)``; a root caller whose user namespaces
   are blocked falls back to a network namespace alone) and brings loopback up;
2. listens on each ``HOST:PORT`` inside (the proxy's own addresses, so the child environment is
   unchanged) and relays every connection to the unix ``SOCKET`` outside;
3. starts CMD (killed if the bridge dies), reports ``ready PID`` on the status socket and waits;
4. forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to CMD;
5. when CMD ends, or when the status socket reaches EOF (the parent went away), kills whatever
   is still running in the namespace and exits with CMD's status (re-raising a fatal signal);
   a parent that died without saying ``bye`` first gets its relay directory removed.

Status lines: ``ready PID`` | ``error MESSAGE`` (no namespace) | ``spawn-error ERRNO MESSAGE``.
It imports nothing from netproxy so that it starts fast; `Forwarder` is shared with the parent.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

__all__ = ["BYE", "MARKER", "Forwarder", "kill_netns", "main", "netns_of"]

MARKER = "--netproxy-isolate-bridge"
BYE = b"bye\n"  # the parent's last word on the status socket: it cleans up itself
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ_SIZE = 40
CHUNK = 65536
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# Default action "ignore", "stop" or "continue": the bridge cannot die of these.
NOT_FATAL = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH, signal.SIGSTOP,
             signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}  # fmt: skip


class NamespaceError(Exception):
    """The namespace could not be set up; the message says why."""


# --- relaying ---------------------------------------------------------------------------------


class Forwarder:
    """Accept on `listener`; relay each connection to a fresh socket from `connect`.

    Threads: one accept loop, two copiers per connection (half-closes pass through).
    `close()` stops accepting and tears down every open connection.
    """

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
        self._listener = listener
        self._connect = connect
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> Forwarder:
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = list(self._open)
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        self._listener.close()
        for sock in live:
            _shutdown(sock)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _accept_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._listener.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, *socks: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._open.update(socks)
            return True

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            upstream = self._connect()
        except OSError:
            client.close()
            return
        if not self._track(client, upstream):
            client.close()
            upstream.close()
            return
        back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
        back.start()
        _copy(client, upstream)
        back.join()
        with self._lock:
            self._open.difference_update((client, upstream))
        client.close()
        upstream.close()


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        _shutdown(src)
        _shutdown(dst)
        return
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# --- namespace --------------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _unshare(libc: ctypes.CDLL, flags: int) -> int:
    """0 on success, else the errno."""
    return 0 if libc.unshare(flags) == 0 else ctypes.get_errno()


def enter_namespace() -> str:
    """Move this (single-threaded) process into a new network namespace with loopback up.

    Returns ``"user+net"`` or ``"net"`` (root whose user namespaces are unavailable).
    """
    libc = _libc()
    uid, gid = os.geteuid(), os.getegid()
    err = _unshare(libc, CLONE_NEWUSER | CLONE_NEWNET)
    kind = "user+net"
    if err:
        why = f"unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: {os.strerror(err)}{_hint(err)}"
        if uid != 0:
            raise NamespaceError(why)
        err2 = _unshare(libc, CLONE_NEWNET)
        if err2:
            raise NamespaceError(f"{why}; unshare(CLONE_NEWNET) failed: {os.strerror(err2)}")
        kind = "net"
    else:
        # The child keeps its own uid/gid inside; the bridge holds every capability in the
        # new namespace until it execs nothing (CMD, if not root, starts without any).
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    try:
        _loopback_up()
    except OSError as exc:
        raise NamespaceError(
            f"cannot bring up loopback in the new network namespace: {exc.strerror}"
            " (AppArmor's kernel.apparmor_restrict_unprivileged_userns can cause this)"
        ) from None
    return kind


def _hint(err: int) -> str:
    if err in (errno.EPERM, errno.EACCES):
        return (
            " (user namespaces are disabled or blocked here: a container seccomp profile,"
            " kernel.unprivileged_userns_clone=0 or AppArmor)"
        )
    if err in (errno.ENOSPC, errno.EUSERS):
        return " (user.max_user_namespaces is exhausted or 0)"
    if err == errno.EINVAL:
        return " (the kernel lacks user or network namespaces)"
    return ""


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise NamespaceError(f"cannot write {path}: {exc.strerror}") from None


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sh", b"lo", 0).ljust(IFREQ_SIZE, b"\0")
        flags = struct.unpack_from("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        up = struct.pack("16sh", b"lo", flags | IFF_UP).ljust(IFREQ_SIZE, b"\0")
        fcntl.ioctl(s, SIOCSIFFLAGS, up)


def netns_of(pid: int | str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of `pid`'s network namespace, or None when it cannot be read."""
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def kill_netns(netns: tuple[int, int], *, exclude: int | None = None) -> int:
    """SIGKILL every process in `netns` (but `exclude`) until none is left; returns the count."""
    killed = 0
    for _ in range(200):
        victims = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != exclude and netns_of(name) == netns:
                victims.append(int(name))
        if not victims:
            return killed
        for pid in victims:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.005)
    return killed


# --- the bridge -------------------------------------------------------------------------------


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="netproxy-isolate-bridge")
    parser.add_argument(MARKER, dest="marker", action="store_true")
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--forward", nargs=3, action="append", default=[],
                        metavar=("HOST", "PORT", "SOCKET"))  # fmt: skip
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd[:1] == ["--"]:
        args.cmd = args.cmd[1:]
    if not args.cmd:
        parser.error("no command")
    return args


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _unix_connector(path: str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return sock

    return connect


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    status = socket.socket(fileno=args.status_fd)

    def report(line: str) -> None:
        with contextlib.suppress(OSError):
            status.sendall(line.replace("\n", " ").encode() + b"\n")

    try:
        enter_namespace()
        listeners = [(_listen(h, int(p)), path) for h, p, path in args.forward]
    except NamespaceError as exc:
        report(f"error {exc}")
        return 2
    except OSError as exc:
        report(f"error cannot listen inside the network namespace: {exc.strerror}")
        return 2
    libc = _libc()
    bridge_pid = os.getpid()

    def die_with_bridge() -> None:  # runs in the forked child, before exec
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != bridge_pid:
            os._exit(137)

    # Still single-threaded here, so preexec_fn is safe; connections queue in the backlog.
    try:
        child = subprocess.Popen(args.cmd, preexec_fn=die_with_bridge)
    except OSError as exc:
        report(f"spawn-error {exc.errno or 0} {exc.strerror or exc}")
        return 127
    forwarders = [Forwarder(sock, _unix_connector(path)).start() for sock, path in listeners]
    _forward_signals(child)
    netns = netns_of("self")
    sockets = [path for _, _, path in args.forward]
    ending = threading.Event()
    lifeline = threading.Thread(
        target=_lifeline, args=(status, child, netns, sockets, ending), daemon=True
    )
    lifeline.start()
    report(f"ready {child.pid}")
    returncode = child.wait()
    if ending.is_set():  # the lifeline killed CMD: let it finish cleaning up
        lifeline.join(timeout=10)
    if netns is not None:
        kill_netns(netns, exclude=bridge_pid)
    for forwarder in forwarders:
        forwarder.close()
    status.close()
    return _exit_like(returncode)


def _lifeline(status: socket.socket, child: subprocess.Popen[bytes],
              netns: tuple[int, int] | None, sockets: list[str],
              ending: threading.Event) -> None:  # fmt: skip
    """The parent closed its end (or died): end everything in the namespace.

    A parent that says ``bye`` first removes its relay directory itself; one that died
    without a word could not, so the bridge does it.
    """
    said = b""
    with contextlib.suppress(OSError):
        while data := status.recv(256):
            said = (said + data)[-16:]
    ending.set()
    with contextlib.suppress(OSError):
        child.kill()
    if netns is not None:
        kill_netns(netns, exclude=os.getpid())
    if BYE not in said:
        for path in sockets:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for directory in {os.path.dirname(p) for p in sockets}:
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def _forward_signals(child: subprocess.Popen[bytes]) -> None:
    def forward(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and _terminal_delivers_sigint():
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)


def _terminal_delivers_sigint() -> bool:
    """A Ctrl-C at the terminal already reached CMD (same foreground process group)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def _exit_like(returncode: int) -> int:
    """CMD's status; a fatal signal is re-raised so our parent sees the same."""
    if returncode >= 0:
        return returncode
    sig = -returncode
    if sig not in NOT_FATAL:
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    return 128 + sig


if __name__ == "__main__":
    sys.exit(main())
