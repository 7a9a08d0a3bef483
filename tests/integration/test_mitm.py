"""HTTPS interception end to end (SPEC §7): real clients through the proxy to trustme origins.

Origins run on 127.0.0.1 under public-looking names via `routes`; clients trust the proxy's
CA (`--cacert` / `CURL_CA_BUNDLE` / `verify=`). Every test checks the audit trail too.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import trustme
from cryptography import x509

from helpers.origins import Origin, run_origin
from netproxy_core import BackgroundProxy, CertificateAuthority, ConfigError
from netproxy_core.config.model import (
    MitmAction,
    MitmCa,
    MitmConfig,
    MitmHook,
    MitmInjectHeader,
)

StartProxy = Callable[..., AbstractContextManager[BackgroundProxy]]
CURL = "/usr/bin/curl"
HOST = "api.example.test"
GITHUB = "api.github.com"
ENV_SECRET = "env-secret-4f1d8a2c9e"
FILE_SECRET = "file-secret-7b3e0c5d1a"


# --- helpers ------------------------------------------------------------------------------


def curl(
    proxy: BackgroundProxy,
    url: str,
    *args: str,
    cacert: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Run curl through `proxy`; (status, headers of the final response, body)."""
    cmd = [CURL, "-sS", "-i", "--max-time", "20", "-x", proxy.http_url, *args]
    if cacert is not None:
        cmd += ["--cacert", str(cacert)]
    run_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    run_env.update(env or {})
    done = subprocess.run([*cmd, url], capture_output=True, timeout=30, env=run_env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return parse_response(done.stdout)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    while True:
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status == 200 and b"Connection established" in head.split(b"\r\n")[0]:
            raw = rest
            continue
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, rest


def connect_tunnel(proxy: BackgroundProxy, authority: str) -> tuple[socket.socket, bytes]:
    """A raw CONNECT; returns the socket and the proxy's whole answer head."""
    assert proxy.http_addr is not None
    sock = socket.create_connection(proxy.http_addr, timeout=10)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def client_tls(cafile: Path | None) -> ssl.SSLContext:
    assert cafile is not None, "the proxy wrote no CA file"
    return ssl.create_default_context(cafile=str(cafile))


def ca_path(proxy: BackgroundProxy) -> Path:
    assert proxy.ca_cert_path is not None, "the proxy wrote no CA file"
    return proxy.ca_cert_path


def https_get(tls: ssl.SSLSocket, host: str, path: str = "/") -> bytes:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := tls.recv(65536):
        data += chunk
    return data


def summary(proxy: BackgroundProxy) -> list[tuple[str, str, str]]:
    """(protocol, method, reason) of every audit event so far."""
    return [(e.protocol, e.method or "none", e.reason) for e in proxy.events()]


def github_hooks(secret_file: Path) -> MitmConfig:
    return MitmConfig(
        hooks=(
            MitmHook(
                name="github_write",
                host=GITHUB,
                methods=("POST", "PUT"),
                path_prefixes=("/repos/openai/",),
                action=("strip_auth", "add_tokens"),
            ),
            MitmHook(
                name="reads",
                host=GITHUB,
                methods=("GET",),
                path_prefixes=("pattern:/public/**",),
                action=("strip_auth",),
            ),
        ),
        actions=(
            ("strip_auth", MitmAction(strip_request_headers=("authorization",))),
            (
                "add_tokens",
                MitmAction(
                    inject_request_headers=(
                        MitmInjectHeader(
                            name="x-api-token",
                            secret_env_var="NETPROXY_IT_SECRET",
                            prefix="Bearer ",
                        ),
                        MitmInjectHeader(name="x-file-token", secret_file=str(secret_file)),
                    )
                ),
            ),
        ),
    )


@pytest.fixture
def secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NETPROXY_IT_SECRET", ENV_SECRET)
    path = tmp_path / "secrets" / "token"
    path.parent.mkdir()
    path.write_text(FILE_SECRET + "\n")
    return path


# --- limited mode and clients -------------------------------------------------------------


@pytest.mark.parametrize("trust", ["cacert", "CURL_CA_BUNDLE"])
def test_limited_mode_checks_each_inner_request(
    start_proxy: StartProxy, tls_origin: Origin, trust: str
) -> None:
    with start_proxy(allow=[HOST], mode="limited", routes={f"{HOST}:443": tls_origin.addr}) as p:
        kw: dict[str, Any] = (
            {"cacert": p.ca_cert_path}
            if trust == "cacert"
            else {"env": {"CURL_CA_BUNDLE": str(p.ca_bundle_path)}}
        )
        status, _, body = curl(p, f"https://{HOST}/hello?q=1", **kw)
        assert status == 200 and json.loads(body)["path"] == "/hello?q=1"
        status, headers, body = curl(p, f"https://{HOST}/submit", "-X", "POST", "-d", "x=1", **kw)
        assert status == 403
        assert headers["x-proxy-error"] == "blocked-by-method-policy"
        assert headers["content-type"] == "application/json"
        refused = json.loads(body)
        assert refused["reason"] == "method_not_allowed" and refused["protocol"] == "https"
        assert refused["host"] == HOST and refused["status"] == "blocked"
        assert summary(p) == [
            ("https_connect", "CONNECT", "allow"),
            ("https", "GET", "allow"),
            ("https_connect", "CONNECT", "allow"),
            ("https", "POST", "method_not_allowed"),
        ]
    assert [(r.method, r.path) for r in tls_origin.requests] == [("GET", "/hello?q=1")]
    assert tls_origin.requests[0].headers["host"] == HOST


def test_full_mode_with_mitm_enabled_audits_every_request_httpx(
    start_proxy: StartProxy, tls_origin: Origin
) -> None:
    routes = {f"{HOST}:443": tls_origin.addr}
    with start_proxy(allow=[HOST], routes=routes, mitm=MitmConfig(enabled=True)) as p:
        verify = client_tls(p.ca_cert_path)
        with httpx.Client(proxy=p.http_url, verify=verify, trust_env=False) as client:
            assert client.get(f"https://{HOST}/a").json()["path"] == "/a"
            assert client.post(f"https://{HOST}/b", content=b"data").json()["body_len"] == 4
            assert client.delete(f"https://{HOST}/c").status_code == 200
        assert summary(p) == [
            ("https_connect", "CONNECT", "allow"),
            ("https", "GET", "allow"),
            ("https", "POST", "allow"),
            ("https", "DELETE", "allow"),
        ]
    assert [r.method for r in tls_origin.requests] == ["GET", "POST", "DELETE"]


def test_requests_client_through_interception(start_proxy: StartProxy, tls_origin: Origin) -> None:
    with start_proxy(allow=[HOST], mode="limited", routes={f"{HOST}:443": tls_origin.addr}) as p:
        session = requests.Session()
        session.trust_env = False
        proxies = {"https": p.http_url}
        ok = session.get(f"https://{HOST}/r", proxies=proxies, verify=str(p.ca_bundle_path))
        assert ok.status_code == 200 and ok.json()["tls"] is True
        refused = session.put(f"https://{HOST}/r", proxies=proxies, verify=str(p.ca_cert_path))
        assert refused.status_code == 403
        assert refused.headers["x-proxy-error"] == "blocked-by-method-policy"
        # Negative control: without the proxy CA the leaf is not trusted.
        with pytest.raises(requests.exceptions.SSLError):
            session.get(f"https://{HOST}/r", proxies=proxies, verify=True)


def test_keep_alive_inside_the_tunnel_checks_every_request(
    start_proxy: StartProxy, tls_origin: Origin
) -> None:
    with start_proxy(allow=[HOST], mode="limited", routes={f"{HOST}:443": tls_origin.addr}) as p:
        with httpx.Client(
            proxy=p.http_url, verify=client_tls(p.ca_cert_path), trust_env=False
        ) as c:
            assert c.get(f"https://{HOST}/one").status_code == 200
            assert c.post(f"https://{HOST}/two", content=b"x").status_code == 403
            assert c.head(f"https://{HOST}/three").status_code == 200
        assert summary(p) == [
            ("https_connect", "CONNECT", "allow"),
            ("https", "GET", "allow"),
            ("https", "POST", "method_not_allowed"),
            ("https", "HEAD", "allow"),
        ]
    assert [r.path for r in tls_origin.requests] == ["/one", "/three"]


# --- certificates and SNI -----------------------------------------------------------------


def test_leaf_certificate_names_the_host_and_chains_to_the_proxy_ca(
    start_proxy: StartProxy, tls_origin: Origin
) -> None:
    with start_proxy(allow=[HOST], mode="limited", routes={f"{HOST}:443": tls_origin.addr}) as p:
        sock, head = connect_tunnel(p, f"{HOST}:443")
        assert head.startswith(b"HTTP/1.1 200")
        with client_tls(p.ca_cert_path).wrap_socket(sock, server_hostname=HOST) as tls:
            der = tls.getpeercert(binary_form=True)
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            assert tls.selected_alpn_protocol() in (None, "http/1.1")
            assert b" 200 " in https_get(tls, HOST).split(b"\r\n")[0]
        assert der is not None
        leaf = x509.load_der_x509_certificate(der)
        ca = x509.load_pem_x509_certificate(ca_path(p).read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    assert leaf.issuer == ca.subject
    now = dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=89) < leaf.not_valid_after_utc - now < dt.timedelta(days=91)
    assert leaf.not_valid_before_utc < now - dt.timedelta(hours=12)


def test_sni_different_from_connect_host_is_refused(
    start_proxy: StartProxy, tls_origin: Origin
) -> None:
    with start_proxy(allow=[HOST], mode="limited", routes={f"{HOST}:443": tls_origin.addr}) as p:
        sock, head = connect_tunnel(p, f"{HOST}:443")
        assert head.startswith(b"HTTP/1.1 200")
        context = client_tls(p.ca_cert_path)
        context.check_hostname = False  # the proxy, not the client, must refuse
        with (
            pytest.raises((ssl.SSLError, OSError)),
            context.wrap_socket(sock, server_hostname="www.example.test") as tls,
        ):
            https_get(tls, HOST)
        events = p.events()
    assert [(e.protocol, e.reason, e.host) for e in events][-1] == (
        "https_connect",
        "host_mismatch",
        HOST,
    )
    assert tls_origin.requests == []


def test_ip_literal_connect_without_sni_is_accepted(
    start_proxy: StartProxy, origin_ca: trustme.CA
) -> None:
    ip = "203.0.113.7"  # documentation range: allowed only because named exactly
    with (
        run_origin(origin_ca, names=(ip,)) as ip_origin,
        start_proxy(allow=[ip], mode="limited", routes={f"{ip}:443": ip_origin.addr}) as p,
    ):
        sock, head = connect_tunnel(p, f"{ip}:443")
        assert head.startswith(b"HTTP/1.1 200")
        # Python sends no SNI for an IP address; the leaf must carry the IP as SAN.
        with client_tls(p.ca_cert_path).wrap_socket(sock, server_hostname=ip) as tls:
            der = tls.getpeercert(binary_form=True)
            answer = https_get(tls, ip, "/by-ip")
        assert answer.startswith(b"HTTP/1.1 200")
        assert summary(p)[-1] == ("https", "GET", "allow")
    assert der is not None
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(a) for a in san.value.get_values_for_type(x509.IPAddress)] == [ip]
    assert [r.path for r in ip_origin.requests] == ["/by-ip"]


