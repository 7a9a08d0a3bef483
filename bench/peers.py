"""Installing, configuring, launching and stopping the benchmark's processes (run_all.py).

Every process runs on 127.0.0.1 with its own temporary config, dies with the harness
(PR_SET_PDEATHSIG, plus an explicit kill on exit) and is pinned to a core with taskset.
Peers are installed by the harness itself: proxy.py and mitmproxy into bench/.venv-peers (never
the project environment), tinyproxy, nginx and wrk through apt-get.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv-peers"
HOST = "bench.example.test"
PROXY_CORE, LOAD_CORE = "0", "1"

_CHILDREN: list[subprocess.Popen[bytes]] = []


# --- installation ----------------------------------------------------------------------------


def _run(cmd: Sequence[str], timeout: float) -> tuple[bool, str]:
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{cmd[0]}: {exc}"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return proc.returncode == 0, tail[0][:160]


def install_apt(binaries: dict[str, str], timeout: float = 240) -> dict[str, str]:
    """Make sure each binary (key) exists, installing its package (value); name → reason if not."""
    missing = {b: p for b, p in binaries.items() if not _which(b)}
    reasons: dict[str, str] = {}
    if missing:
        if not shutil.which("apt-get"):
            return dict.fromkeys(missing, "apt-get not available")
        ok, why = _run(["apt-get", "update", "-qq"], timeout)
        if ok:
            ok, why = _run(
                ["apt-get", "install", "-y", "-qq", *sorted(set(missing.values()))], timeout
            )
        for binary in missing:
            if not _which(binary):
                reasons[binary] = f"apt-get install {missing[binary]} failed: {why}"
    return reasons


def _which(binary: str) -> str | None:
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin")


def install_venv(timeout: float = 400) -> str | None:
    """proxy.py and mitmproxy into bench/.venv-peers; returns a reason when that fails."""
    if (VENV / "bin" / "proxy").exists() and (VENV / "bin" / "mitmdump").exists():
        return None
    if not (VENV / "bin" / "python").exists():
        ok, why = _run([sys.executable, "-m", "venv", str(VENV)], 120)
        if not ok:
            return f"venv creation failed: {why}"
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    ok, why = _run([*pip, "proxy.py", "mitmproxy"], timeout)
    if not ok:
        return f"pip install proxy.py mitmproxy failed: {why}"
    return None


def peer_binary(name: str) -> Path | None:
    path = VENV / "bin" / name
    return path if path.exists() else None


# --- processes -------------------------------------------------------------------------------


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def pinned(core: str, cmd: Sequence[str]) -> list[str]:
    return ["taskset", "-c", core, *cmd] if shutil.which("taskset") and _two_cores() else [*cmd]


def _two_cores() -> bool:
    return len(os.sched_getaffinity(0) | {0, 1}) >= 2 and (os.cpu_count() or 1) >= 2


def spawn(
    cmd: Sequence[str], *, stdout: int | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=cwd,
        preexec_fn=_die_with_parent,
    )
    _CHILDREN.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3)
    for pid in _descendants(proc.pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def stop_all() -> None:
    while _CHILDREN:
        stop(_CHILDREN.pop())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> float:
    """Seconds until 127.0.0.1:port accepts; raises if the process exits or time runs out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return time.perf_counter() - start
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} before listening") from None
            time.sleep(0.001)
    raise RuntimeError(f"not listening on {port} after {timeout:.0f} s")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def tree_rss_kib(pid: int) -> int:
    total = 0
    for p in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants so far."""
    ticks = 0
    for p in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# --- proxies ---------------------------------------------------------------------------------


@dataclass
class Proxy:
    """A running proxy; `target` maps an origin address to what the client asks the proxy for."""

    name: str
    proc: subprocess.Popen[bytes]
    http: tuple[str, int]
    socks: tuple[str, int] | None = None
    ca_file: str | None = None  # what a client trusts for intercepted TLS
    named: bool = False  # True: netproxy (policy by name + routes); peers get 127.0.0.1
    extra: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0  # perf_counter() at exec, for launch → first response


@dataclass
class Launch:
    """How to start one proxy on a given port (for launch→listening and the main instance)."""

    name: str
    argv: list[str]
    port: int
    named: bool
    socks_port: int | None = None
    ca_file: str | None = None


def netproxy_launch(
    tmp: Path, origin_http: int, origin_https: int, origin_ca: str, hosts: int, *, mitm: bool
) -> Launch:
    port = free_port()
    socks = None if mitm else free_port()
    home = tmp / ("netproxy-mitm" if mitm else f"netproxy-{port}")
    argv = [
        sys.executable,
        "-m",
        "netproxy_core",
        "serve",
        "--http-addr",
        f"127.0.0.1:{port}",
        "--allow",
        HOST,
        "--allow",
        f"*.{HOST}",
        "--home",
        str(home),
        "--log-level",
        "error",
    ]
    argv += ["--no-socks5"] if socks is None else ["--socks-addr", f"127.0.0.1:{socks}"]
    if mitm:
        argv += ["--mitm", "--upstream-ca", origin_ca]
        for name in [HOST, *(f"h{i}.{HOST}" for i in range(hosts))]:
            argv += ["--route", f"{name}:443=127.0.0.1:{origin_https}"]
    else:
        argv += ["--route", f"{HOST}=127.0.0.1:{origin_http}"]
    return Launch("netproxy", argv, port, True, socks)


def proxypy_launch(tmp: Path, origin_ca: str | None = None) -> Launch:
    binary = peer_binary("proxy")
    assert binary is not None
    port = free_port()
    argv = [
        str(binary),
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-workers",
        "1",
        "--num-acceptors",
        "1",
        "--log-level",
        "ERROR",
    ]
    ca_file = None
    if origin_ca is not None:
        d = tmp / "proxypy-ca"
        (d / "certs").mkdir(parents=True, exist_ok=True)
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7", "-subj",
            "/CN=bench proxy.py CA", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
        )  # fmt: skip
        _openssl("genrsa", "-out", str(d / "sign.key"), "2048")
        argv += [
            "--ca-key-file", str(d / "ca.key"), "--ca-cert-file", str(d / "ca.pem"),
            "--ca-signing-key-file", str(d / "sign.key"), "--ca-cert-dir", str(d / "certs"),
            "--ca-file", origin_ca,
        ]  # fmt: skip
        ca_file = str(d / "ca.pem")
    return Launch("proxy.py", argv, port, False, ca_file=ca_file)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def mitmdump_launch(tmp: Path, origin_ca: str, *, socks: bool = False) -> Launch:
    binary = peer_binary("mitmdump")
    assert binary is not None
    port = free_port()
    confdir = tmp / f"mitmproxy-{port}"
    confdir.mkdir()
    argv = [
        str(binary),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "-q",
        "--set",
        f"confdir={confdir}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={origin_ca}",
        "--set",
        "stream_large_bodies=1m",
    ]
    if socks:
        argv += ["--mode", "socks5"]
    ca = str(confdir / "mitmproxy-ca-cert.pem")
    return Launch("mitmproxy", argv, port, False, port if socks else None, ca_file=ca)


def tinyproxy_launch(tmp: Path) -> Launch:
    binary = _which("tinyproxy")
    assert binary is not None
    port = free_port()
    conf = tmp / f"tinyproxy-{port}.conf"
    conf.write_text(
        f"User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nTimeout 600\n"
        "MaxClients 4000\nLogLevel Critical\nAllow 127.0.0.1\nDisableViaHeader Yes\n"
    )
    return Launch("tinyproxy", [binary, "-d", "-c", str(conf)], port, False)


def start(launch: Launch, *, ready_line: bool = False) -> tuple[Proxy, float]:
    """Start pinned to the proxy core; returns the proxy and its exec→listening seconds."""
    begin = time.perf_counter()
    proc = spawn(pinned(PROXY_CORE, launch.argv), stdout=subprocess.PIPE if ready_line else None)
    waited = wait_listening(launch.port, proc)
    elapsed = time.perf_counter() - begin
    ca = launch.ca_file
    if ready_line and proc.stdout is not None:
        ca = json.loads(proc.stdout.readline()).get("ca_cert") or ca
    del waited
    socks = ("127.0.0.1", launch.socks_port) if launch.socks_port else None
    if socks is not None and socks[1] != launch.port:
        wait_listening(socks[1], proc)
    proxy = Proxy(launch.name, proc, ("127.0.0.1", launch.port), socks, ca, launch.named)
    proxy.started_at = begin
    return proxy, elapsed


# --- origin: nginx (or the Python origin from bench_http.py when nginx is missing) ----------

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
user root;
worker_rlimit_nofile 16384;
error_log {prefix}/error.log error;
pid {prefix}/nginx.pid;
events {{ worker_connections 16000; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {prefix}/t1;
    proxy_temp_path {prefix}/t2;
    fastcgi_temp_path {prefix}/t3;
    uwsgi_temp_path {prefix}/t4;
    scgi_temp_path {prefix}/t5;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{http} backlog=4096;
        root {prefix}/www;
    }}
    server {{
{tls_listens}
        ssl_certificate {prefix}/origin.pem;
        ssl_certificate_key {prefix}/origin.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        root {prefix}/www;
    }}
}}
"""


def start_nginx(prefix: Path, tls_addresses: int) -> tuple[int, int]:
    """nginx serving /small (512 B) and /big (64 MiB) on HTTP and HTTPS; returns the ports."""
    binary = _which("nginx")
    assert binary is not None
    http, https = free_port(), free_port()
    listens = "\n".join(
        f"        listen 127.0.0.{i}:{https} ssl backlog=4096;" for i in range(1, tls_addresses + 2)
    )
    (prefix / "nginx.conf").write_text(
        NGINX_CONF.format(prefix=prefix, http=http, tls_listens=listens)
    )
    proc = spawn(pinned(LOAD_CORE, [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")]))
    wait_listening(http, proc)
    return http, https
