"""`netproxy-core` as a real subprocess (SPEC §12): serve / check / --version / --help,
exit codes, the ready line, signals, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.origins import Origin
from helpers.serve import CLI, Server, clean_env

API = "api.example.test"
READY_KEYS = ["event", "http", "socks", "admin", "admin_token", "ca_cert", "ca_bundle", "pid"]


def run_cli(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(home),
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("netproxy-core: error: "), lines[0]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    return lines[0]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[Server] = []

    def start(*args: str) -> Server:
        server = Server(
            ["--http-addr", "127.0.0.1:0", "--socks-addr", "127.0.0.1:0", *args], tmp_path / "home"
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def http_get(addr: tuple[str, int], host: str, path: str = "/") -> int:
    with socket.create_connection(addr, timeout=10) as sock:
        sock.sendall(
            f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def write_config(path: Path, allow: list[str], routes: dict[str, str]) -> None:
    lines = [
        'default_permissions = "ws"',
        "",
        "[permissions.ws.network]",
        'mode = "full"',
        "",
        "[permissions.ws.network.domains]",
    ]
    lines += [f'"{p}" = "allow"' for p in allow]
    lines += ["", "[permissions.ws.network.routes]"]
    lines += [f'"{k}" = "{v}"' for k, v in routes.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


# --- --version / --help / usage errors ---------------------------------------------------


def test_version_and_help(tmp_path: Path) -> None:
    from netproxy_core import __version__

    result = run_cli("--version", home=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"netproxy-core {__version__}"
    module = subprocess.run(
        [sys.executable, "-m", "netproxy_core", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert module.returncode == 0 and __version__ in module.stdout
    result = run_cli("--help", home=tmp_path)
    assert result.returncode == 0
    for command in ("serve", "run", "check", "ca"):
        assert command in result.stdout
    serve_help = run_cli("serve", "--help", home=tmp_path)
    assert serve_help.returncode == 0 and "--ready-file" in serve_help.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--bogus"],
        ["--bogus"],
        [],
        ["check"],
        ["check", "--protocol", "gopher", "x"],
        ["serve", "--mode", "sideways"],
        ["serve", "--route", "nonsense"],
        ["serve", "--resolve", "x.example"],
        ["frobnicate"],
        ["serve", "--http-addr", "example.com:80"],
    ],
    ids=[
        "serve-flag",
        "top-flag",
        "no-command",
        "check-no-host",
        "bad-protocol",
        "bad-mode",
        "bad-route",
        "bad-resolve",
        "unknown-command",
        "hostname-listener",
    ],
)
def test_usage_errors_are_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    one_error_line(run_cli(*args, home=tmp_path))


# --- config errors ------------------------------------------------------------------------


def test_bad_config_key_names_key_table_and_file(tmp_path: Path) -> None:
    config = tmp_path / "x.toml"
    config.write_text("[permissions.ws.network]\nallow_local_bindings = true\n")
    for command in (["serve", "--http-addr", "127.0.0.1:0"], ["check", "example.com"]):
        line = one_error_line(
            run_cli(*command, "--config", str(config), "--profile", "ws", home=tmp_path)
        )
        assert "allow_local_bindings" in line and "[permissions.ws.network]" in line
        assert str(config) in line or config.name in line
        assert "allow_local_binding`" in line  # the suggestion


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[permissions.ws.network\n", "x.toml"),
        ('[permissions.ws.network]\nmode = "sideways"\n', "mode"),
        ('[permissions.ws.network]\nenabled = "yes"\n', "enabled"),
        ('[permissions.ws.network.domains]\n"*" = "deny"\n', "*"),
    ],
    ids=["toml-syntax", "bad-value", "bad-type", "global-deny"],
)
def test_invalid_config_files_exit_2(tmp_path: Path, text: str, needle: str) -> None:
    config = tmp_path / "x.toml"
    config.write_text(text)
    line = one_error_line(
        run_cli("check", "--config", str(config), "--profile", "ws", "example.com", home=tmp_path)
    )
    assert needle in line


def test_missing_config_file_and_unknown_profile_exit_2(tmp_path: Path) -> None:
    line = one_error_line(
        run_cli("check", "--config", str(tmp_path / "nope.toml"), "x.example", home=tmp_path)
    )
    assert "nope.toml" in line
    line = one_error_line(run_cli("check", "--profile", "nope", "x.example", home=tmp_path))
    assert "nope" in line
    one_error_line(
        run_cli("serve", "--profile", "nope", "--http-addr", "127.0.0.1:0", home=tmp_path)
    )


def test_listen_address_in_use_exit_2(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run_cli(
            "serve",
            "--http-addr",
            f"127.0.0.1:{port}",
            "--no-socks5",
            "--allow",
            "x.example",
            home=tmp_path,
        )
    line = one_error_line(result)
    assert str(port) in line


# --- check --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (
            ["--allow", "example.com", "--resolve", "example.com=93.184.216.34", "example.com"],
            0,
            {
                "decision": "allow",
                "reason": "allow",
                "port": 80,
                "protocol": "http",
                "method": "GET",
            },
        ),
        (
            [
                "--allow",
                "example.com",
                "--resolve",
                "example.com=93.184.216.34",
                "--protocol",
                "https_connect",
                "example.com",
            ],
            0,
            {"decision": "allow", "port": 443, "protocol": "https_connect", "method": "CONNECT"},
        ),
        (
            ["--allow", "example.com", "--resolve", "example.com=10.0.0.1", "example.com:8080"],
            1,
            {"decision": "deny", "reason": "not_allowed_local", "port": 8080},
        ),
        (
            ["--allow", "example.com", "other.example"],
            1,
            {"decision": "deny", "reason": "not_allowed", "source": "baseline_policy"},
        ),
        (
            ["--allow", "**.example.com", "--deny", "evil.example.com", "EVIL.example.com."],
            1,
            {"decision": "deny", "reason": "denied", "host": "evil.example.com"},
        ),
        (
            ["--allow", "example.com", "a..example.com"],
            1,
            {"decision": "deny", "reason": "invalid_host"},
        ),
        (
            [
                "--allow",
                "example.com",
                "--resolve",
                "example.com=93.184.216.34",
                "--mode",
                "limited",
                "--method",
                "POST",
                "example.com",
            ],
            1,
            {"reason": "method_not_allowed", "source": "mode_guard"},
        ),
        (["127.0.0.1"], 1, {"reason": "not_allowed_local"}),
        (["--allow", "127.0.0.1", "127.0.0.1:22"], 0, {"decision": "allow", "host": "127.0.0.1"}),
    ],
    ids=[
        "allow",
        "connect-defaults",
        "private-answer",
        "not-allowed",
        "denied-canonical",
        "invalid-host",
        "limited-post",
        "loopback",
        "exact-loopback",
    ],
)
def test_check_exit_codes_and_json(
    tmp_path: Path, args: list[str], code: int, expected: dict[str, Any]
) -> None:
    result = run_cli("check", *args, home=tmp_path)
    assert result.returncode == code, (result.stdout, result.stderr)
    data = json.loads(result.stdout)
    assert set(data) == {"decision", "reason", "source", "host", "port", "protocol", "method"}
    for key, value in expected.items():
        assert data[key] == value, (key, data)


def test_check_reads_config_file(tmp_path: Path) -> None:
    config = tmp_path / "netproxy.toml"
    write_config(config, ["api.example.test"], {})
    ok = run_cli(
        "check",
        "--config",
        str(config),
        "--resolve",
        "api.example.test=93.184.216.34",
        "api.example.test",
        home=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    offline = run_cli(
        "check",
        "--config",
        str(config),
        "--profile",
        "offline",
        "--resolve",
        "api.example.test=93.184.216.34",
        "api.example.test",
        home=tmp_path,
    )
    assert offline.returncode == 1 and json.loads(offline.stdout)["reason"] == "not_allowed"


# --- serve --------------------------------------------------------------------------------


def test_ready_line_shape_and_ready_file(serve: Any, tmp_path: Path) -> None:
    ready_file = tmp_path / "ready" / "ready.json"
    server = serve("--ready-file", str(ready_file), "--allow", "example.com")
    ready = server.wait_ready()
    assert list(ready) == READY_KEYS
    assert ready["event"] == "ready" and ready["pid"] == server.proc.pid
    assert ready["http"].startswith("127.0.0.1:") and ready["socks"].startswith("127.0.0.1:")
    assert ready["admin"] is None and ready["admin_token"] is None
    assert Path(ready["ca_cert"]).is_file() and Path(ready["ca_bundle"]).is_file()
    assert "PRIVATE KEY" not in Path(ready["ca_cert"]).read_text()
    assert ready_file.read_text() == server.ready_raw
    assert server.ready_raw.count("\n") == 1
    assert http_get(server.http, "blocked.example.org") == 403
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert server.stdout.get(timeout=5) is None  # nothing else on stdout


def test_no_socks_gives_null(serve: Any, tmp_path: Path) -> None:
    server = Server(
        ["--http-addr", "127.0.0.1:0", "--no-socks5", "--allow", "x.example"], tmp_path / "h"
    )
    try:
        assert server.wait_ready()["socks"] is None
    finally:
        server.stop()


def test_serve_without_config_says_nothing_is_allowed(serve: Any) -> None:
    server = serve()
    server.wait_ready()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    stderr = server.drain_stderr()
    assert "allows no host" in stderr and "--allow" in stderr


def test_serve_disabled_profile_exits_0(tmp_path: Path) -> None:
    config = tmp_path / "off.toml"
    config.write_text("[permissions.ws.network]\nenabled = false\n")
    result = run_cli(
        "serve",
        "--config",
        str(config),
        "--profile",
        "ws",
        "--http-addr",
        "127.0.0.1:0",
        home=tmp_path,
    )
    assert result.returncode == 0 and result.stdout == ""
    assert "disabled" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_open_exchange_finish_then_exits_0(serve: Any, signum: int) -> None:
    arrived = threading.Event()
    server_sock = socket.create_server(("127.0.0.1", 0))

    def origin() -> None:
        conn, _ = server_sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            arrived.set()
            time.sleep(0.5)  # the exchange is in flight when the signal lands
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")

    thread = threading.Thread(target=origin, daemon=True)
    thread.start()
    try:
        server = serve(
            "--allow", API, "--route", f"{API}:80=127.0.0.1:{server_sock.getsockname()[1]}"
        )
        server.wait_ready()
        idle = socket.create_connection(server.http, timeout=10)  # an idle keep-alive client
        with socket.create_connection(server.http, timeout=10) as sock:
            sock.sendall(f"GET http://{API}/ HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
            assert arrived.wait(10)
            started = time.monotonic()
            server.proc.send_signal(signum)
            data = b""
            while b"slow" not in data:
                chunk = sock.recv(4096)
                assert chunk, data
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        assert server.proc.wait(10) == 0
        assert time.monotonic() - started < 5  # idle connections do not hold the shutdown
        assert idle.recv(1) == b""
        idle.close()
    finally:
        server_sock.close()
        thread.join(5)


def test_sighup_reloads_config_and_keeps_old_on_error(
    serve: Any, tmp_path: Path, origin: Origin
) -> None:
    config = tmp_path / "netproxy.toml"
    routes = {f"{API}:80": origin.addr, "new.example.test:80": origin.addr}
    write_config(config, [API], routes)
    server = serve("--config", str(config))
    server.wait_ready()
    assert http_get(server.http, API) == 200
    assert http_get(server.http, "new.example.test") == 403

    write_config(config, [API, "new.example.test"], routes)
    server.proc.send_signal(signal.SIGHUP)
    server.wait_stderr("reloaded configuration")
    assert http_get(server.http, "new.example.test") == 200

    config.write_text("[permissions.ws.network]\nallow_local_bindings = true\n")
    server.proc.send_signal(signal.SIGHUP)
    line = server.wait_stderr("reload failed")
    assert "allow_local_bindings" in line
    assert http_get(server.http, "new.example.test") == 200  # old config still in force
    assert server.proc.poll() is None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert "Traceback" not in server.drain_stderr()


def test_audit_log_to_stdout_after_ready_line(serve: Any, origin: Origin) -> None:
    server = serve("--allow", API, "--route", f"{API}:80={origin.addr}", "--audit-log", "-")
    server.wait_ready()
    assert http_get(server.http, API) == 200
    event = json.loads(server.stdout.get(timeout=10) or "{}")
    assert event["event.name"] == "netproxy.policy_decision"
    assert event["server.address"] == API and event["network.policy.decision"] == "allow"


@pytest.mark.parametrize(
    "flag", ["--resolve=a.test=notanip", "--route=a.test=host1:80", "--route=a.test:80=127.0.0.1"]
)
def test_bad_resolve_or_route_flag_is_one_error_line(flag: str, tmp_path: Path) -> None:
    line = one_error_line(run_cli("check", "--allow", "a.test", flag, "a.test", home=tmp_path))
    assert "a.test" in line