def test_inner_host_mismatch_and_nested_connect(
    start_proxy: StartProxy, tls_origin: Origin
) -> None:
    with start_proxy(allow=[HOST], mode="limited", routes={f"{HOST}:443": tls_origin.addr}) as p:
        sock, _ = connect_tunnel(p, f"{HOST}:443")
        with client_tls(p.ca_cert_path).wrap_socket(sock, server_hostname=HOST) as tls:
            assert https_get(tls, "www.example.test").startswith(b"HTTP/1.1 400")
        sock, _ = connect_tunnel(p, f"{HOST}:443")
        with client_tls(p.ca_cert_path).wrap_socket(sock, server_hostname=HOST) as tls:
            tls.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
            assert tls.recv(4096).startswith(b"HTTP/1.1 405")
        assert ("https", "GET", "host_mismatch") in summary(p)
    assert tls_origin.requests == []


# --- MITM off, upstream failure, persistent CA -----------------------------------------


def test_limited_mode_with_mitm_disabled_refuses_connect(
    start_proxy: StartProxy, tls_origin: Origin
) -> None:
    with start_proxy(
        allow=[HOST],
        mode="limited",
        routes={f"{HOST}:443": tls_origin.addr},
        mitm=MitmConfig(enabled=False),
    ) as p:
        assert p.ca_cert_path is None
        sock, head = connect_tunnel(p, f"{HOST}:443")
        sock.close()
        status_line, _, rest = head.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 403")
        assert b"x-proxy-error: blocked-by-mitm-required" in rest.lower()
        last = p.events()[-1]
        assert (last.protocol, last.reason, last.host) == ("https_connect", "mitm_required", HOST)
    assert tls_origin.requests == []


