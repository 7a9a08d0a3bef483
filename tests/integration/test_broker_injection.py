"""Credential broker through a real proxy (SPEC §8): TLS-only injection, plaintext opt-in,
dummies elsewhere unchanged, real values nowhere but the bound origin.

Origins are real servers on 127.0.0.1 reached under public names via `routes`; clients are
httpx with the child environment's proxy and CA bundle.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from helpers.origins import Origin, run_origin
from netproxy_core import child_env
from netproxy_core.broker import CredentialBroker

REAL = "ghp_" + "RealSecretValue0123456789abcdefghijk"
OPENAI_REAL = "sk-proj-" + "RealOpenAI-_" + "k" * 40
GITHUB = "api.github.com"
OTHER = "other.example.test"


def _client(env: dict[str, str]) -> httpx.Client:
    verify = ssl.create_default_context(cafile=env["SSL_CERT_FILE"])
    return httpx.Client(proxy=env["HTTPS_PROXY"], verify=verify, trust_env=False)


def _auth(origin: Origin, index: int = -1) -> str | None:
    return origin.requests[index].headers.get("authorization")


def _everything(proxy: object, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> str:
    """Events, log records and every file the proxy wrote, as one text."""
    events = json.dumps([e.to_dict() for e in proxy.events()])  # type: ignore[attr-defined]
    files = "".join(p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file())
    return events + caplog.text + files


def test_https_bound_host_gets_real_value_other_host_gets_dummy(
    start_proxy, tls_origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """Needs HTTPS interception (ctx.intercept)."""
    caplog.set_level(logging.DEBUG)
    routes = {f"{GITHUB}:443": tls_origin.addr, f"{OTHER}:443": tls_origin.addr}
    with start_proxy(allow=[GITHUB, OTHER], routes=routes, credential_broker=True) as p:
        env = child_env(p, {"GH_TOKEN": REAL})
        dummy = env["GH_TOKEN"]
        assert dummy != REAL and REAL not in json.dumps(env)
        with _client(env) as client:
            assert (
                client.get(
                    f"https://{GITHUB}/user", headers={"authorization": f"Bearer {dummy}"}
                ).status_code
                == 200
            )
            assert _auth(tls_origin) == f"Bearer {REAL}"
            assert (
                client.get(
                    f"https://{OTHER}/x", headers={"authorization": f"Bearer {dummy}"}
                ).status_code
                == 200
            )
            assert _auth(tls_origin) == f"Bearer {dummy}"
            client.get(f"https://{GITHUB}/none")
            assert _auth(tls_origin) is None  # nothing presented, nothing injected
            client.get(f"https://{GITHUB}/explicit", headers={"authorization": "Bearer mine"})
            assert _auth(tls_origin) == "Bearer mine"
        assert REAL not in _everything(p, tmp_path, caplog)


def test_https_token_and_basic_forms(start_proxy, tls_origin: Origin) -> None:  # type: ignore[no-untyped-def]
    """Needs HTTPS interception (ctx.intercept)."""
    with start_proxy(
        allow=[GITHUB], routes={f"{GITHUB}:443": tls_origin.addr}, credential_broker=True
    ) as p:
        env = child_env(p, {"GITHUB_TOKEN": REAL})
        dummy = env["GITHUB_TOKEN"]
        with _client(env) as client:
            client.get(f"https://{GITHUB}/a", headers={"authorization": f"token {dummy}"})
            assert _auth(tls_origin) == f"token {REAL}"
            client.get(f"https://{GITHUB}/b", auth=("x-access-token", dummy))
            assert _auth(tls_origin) == httpx.BasicAuth("x-access-token", REAL)._auth_header
            client.get(f"https://{GITHUB}/c", auth=(dummy, "x-oauth-basic"))
            assert _auth(tls_origin) == httpx.BasicAuth(REAL, "x-oauth-basic")._auth_header


def test_openai_dummy_injected_only_at_api_openai_com(start_proxy, tls_origin: Origin) -> None:  # type: ignore[no-untyped-def]
    """Needs HTTPS interception (ctx.intercept)."""
    routes = {"api.openai.com:443": tls_origin.addr, f"{OTHER}:443": tls_origin.addr}
    with start_proxy(allow=["api.openai.com", OTHER], routes=routes, credential_broker=True) as p:
        env = child_env(p, {"OPENAI_API_KEY": OPENAI_REAL})
        dummy = env["OPENAI_API_KEY"]
        assert dummy.startswith("sk-proj-") and len(dummy) == len(OPENAI_REAL)
        with _client(env) as client:
            client.post(
                "https://api.openai.com/v1/responses",
                headers={"authorization": f"Bearer {dummy}"},
                json={},
            )
            assert _auth(tls_origin) == f"Bearer {OPENAI_REAL}"
            client.post(
                f"https://{OTHER}/v1/responses",
                headers={"authorization": f"Bearer {dummy}"},
                json={},
            )
            assert _auth(tls_origin) == f"Bearer {dummy}"


@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "dangerous-opt-in"])
def test_plaintext_injection_only_with_opt_in(start_proxy, origin: Origin, opt_in: bool) -> None:  # type: ignore[no-untyped-def]
    with start_proxy(
        allow=[GITHUB, OTHER],
        routes={f"{GITHUB}:80": origin.addr, f"{OTHER}:80": origin.addr},
        credential_broker=True,
        dangerously_allow_plaintext_credential_injection=opt_in,
    ) as p:
        env = child_env(p, {"GH_TOKEN": REAL})
        dummy = env["GH_TOKEN"]
        with httpx.Client(proxy=env["HTTP_PROXY"], trust_env=False) as client:
            assert (
                client.get(
                    f"http://{GITHUB}/user", headers={"authorization": f"Bearer {dummy}"}
                ).status_code
                == 200
            )
            assert _auth(origin) == (f"Bearer {REAL}" if opt_in else f"Bearer {dummy}")
            client.get(f"http://{OTHER}/user", headers={"authorization": f"Bearer {dummy}"})
            assert _auth(origin) == f"Bearer {dummy}"  # not bound: unchanged even with opt-in


def test_denied_request_is_not_injected_and_body_has_no_secret(start_proxy, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    with start_proxy(
        allow=[OTHER],
        routes={f"{GITHUB}:80": origin.addr},
        credential_broker=True,
        dangerously_allow_plaintext_credential_injection=True,
    ) as p:
        env = child_env(p, {"GH_TOKEN": REAL})
        with httpx.Client(proxy=env["HTTP_PROXY"], trust_env=False) as client:
            r = client.get(
                f"http://{GITHUB}/user", headers={"authorization": f"Bearer {env['GH_TOKEN']}"}
            )
        assert r.status_code == 403
        assert REAL not in r.text and REAL not in str(r.headers)
        assert origin.requests == []


def test_upstream_error_body_has_no_secret(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with run_origin() as dead:
        addr = dead.addr
    with start_proxy(
        allow=[GITHUB],
        routes={f"{GITHUB}:80": addr},
        credential_broker=True,
        dangerously_allow_plaintext_credential_injection=True,
    ) as p:
        env = child_env(p, {"GH_TOKEN": REAL})
        with httpx.Client(proxy=env["HTTP_PROXY"], trust_env=False) as client:
            r = client.get(
                f"http://{GITHUB}/user", headers={"authorization": f"Bearer {env['GH_TOKEN']}"}
            )
        assert r.status_code == 502
        assert REAL not in r.text and REAL not in str(r.headers)


def test_bound_hosts_follow_registrations(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with start_proxy(credential_broker=True) as p:
        broker = p.proxy.broker
        assert isinstance(broker, CredentialBroker)
        assert p.proxy.ctx.broker is broker and p.proxy.ctx.broker_hosts is not None
        assert not p.proxy.ctx.broker_hosts(GITHUB)
        child_env(p, {"GH_TOKEN": REAL})
        assert p.proxy.ctx.broker_hosts(GITHUB)
        assert not p.proxy.ctx.broker_hosts(OTHER)


def test_no_broker_unless_configured(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with start_proxy() as p:
        assert p.proxy.broker is None and p.proxy.ctx.broker is None
        assert child_env(p, {"GH_TOKEN": REAL})["GH_TOKEN"] == REAL


def test_slow_client_hello_to_bound_host_is_still_injected(start_proxy, tls_origin: Origin) -> None:  # type: ignore[no-untyped-def]
    """A client that starts TLS 0.4 s after the CONNECT answer (a loaded machine) must still be
    intercepted for a brokered host; falling back to an opaque tunnel loses the injection."""
    with start_proxy(
        allow=[GITHUB], routes={f"{GITHUB}:443": tls_origin.addr}, credential_broker=True
    ) as p:
        env = child_env(p, {"GH_TOKEN": REAL})
        with socket.create_connection(p.http_addr, timeout=20) as raw:
            raw.sendall(f"CONNECT {GITHUB}:443 HTTP/1.1\r\nHost: {GITHUB}:443\r\n\r\n".encode())
            assert raw.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(0.4)  # the delay under test, not a readiness wait
            context = ssl.create_default_context(cafile=env["SSL_CERT_FILE"])
            with context.wrap_socket(raw, server_hostname=GITHUB) as tls:
                tls.sendall(
                    f"GET /slow HTTP/1.1\r\nHost: {GITHUB}\r\n"
                    f"Authorization: Bearer {env['GH_TOKEN']}\r\nConnection: close\r\n\r\n".encode()
                )
                while tls.recv(65536):
                    pass
    assert _auth(tls_origin) == f"Bearer {REAL}"
