"""SPEC §2.1 / §13 audit: the library API exactly as the spec writes it, plus the gaps fixed.

Real proxies on 127.0.0.1 ephemeral ports; no mocks of our own code.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from netproxy_core import (
    CertificateAuthority,
    ConfigError,
    NetworkDecision,
    NetworkPolicyRequest,
    NetworkProxy,
    PolicyDecisionEvent,
    ProxyConfig,
    child_env,
    load_config,
)

WORKSPACE = """
default_permissions = "workspace"

[permissions.workspace.network]
enabled = true
mode = "full"

[permissions.workspace.network.domains]
"**.example.com" = "allow"
"evil.example.com" = "deny"

[permissions.workspace.network.hosts]
"example.com" = ["93.184.216.34"]
"api.example.com" = ["93.184.216.34"]
"ok.test" = ["93.184.216.35"]
"""


def _get_twice(addr: tuple[str, int]) -> list[int]:
    """Two requests on one keep-alive connection; the status of each."""
    statuses: list[int] = []
    with socket.create_connection(addr, timeout=10) as sock:
        reader = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(b"GET http://blocked.test/ HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
            status = int(reader.readline().split()[1])
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            reader.read(length)
            statuses.append(status)
    return statuses


def test_spec_13_example_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "netproxy.toml"
    path.write_text(WORKSPACE)
    asked: list[NetworkPolicyRequest] = []

    async def decide(request: NetworkPolicyRequest) -> NetworkDecision:
        asked.append(request)
        if request.host == "ok.test":
            return NetworkDecision.allow()
        return NetworkDecision.deny("nope")

    async def main() -> None:
        proxy = await (
            NetworkProxy.builder()
            .config(load_config([str(path)], profile="workspace"))
            .http_addr("127.0.0.1:0")
            .policy_decider(decide)
            .build()
        )
        handle = await proxy.run()
        try:
            assert handle.http_addr is not None and handle.socks_addr is not None
            for host, port in (handle.http_addr, handle.socks_addr):
                assert host == "127.0.0.1" and port > 0
            ok = await proxy.evaluate(
                NetworkPolicyRequest("http", "OK.test.", 80, "GET", client_addr="127.0.0.1:9")
            )
            assert (ok.decision, ok.reason, ok.source, ok.override) == (
                "allow",
                "not_allowed",
                "decider",
                True,
            )
            assert asked[0].host == "ok.test"  # the decider sees the canonical host
            no = await proxy.evaluate(NetworkPolicyRequest("https_connect", "no.test", 443))
            assert (no.decision, no.reason, no.source) == ("deny", "nope", "decider")
            evil = await proxy.evaluate(NetworkPolicyRequest("http", "evil.example.com", 80))
            assert (evil.reason, evil.source) == ("denied", "baseline_policy")
            assert len(asked) == 2  # never consulted for a deny entry
            api = await proxy.evaluate(NetworkPolicyRequest("http", "api.example.com", 80, "POST"))
            assert (api.decision, api.reason, api.source) == ("allow", "allow", "baseline_policy")

            proxy.set_mode("limited")
            post = await proxy.evaluate(NetworkPolicyRequest("http", "api.example.com", 80, "POST"))
            assert (post.reason, post.source) == ("method_not_allowed", "mode_guard")
            proxy.deny("api.example.com")
            proxy.allow("other.test")
            assert ("other.test", "allow") in proxy.config.domains

            events = proxy.events()
            assert all(isinstance(e, PolicyDecisionEvent) for e in events)
            assert len(events) == 5
            assert events[0].override is True and events[0].client == "127.0.0.1:9"
            assert [b.reason for b in proxy.blocked()] == ["nope", "denied", "method_not_allowed"]
        finally:
            await handle.shutdown()

    asyncio.run(main())


def test_shutdown_inside_async_with_does_not_hang_and_proxy_runs_again() -> None:
    async def main() -> None:
        proxy = await NetworkProxy.builder().config(ProxyConfig()).http_addr("127.0.0.1:0").build()
        async with proxy.run() as handle:
            assert handle.http_addr is not None
            await asyncio.wait_for(handle.shutdown(), 10)
            with pytest.raises(OSError):
                socket.create_connection(handle.http_addr, timeout=2).close()
        # Run again: keep-alive must work (no shutdown state left behind).
        handle = await proxy.run()
        try:
            assert handle.http_addr is not None
            assert await asyncio.to_thread(_get_twice, handle.http_addr) == [403, 403]
        finally:
            await asyncio.wait_for(handle.shutdown(), 10)

    asyncio.run(main())


def test_ephemeral_http_listener_gets_an_ephemeral_socks_listener() -> None:
    async def main() -> None:
        proxies = [await NetworkProxy.builder().http_addr("127.0.0.1:0").build() for _ in range(2)]
        handles = [await p.run() for p in proxies]
        try:
            socks = [h.socks_addr for h in handles]
            assert all(s is not None and s[1] not in (0, 8081) for s in socks)
            assert socks[0] != socks[1]
        finally:
            for h in handles:
                await h.shutdown()

    asyncio.run(main())


def test_child_env_accepts_the_engine_itself() -> None:
    async def main() -> None:
        proxy = await NetworkProxy.builder().http_addr("127.0.0.1:0").build()
        assert proxy.http_url is None
        async with proxy.run() as handle:
            env = child_env(proxy)
            assert env["HTTP_PROXY"] == handle.http_url == proxy.http_url
            assert env["SSL_CERT_FILE"] == str(handle.ca_bundle_path)
            assert env["NODE_EXTRA_CA_CERTS"] == str(proxy.ca_cert_path)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("profile", "mode", "allowed", "socks"),
    [
        (None, "full", ("a.test",), True),
        ("limited", "limited", ("a.test",), True),
        ("offline", "full", (), False),
    ],
)
def test_builtin_overlay_applies_to_the_files_own_full_profile(
    profile: str | None, mode: str, allowed: tuple[str, ...], socks: bool
) -> None:
    text = '[permissions.full.network.domains]\n"a.test" = "allow"\n"b.test" = "deny"\n'
    config = ProxyConfig.from_toml(text, profile=profile)
    assert (config.mode, config.allowed_patterns, config.enable_socks5) == (mode, allowed, socks)
    assert config.denied_patterns == ("b.test",)


def test_with_changes_and_errors_name_the_key() -> None:
    config = ProxyConfig.from_toml(WORKSPACE)
    assert config.profile == "workspace"
    limited = config.with_changes(mode="limited", allow_local_binding=True)
    assert (limited.mode, limited.allow_local_binding, config.mode) == ("limited", True, "full")
    with pytest.raises(ConfigError) as exc:
        ProxyConfig.from_toml(
            "[permissions.ws.network]\nallow_local_bindings = true\n", profile="ws"
        )
    assert str(exc.value) == (
        "unknown key `allow_local_bindings` in [permissions.ws.network] of <string>; "
        "did you mean `allow_local_binding`?"
    )
    assert isinstance(CertificateAuthority.generate(), CertificateAuthority)