def test_untrusted_origin_certificate_is_502_inside_the_tunnel(start_proxy: StartProxy) -> None:
    stranger = trustme.CA()  # not in upstream_ca_files
    with (
        run_origin(stranger) as bad,
        start_proxy(allow=[HOST], mode="limited", routes={f"{HOST}:443": bad.addr}) as p,
    ):
        status, headers, body = curl(p, f"https://{HOST}/x", cacert=p.ca_cert_path)
        assert status == 502
        assert headers["x-proxy-error"] == "upstream-error"
        assert b"not trusted" in body
    assert bad.requests == []


def test_persistent_ca_from_mitm_ca(
    start_proxy: StartProxy, tls_origin: Origin, tmp_path: Path
) -> None:
    cert_file, key_file = CertificateAuthority.generate().write_pair(tmp_path / "persistent-ca")
    mitm = MitmConfig(ca=MitmCa(certificate_file=str(cert_file), private_key_file=str(key_file)))
    routes = {f"{HOST}:443": tls_origin.addr}
    for _ in range(2):  # the same CA across proxy restarts
        with start_proxy(allow=[HOST], mode="limited", routes=routes, mitm=mitm) as p:
            assert ca_path(p).read_bytes() == cert_file.read_bytes()
            status, _, _ = curl(p, f"https://{HOST}/persist", cacert=cert_file)
            assert status == 200
    assert len(tls_origin.requests) == 2


