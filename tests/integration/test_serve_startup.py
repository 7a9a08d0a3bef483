"""`serve` start-up order (SPEC §12, §16): the listeners accept before the engine has loaded.

A client may connect as soon as the port is bound, well before the ready line; what it sends
then must be served exactly as later (plain forwarding, and an intercepted tunnel whose leaf
comes from the CA named by the ready line). The ready line only names files that exist.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from helpers.origins import Origin
from helpers.serve import CLI, Server, clean_env

API = "api.example.test"
StartServer = Callable[..., tuple[Server, int]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def early_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start `serve` on a chosen free port (known before any ready line); stopped afterwards."""
    started: list[Server] = []

    def start(*args: str) -> tuple[Server, int]:
        port = free_port()
        server = Server(["--http-addr", f"127.0.0.1:{port}", *args], tmp_path / "home")
        started.append(server)
        return server, port

    yield start
    for server in started:
        server.stop()


def connect_when_listening(server: Server, port: int, deadline_s: float = 30) -> socket.socket:
    """The first connection the port accepts (polled: the accepted connection is the signal)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=20)
        except ConnectionRefusedError:
            assert server.proc.poll() is None, f"serve exited: {server.drain_stderr()}"
            assert time.monotonic() < deadline, "serve never listened"
            time.sleep(0.002)


def read_head(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def read_all(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_plain_request_sent_before_ready_is_served(
    early_server: StartServer, origin: Origin
) -> None:
    server, port = early_server(
        "--no-socks5", "--allow", API, "--route", f"{API}=127.0.0.1:{origin.port}"
    )
    with connect_when_listening(server, port) as sock:
        sent_before_ready = server.stdout.empty()
        sock.sendall(
            f"GET http://{API}/early HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n".encode()
        )
        response = read_all(sock)
    assert sent_before_ready, "the port should accept before the ready line"
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    assert [r.path for r in origin.requests] == ["/early"]
    ready = server.wait_ready()
    assert ready["http"] == f"127.0.0.1:{port}"
    assert ready["socks"] is None


def test_intercepted_tunnel_opened_before_ready_gets_a_leaf_of_the_ready_ca(
    early_server: StartServer, tls_origin: Origin, origin_ca_file: Path
) -> None:
    server, port = early_server(
        "--no-socks5",
        "--mitm",
        "--allow",
        API,
        "--upstream-ca",
        str(origin_ca_file),
        "--route",
        f"{API}:443=127.0.0.1:{tls_origin.port}",
    )
    client = ssl.create_default_context()
    client.check_hostname = False  # the CA is only known from the ready line: checked below
    client.verify_mode = ssl.CERT_NONE
    with connect_when_listening(server, port) as raw:
        sent_before_ready = server.stdout.empty()
        raw.sendall(f"CONNECT {API}:443 HTTP/1.1\r\nHost: {API}:443\r\n\r\n".encode())
        assert read_head(raw).startswith(b"HTTP/1.1 200"), "CONNECT refused"
        with client.wrap_socket(raw, server_hostname=API) as tls:
            leaf_der = tls.getpeercert(binary_form=True)
            tls.sendall(f"GET /early HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n".encode())
            response = read_all(tls)
    assert sent_before_ready, "the port should accept before the ready line"
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    assert [r.path for r in tls_origin.requests] == ["/early"]

    ready = server.wait_ready()
    # The ready line names only files that exist, and its CA issued the early leaf.
    ca_file, bundle_file = Path(ready["ca_cert"]), Path(ready["ca_bundle"])
    assert ca_file.is_file() and bundle_file.is_file()
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    assert leaf_der is not None
    leaf = x509.load_der_x509_certificate(leaf_der)
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [API]
    assert ca_file.read_bytes() in bundle_file.read_bytes()
    assert "PRIVATE KEY" not in "".join(p.read_text() for p in ca_file.parent.iterdir())

    # And a client that trusts the bundle from the ready line verifies the proxy normally.
    verified = ssl.create_default_context(cafile=str(bundle_file))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        raw.sendall(f"CONNECT {API}:443 HTTP/1.1\r\nHost: {API}:443\r\n\r\n".encode())
        assert read_head(raw).startswith(b"HTTP/1.1 200")
        with verified.wrap_socket(raw, server_hostname=API) as tls:
            tls.sendall(f"GET /later HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n".encode())
            assert read_all(tls).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("flags", [["--no-socks5"], ["--socks-addr", "127.0.0.1:0"]])
def test_ready_line_names_the_early_bound_ports(
    early_server: StartServer, flags: list[str]
) -> None:
    server, port = early_server("--allow", API, *flags)
    ready = server.wait_ready()
    assert ready["http"] == f"127.0.0.1:{port}"
    if flags == ["--no-socks5"]:
        assert ready["socks"] is None
    else:
        host, _, socks_port = ready["socks"].rpartition(":")
        assert host == "127.0.0.1" and int(socks_port) > 0
        with socket.create_connection((host, int(socks_port)), timeout=10) as s:
            s.sendall(b"\x05\x01\x00")  # SOCKS5 greeting, no auth
            assert s.recv(2) == b"\x05\x00"
    assert json.loads(server.ready_raw) == ready


PROBE = """
import json, sys
import netproxy_core.serve as serve

seen = {}
bind_flag_http, bind_early = serve.bind_flag_http, serve.bind_early

def flag_probe(value):
    seen["flag"] = sorted(sys.modules)
    return bind_flag_http(value)

def probe(config, early_http=None):
    early = bind_early(config, early_http)
    seen["bound"] = sorted(early)
    seen["config"] = sorted(sys.modules)
    print(json.dumps(seen), flush=True)
    for sock in early.values():
        sock.close()
    raise SystemExit(0)

serve.bind_flag_http, serve.bind_early = flag_probe, probe
from netproxy_core.cli import main
main(sys.argv[1:])
"""
HEAVY = ("anyio", "asyncio", "ssl", "cryptography", "h11", "netproxy_core.proxy")


@pytest.mark.parametrize("extra", [["--no-socks5"], ["--mitm", "--socks-addr", "127.0.0.1:0"]])
def test_listeners_are_bound_before_the_engine_loads(tmp_path: Path, extra: list[str]) -> None:
    """The start-up order itself (no timing): the flag's HTTP listener is bound before even
    the configuration loads, the rest before any engine module is imported."""
    argv = ["serve", "--http-addr", "127.0.0.1:0", "--allow", API, "--home", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["bound"] == (["HTTP"] if "--no-socks5" in extra else ["HTTP", "SOCKS5"])
    assert "netproxy_core.config.loader" not in seen["flag"]
    for stage in ("flag", "config"):
        early = [m for m in seen[stage] if m.split(".")[0] in HEAVY or m in HEAVY]
        assert early == [], f"imported before the {stage} bind: {early}"


def test_flag_listener_is_released_when_the_configuration_fails(tmp_path: Path) -> None:
    """Bound from the flag, then a bad config file: exit 2, one line, and the port is free."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[permissions\n")
    port = free_port()
    result = subprocess.run(
        [*CLI, "serve", "--http-addr", f"127.0.0.1:{port}", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(tmp_path),
        check=False,
    )
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    with socket.socket() as again:  # nothing holds the port any more
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
