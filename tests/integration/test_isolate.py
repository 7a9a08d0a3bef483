"""Enforced egress on Linux (`Isolation`, `netproxy-core run --isolate`; SPEC §12, issue 10).

Every isolated child runs in a real user + network namespace. Origins listen on the host's
127.0.0.1 and are reached through the proxy under public-looking names via `routes`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from helpers.origins import Origin
from netproxy_core import BackgroundProxy, child_env
from netproxy_core.isolate import Isolation, IsolationUnavailable

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces")

CURL = "/usr/bin/curl"
API = "api.example.test"
OTHER = "other.example.test"
PY = sys.executable


# --- helpers ------------------------------------------------------------------------------


def cmdlines() -> dict[int, str]:
    """Every live (non-zombie) process's argv joined by spaces (a psutil-free /proc scan)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            out[int(name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return out


def assert_nothing_left(token: str, directory: Path | None = None) -> None:
    left = {pid: argv for pid, argv in cmdlines().items() if token in argv}
    if directory is not None:
        left.update({pid: argv for pid, argv in cmdlines().items() if str(directory) in argv})
        assert not directory.exists(), "the relay directory was not removed"
    assert not left, f"left behind: {left}"


@contextmanager
def isolation_for(proxy: BackgroundProxy) -> Iterator[Isolation]:
    """An `Isolation` for `proxy`; afterwards no bridge for it and no directory remain."""
    iso = Isolation.for_proxy(proxy)
    with iso:
        directory = iso.directory
        yield iso
    assert_nothing_left(str(directory), directory)


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def env_for(proxy: BackgroundProxy, **kw: bool) -> dict[str, str]:
    return child_env(proxy, os.environ, **kw)


RAW_CONNECT = """
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    try:
        socket.create_connection((host, port), timeout=5).close()
        print("connected")
    except OSError as exc:
        print("failed", type(exc).__name__, exc.errno)
"""


# --- raw sockets ------------------------------------------------------------------------


def test_raw_tcp_to_host_loopback_fails_inside_and_works_outside(
    start_proxy, origin: Origin
) -> None:
    with start_proxy(allow=[API]) as proxy, isolation_for(proxy) as iso:
        argv = [*py(RAW_CONNECT), "127.0.0.1", str(origin.port)]
        outside = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        inside = iso.run(argv, capture_output=True, text=True, timeout=30, env=env_for(proxy))
    assert outside.stdout.strip() == "connected"  # negative control: the origin is up
    assert inside.stdout.strip() == "failed ConnectionRefusedError 111", inside
    assert inside.returncode == 0


@pytest.mark.parametrize(
    "host,port",
    [("192.0.2.1", 80), ("10.255.255.53", 53), ("2001:db8::1", 443), ("8.8.8.8", 443)],
)
def test_raw_tcp_to_other_addresses_has_no_route(start_proxy, host: str, port: int) -> None:
    with start_proxy() as proxy, isolation_for(proxy) as iso:
        r = iso.run([*py(RAW_CONNECT), host, str(port)], capture_output=True, text=True,
                    timeout=30)  # fmt: skip
    assert r.stdout.split()[:2] == ["failed", "OSError"], r
    assert int(r.stdout.split()[2]) in (101, 99), r  # ENETUNREACH / EADDRNOTAVAIL


