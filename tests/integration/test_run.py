"""`netproxy-core run -- CMD…` end to end (SPEC §12, §8, §9) with real programs as children.

Every run is a real `netproxy-core` process; origins are real servers in this test process
reached under public names through `routes`. Broker tests search everything the run produced
(stdout, stderr, audit log, home directory, the child's environment) for the real token.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

from helpers.origins import Origin

REAL = "ghp_" + "RunRealSecret0123456789abcdefghijklmn"
GITHUB = "api.github.com"
OTHER = "other.example.test"
CURL = shutil.which("curl") or "/usr/bin/curl"


def netproxy_run(
    args: Sequence[str],
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "netproxy_core", "run", *args, "--", *cmd],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def write_config(path: Path, **network: object) -> Path:
    """A one-profile TOML config; tables (domains, routes) given as dicts."""
    lines = ['default_permissions = "t"', "[permissions.t.network]"]
    tables = {k: v for k, v in network.items() if isinstance(v, dict)}
    for key, value in network.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for name, table in tables.items():
        lines.append(f"[permissions.t.network.{name}]")
        lines.extend(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in table.items())
    path.write_text("\n".join(lines) + "\n")
    return path


# --- status, errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "status"),
    [("exit 0", 0), ("exit 7", 7), ("kill -TERM $$", 128 + 15), ("kill -KILL $$", 128 + 9)],
)
def test_exit_status_is_the_commands(script: str, status: int) -> None:
    result = netproxy_run([], ["sh", "-c", script])
    assert result.returncode == status
    assert "netproxy: summary: no network requests" in result.stderr


def test_missing_command_is_127_with_one_line() -> None:
    result = netproxy_run([], ["definitely-not-a-command-xyz", "arg"])
    assert result.returncode == 127
    assert result.stderr.splitlines() == [
        "netproxy-core: error: command not found: definitely-not-a-command-xyz"
    ]


def test_no_command_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "netproxy_core", "run", "--"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "error" in result.stderr


def test_bad_config_is_exit_2_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "bad.toml", allow_local_bindings=True)
    result = netproxy_run(["--config", str(cfg)], ["true"])
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "allow_local_bindings" in result.stderr


# --- child environment ------------------------------------------------------------------

DUMP_ENV = "import json, os; print(json.dumps(dict(os.environ)))"


@pytest.mark.parametrize("socks", [False, True], ids=["http", "socks"])
def test_child_gets_the_proxy_environment(socks: bool) -> None:
    inherited = {"NO_PROXY": "corp.example", "HTTPS_PROXY": "http://stale:1", "KEEP": "me"}
    check_files = "import os, sys; assert os.path.isfile(os.environ['SSL_CERT_FILE']); "
    args = ["--socks"] if socks else []
    result = netproxy_run(args, py(check_files + DUMP_ENV), env=inherited)
    assert result.returncode == 0, result.stderr
    env = json.loads(result.stdout)
    http = env["HTTP_PROXY"]
    assert http.startswith("http://127.0.0.1:") and not http.endswith(":3128")
    for key in ("HTTPS_PROXY", "http_proxy", "https_proxy", "WS_PROXY", "PIP_PROXY", "grpc_proxy"):
        assert env[key] == http
    assert env["NO_PROXY"] == env["no_proxy"] == ""
    if socks:
        assert env["ALL_PROXY"].startswith("socks5h://127.0.0.1:")
        assert env["ALL_PROXY"] != "socks5h://127.0.0.1:8081"
    else:
        assert env["ALL_PROXY"] == http
    assert env["NETPROXY_ACTIVE"] == "1" and env["KEEP"] == "me"
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] != env["NODE_EXTRA_CA_CERTS"]
    assert "NETPROXY_CREDENTIAL_BROKER_ACTIVE" not in env


def test_allow_local_binding_sets_no_proxy() -> None:
    result = netproxy_run(["--allow-local-binding"], py(DUMP_ENV))
    assert json.loads(result.stdout)["NO_PROXY"] == "localhost,127.0.0.1,::1"


def test_summary_lists_allowed_and_blocked_destinations(origin: Origin) -> None:
    api = "api.example.test"
    args = ["--allow", api, "--route", f"{api}:80={origin.addr}"]
    script = (
        f"{CURL} -s -o /dev/null -w '%{{http_code}} ' http://{api}/a; "
        f"{CURL} -s -o /dev/null -w '%{{http_code}} ' http://{api}/b; "
        f"{CURL} -s -o /dev/null -w '%{{http_code}}' http://{OTHER}/c"
    )
    result = netproxy_run(args, ["sh", "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200 200 403"
    assert len(origin.requests) == 2
    lines = result.stderr.splitlines()
    assert "netproxy: summary: 1 destination(s) allowed, 1 blocked" in lines
    assert f"netproxy:   allowed {api}:80 (2 requests)" in lines
    assert f"netproxy:   blocked {OTHER}:80 (1 request, not_allowed)" in lines


# --- signals ----------------------------------------------------------------------------

TRAP = """
import signal, sys
def handler(signum, frame):
    print("got", signum, flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, handler)