def test_ca_init_cli_creates_pair_and_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "ca-init"
    cmd = [sys.executable, "-m", "netproxy_core", "ca", "init", str(target)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    paths = json.loads(first.stdout)
    cert, key = Path(paths["certificate_file"]), Path(paths["private_key_file"])
    assert (cert, key) == (target / "ca.pem", target / "ca.key")
    assert key.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PRIVATE KEY" not in cert.read_bytes()
    CertificateAuthority.from_files(str(cert), str(key))  # a usable mitm.ca pair
    before = key.read_bytes()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 2
    assert len(second.stderr.strip().splitlines()) == 1 and "exists" in second.stderr
    assert key.read_bytes() == before


# --- hooks --------------------------------------------------------------------------------


def test_hooks_allow_rewrite_and_deny(
    start_proxy: StartProxy,
    tls_origin: Origin,
    secret_file: Path,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    audit_log = tmp_path / "audit.jsonl"
    routes = {f"{GITHUB}:443": tls_origin.addr, f"{GITHUB}:80": tls_origin.addr}
    bodies: list[bytes] = []
    with start_proxy(
        allow=[GITHUB], routes=routes, mitm=github_hooks(secret_file), audit_log=str(audit_log)
    ) as p:
        ca = p.ca_cert_path
        status, _, body = curl(
            p,
            f"https://{GITHUB}/repos/openai/codex/issues",
            "-X",
            "POST",
            "-H",
            "Authorization: Bearer client-token",
            "-d",
            "{}",
            cacert=ca,
        )
        assert status == 200
        seen = json.loads(body)["headers"]
        assert "authorization" not in seen
        assert seen["x-api-token"] == f"Bearer {ENV_SECRET}"
        assert seen["x-file-token"] == FILE_SECRET
        status, _, _ = curl(p, f"https://{GITHUB}/public/a/b", cacert=ca)
        assert status == 200
        refusals = [
            ("GET", f"https://{GITHUB}/repos/openai/codex"),  # method not in the hook
            ("POST", f"https://{GITHUB}/repos/other/x"),  # path not in the hook
            ("POST", f"https://{GITHUB}/repos/openai/%2e%2e/other"),  # encoded traversal
            ("POST", f"https://{GITHUB}/repos/openai/a%2fb"),
        ]
        for method, url in refusals:
            status, headers, body = curl(p, url, "-X", method, "--path-as-is", cacert=ca)
            assert status == 403, url
            assert headers["x-proxy-error"] == "blocked-by-mitm-hook"
            assert json.loads(body)["reason"] == "mitm_hook_denied"
            bodies.append(body)
        # Plain HTTP to a hooked host would escape the hooks: refused before any dial.
        status, headers, body = curl(p, f"http://{GITHUB}/repos/openai/codex", "-X", "POST")
        assert status == 403 and headers["x-proxy-error"] == "blocked-by-mitm-required"
        bodies.append(body)
        events = p.events()
        inner = [(e.method, e.reason, e.source) for e in events if e.protocol != "https_connect"]
        assert inner == [
            ("POST", "allow", "baseline_policy"),
            ("GET", "allow", "baseline_policy"),
            ("GET", "mitm_hook_denied", "baseline_policy"),
            ("POST", "mitm_hook_denied", "baseline_policy"),
            ("POST", "mitm_hook_denied", "baseline_policy"),
            ("POST", "mitm_hook_denied", "baseline_policy"),
            ("POST", "mitm_required", "mode_guard"),
        ]
        blocked = repr(p.blocked())
        home = ca_path(p).parent
    paths = [r.path for r in tls_origin.requests]
    assert paths == ["/repos/openai/codex/issues", "/public/a/b"]
    leaks = {
        "events": json.dumps([e.to_dict() for e in events]),
        "blocked": blocked,
        "logs": caplog.text,
        "audit_log": audit_log.read_text(),
        "bodies": b"".join(bodies).decode(),
        "home": "".join(f.read_text(errors="replace") for f in home.rglob("*") if f.is_file()),
    }
    for where, text in leaks.items():
        assert ENV_SECRET not in text and FILE_SECRET not in text, f"secret leaked into {where}"


def test_limited_mode_order_local_check_then_hooks_then_method(
    start_proxy: StartProxy, tls_origin: Origin, secret_file: Path
) -> None:
    routes = {f"{GITHUB}:443": tls_origin.addr}
    with start_proxy(
        allow=[GITHUB], mode="limited", routes=routes, mitm=github_hooks(secret_file)
    ) as p:
        ca = p.ca_cert_path
        assert curl(p, f"https://{GITHUB}/public/x", cacert=ca)[0] == 200
        # A matching hook does not lift the limited-mode method check …
        status, headers, _ = curl(p, f"https://{GITHUB}/repos/openai/x", "-X", "POST", cacert=ca)
        assert (status, headers["x-proxy-error"]) == (403, "blocked-by-method-policy")
        # … and a request no hook matches reports the hook, which is checked first.
        status, headers, _ = curl(p, f"https://{GITHUB}/other", "-X", "DELETE", cacert=ca)
        assert (status, headers["x-proxy-error"]) == (403, "blocked-by-mitm-hook")
        assert [r for r in summary(p) if r[0] == "https"] == [
            ("https", "GET", "allow"),
            ("https", "POST", "method_not_allowed"),
            ("https", "DELETE", "mitm_hook_denied"),
        ]
    assert [r.path for r in tls_origin.requests] == ["/public/x"]


def test_hooked_host_is_intercepted_in_full_mode_without_mitm_enabled(
    start_proxy: StartProxy, tls_origin: Origin, secret_file: Path
) -> None:
    routes = {f"{GITHUB}:443": tls_origin.addr, f"{HOST}:443": tls_origin.addr}
    with start_proxy(allow=[GITHUB, HOST], routes=routes, mitm=github_hooks(secret_file)) as p:
        ca = p.ca_cert_path
        assert curl(p, f"https://{GITHUB}/nope", cacert=ca)[0] == 403
        # Negative control: a host without hooks keeps an opaque tunnel (origin's own cert).
        with pytest.raises(AssertionError, match=r"SSL|certificate"):
            curl(p, f"https://{HOST}/opaque", cacert=ca)
    assert [r.path for r in tls_origin.requests] == []


def test_bad_hooks_fail_the_build_and_the_reload(
    start_proxy: StartProxy, tls_origin: Origin, secret_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NETPROXY_IT_SECRET")
    with (
        pytest.raises(ConfigError, match="NETPROXY_IT_SECRET"),
        start_proxy(allow=[GITHUB], mitm=github_hooks(secret_file)),
    ):
        pass
    monkeypatch.setenv("NETPROXY_IT_SECRET", ENV_SECRET)
    routes = {f"{GITHUB}:443": tls_origin.addr}
    with start_proxy(allow=[GITHUB], routes=routes, mitm=github_hooks(secret_file)) as p:
        monkeypatch.delenv("NETPROXY_IT_SECRET")
        assert p.proxy is not None
        with pytest.raises(ConfigError, match="add_tokens"):
            p.proxy.reload(p.config)
        status, _, body = curl(
            p, f"https://{GITHUB}/repos/openai/x", "-X", "POST", cacert=p.ca_cert_path
        )
        assert status == 200 and json.loads(body)["headers"]["x-api-token"].endswith(ENV_SECRET)
        # A reload that drops the hooks turns the host back into an ordinary one.
        p.proxy.reload(p.config.with_changes(mitm=MitmConfig(enabled=True)))
        assert curl(p, f"https://{GITHUB}/any", cacert=p.ca_cert_path)[0] == 200


# --- no private key on disk ---------------------------------------------------------------


def _files(root: Path, since: float | None = None, skip: tuple[Path, ...] = ()) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in filenames:
            path = here / name
            try:
                if not path.is_file() or path.is_symlink():
                    continue
                if since is not None and path.stat().st_mtime < since:
                    continue
            except OSError:
                continue
            yield path


def test_no_private_key_material_on_disk_after_a_mitm_run(
    start_proxy: StartProxy,
    tls_origin: Origin,
    secret_file: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    started = time.time() - 1
    routes = {f"{HOST}:443": tls_origin.addr, f"{GITHUB}:443": tls_origin.addr}
    with start_proxy(
        allow=[HOST, GITHUB],
        mode="limited",
        routes=routes,
        mitm=github_hooks(secret_file),
        audit_log=str(tmp_path / "audit.jsonl"),
    ) as p:
        assert curl(p, f"https://{HOST}/k", cacert=p.ca_cert_path)[0] == 200
        assert curl(p, f"https://{GITHUB}/public/k", cacert=p.ca_bundle_path)[0] == 200
        home = ca_path(p).parent
        written = sorted(f.name for f in home.iterdir())
    assert any(n.startswith("ca-bundle-") for n in written), written
    # Every pytest temp dir of this session (other tests' `ca init` dirs live there) is skipped
    # in the system temp scan; this test's own tmp_path is scanned in full.
    pytest_root = tmp_path_factory.getbasetemp().parent
    scans = [*_files(tmp_path), *_files(Path(tempfile.gettempdir()), started, (pytest_root,))]
    assert any(path.parent == home for path in scans)
    for path in scans:
        try:
            data = path.read_bytes()[: 8 << 20]
        except OSError:
            continue
        assert b"PRIVATE KEY" not in data, f"private key material in {path}"
        if path.parent != secret_file.parent:
            assert FILE_SECRET.encode() not in data and ENV_SECRET.encode() not in data, path