def test_udp_and_dns_fail_inside(start_proxy) -> None:
    code = """
        import socket
        try:
            socket.getaddrinfo("example.com", 80)
            print("resolved")
        except socket.gaierror as exc:
            print("dns-failed")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"x", ("8.8.8.8", 53))
            print("sent")
        except OSError as exc:
            print("udp-failed", exc.errno)
    """
    with start_proxy() as proxy, isolation_for(proxy) as iso:
        r = iso.run(py(code), capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["dns-failed", "udp-failed", "101"], r


# --- proxied traffic ---------------------------------------------------------------------

CLIENTS = {
    "urllib": """
        import sys, urllib.request, urllib.error
        try:
            print(urllib.request.urlopen(sys.argv[1], timeout=20).status)
        except urllib.error.HTTPError as exc:
            print(exc.code)
    """,
    "requests": """
        import sys, requests
        print(requests.get(sys.argv[1], timeout=20).status_code)
    """,
    "httpx": """
        import sys, httpx
        print(httpx.get(sys.argv[1], timeout=20).status_code)
    """,
}


@pytest.mark.parametrize("client", [*CLIENTS, "curl"])
@pytest.mark.parametrize("host,status", [(API, 200), (OTHER, 403)])
def test_proxied_requests_through_the_bridge(
    start_proxy, origin: Origin, client: str, host: str, status: int
) -> None:
    routes = {f"{API}:80": origin.addr, f"{OTHER}:80": origin.addr}
    url = f"http://{host}/hello"
    if client == "curl":
        argv = [CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", url]
    else:
        argv = [*py(CLIENTS[client]), url]
    with start_proxy(allow=[API], routes=routes) as proxy, isolation_for(proxy) as iso:
        r = iso.run(argv, capture_output=True, text=True, timeout=60, env=env_for(proxy))
        blocked = [b.host for b in proxy.blocked()]
    assert r.returncode == 0, r
    assert r.stdout.strip() == str(status), r
    assert len(origin.requests) == (1 if status == 200 else 0)
    assert blocked == ([] if status == 200 else [OTHER])


def test_https_connect_through_the_bridge(start_proxy, tls_origin: Origin, origin_ca_file) -> None:
    with start_proxy(allow=[API], routes={f"{API}:443": tls_origin.addr}) as proxy, \
            isolation_for(proxy) as iso:  # fmt: skip
        r = iso.run([CURL, "-sS", "--cacert", str(origin_ca_file), "-o", "/dev/null", "-w",
                     "%{http_code}", f"https://{API}/x"], capture_output=True, text=True,
                    timeout=60, env=env_for(proxy))  # fmt: skip
    assert r.stdout == "200", r
    assert [q.path for q in tls_origin.requests] == ["/x"]


def test_socks5h_names_work_while_local_dns_fails(start_proxy, origin: Origin) -> None:
    code = """
        import socket, sys, requests
        try:
            socket.getaddrinfo(sys.argv[1], 80)
            print("resolved")
        except socket.gaierror:
            print("dns-failed")
        print(requests.get(f"http://{sys.argv[1]}/s", timeout=20).status_code)
    """
    with start_proxy(allow=[API], routes={f"{API}:80": origin.addr}) as proxy, \
            isolation_for(proxy) as iso:  # fmt: skip
        env = env_for(proxy, socks=True)
        env["HTTP_PROXY"] = env["http_proxy"] = env["ALL_PROXY"]  # requests: SOCKS only
        assert env["ALL_PROXY"].startswith("socks5h://127.0.0.1:")
        r = iso.run([*py(code), API], capture_output=True, text=True, timeout=60, env=env)
        c = iso.run([CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--proxy",
                     env["ALL_PROXY"], f"http://{API}/c"], capture_output=True, text=True,
                    timeout=60, env=env)  # fmt: skip
    assert r.stdout.split() == ["dns-failed", "200"], r
    assert c.stdout == "200", c
    assert [q.path for q in origin.requests] == ["/s", "/c"]


# --- exit status, output, signals, cleanup ---------------------------------------------------


@pytest.mark.parametrize(
    "code,returncode,stdout",
    [
        ("print('out'); import sys; sys.stderr.write('err')", 0, "out\n"),
        ("import sys; print('bye'); sys.exit(3)", 3, "bye\n"),
        ("import os; print('x', flush=True); os.kill(os.getpid(), 9)", -9, "x\n"),
        ("import os; os.kill(os.getpid(), 15)", -15, ""),
    ],
)
def test_exit_status_and_output_come_through(
    start_proxy, code: str, returncode: int, stdout: str
) -> None:
    with start_proxy() as proxy, isolation_for(proxy) as iso:
        r = iso.run(py(code), capture_output=True, text=True, timeout=30, input="")
    assert (r.returncode, r.stdout) == (returncode, stdout)
    assert r.stderr == ("err" if returncode == 0 else "")


def test_stdin_reaches_the_child(start_proxy) -> None:
    with start_proxy() as proxy, isolation_for(proxy) as iso:
        r = iso.run(["cat"], input=b"piped", capture_output=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, b"piped")


def test_command_not_found_raises_like_popen(start_proxy) -> None:
    with start_proxy() as proxy, isolation_for(proxy) as iso, pytest.raises(FileNotFoundError):
        iso.popen(["/nonexistent/netproxy-no-such-program"])


LINGER = """
    import os, subprocess, sys, time
    token = sys.argv[1]
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", token],
                     start_new_session=True)
    print(os.getpid(), os.readlink("/proc/self/ns/net"), flush=True)
    time.sleep(300)
"""


def start_lingering(iso: Isolation) -> tuple[subprocess.Popen[str], str, int]:
    """A child that left a detached grandchild behind and sleeps; returns (proc, token, pid)."""
    token = f"netproxy-isolate-test-{uuid.uuid4().hex}"
    proc = iso.popen([*py(LINGER), token], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pid, netns = proc.stdout.readline().split()
    assert int(pid) == proc.child_pid
    assert netns != os.readlink("/proc/self/ns/net")
    # With vfork the parent resumes before the new argv is visible in /proc: poll briefly.
    assert _wait_for(lambda: _count(token) == 3, timeout=10), _count(token)  # bridge+child+grand
    return proc, token, int(pid)


def test_child_killed_with_sigkill_leaves_nothing(start_proxy) -> None:
    with start_proxy() as proxy, isolation_for(proxy) as iso:
        proc, token, pid = start_lingering(iso)
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -9
        assert_nothing_left(token)
        proc.stdout.close()  # type: ignore[union-attr]


def test_terminate_is_forwarded_to_the_child(start_proxy) -> None:
    with start_proxy() as proxy, isolation_for(proxy) as iso:
        proc, token, _ = start_lingering(iso)
        proc.terminate()
        assert proc.wait(timeout=30) == -signal.SIGTERM
        assert_nothing_left(token)
        proc.stdout.close()  # type: ignore[union-attr]


def test_killing_the_bridge_ends_the_namespace(start_proxy) -> None:
    with start_proxy() as proxy, isolation_for(proxy) as iso:
        proc, token, _ = start_lingering(iso)
        proc.kill()
        assert proc.wait(timeout=30) == -9
        assert_nothing_left(token)
        proc.stdout.close()  # type: ignore[union-attr]


def test_leaving_the_isolation_ends_running_children(start_proxy) -> None:
    with start_proxy() as proxy:
        with isolation_for(proxy) as iso:
            proc, token, _ = start_lingering(iso)
        assert proc.returncode is not None
        assert_nothing_left(token)
        proc.stdout.close()  # type: ignore[union-attr]


def test_parent_death_ends_the_namespace(start_proxy) -> None:
    """The bridge notices its parent is gone (lifeline EOF) and kills what it ran."""
    token = f"netproxy-isolate-test-{uuid.uuid4().hex}"
    parent = f"""
        import os, subprocess, sys
        from netproxy_core.isolate import Isolation
        with Isolation(http_addr=("127.0.0.1", 9), socks_addr=None) as iso:
            print(iso.directory, flush=True)
            proc = iso.popen([sys.executable, "-c", {textwrap.dedent(LINGER)!r}, {token!r}],
                             stdout=subprocess.PIPE, text=True)
            print(proc.stdout.readline().strip(), flush=True)
            os._exit(0)
    """
    r = subprocess.run(py(parent), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and len(r.stdout.split()) == 3, r
    directory = Path(r.stdout.split()[0])
    # The bridge is reparented; wait (bounded) for it to finish its cleanup.
    assert _wait_for(lambda: _count(token) == 0, timeout=30), _count(token)
    assert _wait_for(lambda: not directory.exists(), timeout=30)


def _count(token: str) -> int:
    return sum(token in argv for argv in cmdlines().values())


def _wait_for(predicate: Callable[[], bool], *, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# --- unavailable namespaces ----------------------------------------------------------------

# A seccomp filter that fails unshare(2) with EPERM, as Docker's default profile does.
DENY_UNSHARE = r"""
import ctypes, os, platform, struct, sys
ARCH = {"x86_64": (0xC000003E, 272), "aarch64": (0xC00000B7, 97)}[platform.machine()]
def ins(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
prog = b"".join([
    ins(0x20, 0, 0, 4), ins(0x15, 0, 3, ARCH[0]),
    ins(0x20, 0, 0, 0), ins(0x15, 0, 1, ARCH[1]),
    ins(0x06, 0, 0, 0x00050000 | 1), ins(0x06, 0, 0, 0x7FFF0000),
])
buf = ctypes.create_string_buffer(prog)
class FProg(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = FProg(len(prog) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""

needs_seccomp_arch = pytest.mark.skipif(
    os.uname().machine not in ("x86_64", "aarch64"),
    reason="seccomp filter written for x86_64/aarch64",
)


@needs_seccomp_arch
def test_unavailable_namespaces_raise_and_never_run_unisolated(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = f"""
        from netproxy_core.isolate import Isolation, IsolationUnavailable, check_isolation
        try:
            check_isolation()
        except IsolationUnavailable as exc:
            print("check:", exc)
        with Isolation(http_addr=None, socks_addr=None) as iso:
            try:
                iso.popen(["touch", {str(marker)!r}])
            except IsolationUnavailable as exc:
                print("popen:", exc)
    """
    r = subprocess.run([PY, "-c", DENY_UNSHARE, "-c", textwrap.dedent(code)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r
    assert len(lines) == 2, r
    for line in lines:
        assert "unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: Operation not permitted" in line
    assert not marker.exists()


def test_isolation_unavailable_is_a_netproxy_error() -> None:
    from netproxy_core.errors import NetproxyError

    assert issubclass(IsolationUnavailable, NetproxyError)


# --- `netproxy-core run --isolate` ---------------------------------------------------------

CLI_CHILD = """
    import os, socket, sys, urllib.error, urllib.request
    def get(url):
        try:
            return urllib.request.urlopen(url, timeout=20).status
        except urllib.error.HTTPError as exc:
            return exc.code
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
        raw = "connected"
    except OSError as exc:
        raw = type(exc).__name__
    print(raw, get("http://api.example.test/ok"), get("http://other.example.test/no"))
    sys.exit(3)
"""


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run([PY, "-m", "netproxy_core", "run", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip


def test_cli_run_isolate_enforces_egress(origin: Origin) -> None:
    routes = ["--route", f"{API}:80={origin.addr}", "--route", f"{OTHER}:80={origin.addr}"]
    r = cli("--isolate", "--allow", API, *routes, "--", *py(CLI_CHILD), str(origin.port))
    assert r.returncode == 3, r
    assert r.stdout.split() == ["ConnectionRefusedError", "200", "403"], r
    assert [q.path for q in origin.requests] == ["/ok"]
    assert f"allowed {API}:80" in r.stderr and f"blocked {OTHER}:80" in r.stderr, r.stderr


def test_cli_run_isolate_child_killed_returns_137_and_cleans_up() -> None:
    token = f"netproxy-isolate-test-{uuid.uuid4().hex}"
    code = """
        import os, subprocess, sys
        bridge = open(f"/proc/{os.getppid()}/cmdline").read().split("\\0")
        print(os.path.dirname(bridge[bridge.index("--forward") + 3]), flush=True)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", sys.argv[1]],
                         start_new_session=True)
        os.kill(os.getpid(), 9)
    """
    r = cli("--isolate", "--", *py(code), token)
    assert r.returncode == 128 + 9, r
    relay_dir = Path(r.stdout.strip())
    assert relay_dir.name.startswith("netproxy-isolate-"), r
    assert_nothing_left(token, relay_dir)  # no grandchild, no bridge, no relay directory


@needs_seccomp_arch
def test_cli_run_isolate_without_namespaces_exits_2_with_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    r = subprocess.run([PY, "-c", DENY_UNSHARE, "-m", "netproxy_core", "run", "--isolate", "--",
                        "touch", str(marker)], capture_output=True, text=True, timeout=60,
                       env=env)  # fmt: skip
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("netproxy-core: error: network isolation is not available: ")
    assert "Operation not permitted" in r.stderr
    assert not marker.exists()


# --- the pytest fixture: netproxy.run / popen (isolate=True) ----------------------------------

PLUGIN_CHILD = """
    import socket, sys, urllib.error, urllib.request
    def get(url):
        try:
            return urllib.request.urlopen(url, timeout=20).status
        except urllib.error.HTTPError as exc:
            return exc.code
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
        raw = "connected"
    except OSError as exc:
        raw = type(exc).__name__
    print(raw, get("http://api.example.test/hi"), get("http://other.example.test/no"))
"""


def test_fixture_run_and_popen_isolate(netproxy: Any, origin: Origin) -> None:
    fake = netproxy.fake_host(API, tls=False).route("GET", "/hi", body=b"hello")
    netproxy.allow(API)
    argv = [*py(PLUGIN_CHILD), str(origin.port)]
    plain = netproxy.run(argv)
    isolated_run = netproxy.run(argv, isolate=True)
    proc = netproxy.popen([*py(LINGER), "netproxy-isolate-fixture"], isolate=True,
                          stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    assert int(proc.stdout.readline().split()[0]) == proc.child_pid
    proc.terminate()
    assert proc.wait(timeout=30) == -signal.SIGTERM
    proc.stdout.close()
    assert plain.stdout.split() == ["connected", "200", "403"]  # control: raw socket escapes
    assert isolated_run.returncode == 0, isolated_run
    assert isolated_run.stdout.split() == ["ConnectionRefusedError", "200", "403"]
    assert [r.path for r in fake.requests] == ["/hi", "/hi"]