signal.signal(signal.SIGINT, handler)
print("ready", flush=True)
signal.pause()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signals_are_forwarded_to_the_command(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "netproxy_core", "run", "--", *py(TRAP)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out == f"got {int(sig)}\n"
    assert proc.returncode == 3, err
    assert "netproxy: summary" in err


# --- credential broker ------------------------------------------------------------------

REQUEST_SCRIPT = """
import json, os, sys
import httpx, requests
token = os.environ["GH_TOKEN"]
auth = {"authorization": f"Bearer {token}"}
r1 = requests.get("https://api.github.com/user", headers=auth, timeout=20)
r2 = httpx.get("https://other.example.test/user", headers=auth, timeout=20)
r3 = httpx.get("https://api.github.com/repos/x", headers=auth, timeout=20)
print(json.dumps({"status": [r1.status_code, r2.status_code, r3.status_code],
                  "env": dict(os.environ)}))
"""


@pytest.fixture
def broker_config(tmp_path: Path, tls_origin: Origin, origin: Origin, origin_ca_file: Path) -> Path:
    return write_config(
        tmp_path / "cfg.toml",
        credential_broker=True,
        upstream_ca_files=[str(origin_ca_file)],
        domains={GITHUB: "allow", OTHER: "allow", "github.com": "allow"},
        routes={
            f"{GITHUB}:443": tls_origin.addr,
            f"{OTHER}:443": tls_origin.addr,
            f"{GITHUB}:80": origin.addr,
        },
    )


def produced(tmp_path: Path, result: subprocess.CompletedProcess[str]) -> str:
    """Everything the run produced: its output and every file under tmp_path."""
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    return result.stdout + result.stderr + "".join(p.read_bytes().decode("latin-1") for p in files)


def broker_args(tmp_path: Path, config: Path) -> list[str]:
    return ["--config", str(config), "--home", str(tmp_path / "home"),
            "--audit-log", str(tmp_path / "audit.jsonl"), "--log-level", "debug"]  # fmt: skip


def test_broker_python_clients_real_token_only_at_bound_host(
    tmp_path: Path, broker_config: Path, tls_origin: Origin
) -> None:
    result = netproxy_run(
        broker_args(tmp_path, broker_config), py(REQUEST_SCRIPT), env={"GH_TOKEN": REAL}
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == [200, 200, 200]
    dummy = report["env"]["GH_TOKEN"]
    assert dummy != REAL and dummy.startswith("ghp_") and len(dummy) == len(REAL)
    assert report["env"]["NETPROXY_CREDENTIAL_BROKER_ACTIVE"] == "1"
    assert json.loads(report["env"]["NETPROXY_BROKERED_CREDENTIALS"]) == [["GH_TOKEN", dummy]]
    seen = [(r.headers["host"], r.headers.get("authorization")) for r in tls_origin.requests]
    assert seen == [
        (GITHUB, f"Bearer {REAL}"),
        (OTHER, f"Bearer {dummy}"),
        (GITHUB, f"Bearer {REAL}"),
    ]
    assert (tmp_path / "audit.jsonl").stat().st_size > 0
    assert REAL not in produced(tmp_path, result)


def test_broker_curl_token_and_plaintext_not_injected(
    tmp_path: Path, broker_config: Path, tls_origin: Origin, origin: Origin
) -> None:
    script = (
        f'{CURL} -sS -f -o /dev/null -H "Authorization: token $GH_TOKEN" https://{GITHUB}/user && '
        f'{CURL} -sS -f -o /dev/null -H "Authorization: Bearer $GH_TOKEN" http://{GITHUB}/plain && '
        'echo "$GH_TOKEN"'
    )
    result = netproxy_run(
        broker_args(tmp_path, broker_config), ["sh", "-c", script], env={"GH_TOKEN": REAL}
    )
    assert result.returncode == 0, result.stderr
    dummy = result.stdout.strip()
    assert dummy != REAL
    assert tls_origin.requests[-1].headers["authorization"] == f"token {REAL}"
    assert origin.requests[-1].headers["authorization"] == f"Bearer {dummy}"  # no opt-in
    assert f"allowed {GITHUB}:443" in result.stderr and f"allowed {GITHUB}:80" in result.stderr
    assert REAL not in produced(tmp_path, result)


def test_broker_plaintext_injected_with_dangerous_opt_in(
    tmp_path: Path, broker_config: Path, origin: Origin
) -> None:
    text = broker_config.read_text().replace(
        "credential_broker = true",
        "credential_broker = true\ndangerously_allow_plaintext_credential_injection = true",
    )
    broker_config.write_text(text)
    script = f'{CURL} -sS -f -o /dev/null -H "Authorization: Bearer $GH_TOKEN" http://{GITHUB}/p'
    result = netproxy_run(
        broker_args(tmp_path, broker_config), ["sh", "-c", script], env={"GH_TOKEN": REAL}
    )
    assert result.returncode == 0, result.stderr
    assert origin.requests[-1].headers["authorization"] == f"Bearer {REAL}"
    assert REAL not in result.stdout + result.stderr


# --- git over HTTPS (dumb HTTP origin serving a bare repository) -------------------------


@contextmanager
def dumb_git_origin(ca: trustme.CA, root: Path) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Static HTTPS server for `root` (bare repos after `git update-server-info`)."""
    seen: list[dict[str, str]] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append({k.lower(): v for k, v in self.headers.items()} | {":path": self.path})
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("github.com").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def make_bare_repo(root: Path) -> str:
    git = [
        "git",
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.test",
        "-c",
        "init.defaultBranch=main",
    ]
    work, bare = root / "work", root / "acme" / "repo.git"
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    (work / "README").write_text("hello\n")
    subprocess.run([*git, "-C", str(work), "add", "README"], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-q", "-m", "init"], check=True)
    subprocess.run([*git, "clone", "-q", "--bare", str(work), str(bare)], check=True)
    subprocess.run([*git, "-C", str(bare), "update-server-info"], check=True)
    head = subprocess.run([*git, "-C", str(work), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head


def test_git_ls_remote_with_brokered_basic_auth(
    tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path
) -> None:
    repos = tmp_path / "repos"
    head = make_bare_repo(repos)
    with dumb_git_origin(origin_ca, repos) as (addr, seen):
        cfg = write_config(
            tmp_path / "git.toml",
            credential_broker=True,
            upstream_ca_files=[str(origin_ca_file)],
            domains={"github.com": "allow"},
            routes={"github.com:443": addr},
        )
        script = (
            'basic=$(printf "x-access-token:%s" "$GH_TOKEN" | base64 -w0); '
            'git -c http.extraHeader="Authorization: Basic $basic" '
            "ls-remote https://github.com/acme/repo.git"
        )
        env = {"GH_TOKEN": REAL, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1",
               "HOME": str(tmp_path / "git-home")}  # fmt: skip
        result = netproxy_run(broker_args(tmp_path, cfg), ["sh", "-c", script], env=env, timeout=90)
    assert result.returncode == 0, result.stderr
    assert f"{head}\tHEAD" in result.stdout and f"{head}\trefs/heads/main" in result.stdout
    expected = "Basic " + base64.b64encode(f"x-access-token:{REAL}".encode()).decode()
    assert seen and all(r.get("authorization") == expected for r in seen), result.stderr
    assert "allowed github.com:443" in result.stderr
    assert REAL not in produced(tmp_path, result)
