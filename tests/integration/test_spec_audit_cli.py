"""SPEC §12 audit: `netproxy-core` flag and error-shape gaps, as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXE = shutil.which("netproxy-core")
CLI = [EXE] if EXE else [sys.executable, "-m", "netproxy_core"]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NETPROXY_HOME"] = str(home)
    return env


def _run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env=_env(home), check=False
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("netproxy-core: error: ")
    return lines[0]


def _serve_ready(args: list[str], home: Path) -> tuple[dict[str, object], str]:
    """Start `serve`, read the ready line, stop it with SIGTERM; (ready, stderr)."""
    proc = subprocess.Popen(
        [*CLI, "serve", "--home", str(home), "--http-addr", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(home),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=10)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        return json.loads(line), stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_startup_error_is_the_only_stderr_line_even_with_an_empty_allowlist(
    tmp_path: Path,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = _run("serve", "--http-addr", f"127.0.0.1:{port}", "--no-socks5", home=tmp_path)
    assert str(port) in _one_error_line(result)


def test_empty_allowlist_notice_still_printed_once_listening(tmp_path: Path) -> None:
    ready, stderr = _serve_ready(["--no-socks5"], tmp_path / "home")
    assert ready["socks"] is None
    assert "allows no host" in stderr and "--allow" in stderr


def test_socks_addr_flag_beats_the_offline_overlay_and_log_level_is_case_insensitive(
    tmp_path: Path,
) -> None:
    ready, _ = _serve_ready(
        ["--profile", "offline", "--socks-addr", "127.0.0.1:0", "--log-level", "WARNING"],
        tmp_path / "home",
    )
    assert isinstance(ready["socks"], str) and ready["socks"].startswith("127.0.0.1:")


def test_serve_with_ephemeral_http_does_not_take_the_default_socks_port(tmp_path: Path) -> None:
    ready, _ = _serve_ready([], tmp_path / "home")
    assert isinstance(ready["socks"], str)
    assert ready["socks"] != "127.0.0.1:8081"


@pytest.mark.parametrize(
    "network",
    [
        # A hook action whose secret variable is not set.
        """
[permissions.full.network.mitm.hooks.h]
host = "api.github.com"
methods = ["POST"]
path_prefixes = ["/x"]
action = ["inject"]
[permissions.full.network.mitm.actions.inject]
inject_request_headers = [{name = "authorization", secret_env_var = "NETPROXY_AUDIT_UNSET"}]
""",
        # A persistent CA that does not exist.
        """
[permissions.full.network.mitm.ca]
certificate_file = "/nonexistent/ca.pem"
private_key_file = "/nonexistent/ca.key"
""",
    ],
)
def test_check_reports_bad_hooks_and_ca_as_config_errors(tmp_path: Path, network: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(network)
    _one_error_line(_run("check", "--config", str(config), "a.test", home=tmp_path))


@pytest.mark.parametrize(
    ("args", "port", "method"),
    [
        ([], 80, "GET"),
        (["--protocol", "https_connect"], 443, "CONNECT"),
        (["--protocol", "http", "--method", "OPTIONS"], 80, "OPTIONS"),
    ],
)
def test_check_defaults(tmp_path: Path, args: list[str], port: int, method: str) -> None:
    result = _run(
        "check",
        "--allow",
        "a.test",
        "--resolve",
        "a.test=93.184.216.34",
        *args,
        "a.test",
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"decision", "reason", "source", "host", "port", "protocol", "method"}
    assert (out["port"], out["method"], out["decision"]) == (port, method, "allow")
