"""Upstream proxy chaining (SPEC §5.8): the proxy's own HTTP(S)_PROXY / NO_PROXY, after policy."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from helpers.origins import Origin
from netproxy_core import BackgroundProxy, ProxyConfig
from netproxy_core.config.model import Access

API = "api.example.test"
PUBLIC_IP = "93.184.216.34"  # a public address nobody dials here: the upstream answers instead


@dataclass
class Upstream:
    port: int
    heads: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request_lines(self) -> list[str]:
        return [h.split(b"\r\n", 1)[0].decode() for h in self.heads]


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return b"", b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        with suppress(OSError):
            b.shutdown(socket.SHUT_WR)


@contextmanager
def recording_upstream(tunnel_to: tuple[str, int] | None = None) -> Iterator[Upstream]:
    """A tiny upstream proxy: records each request head; CONNECT is relayed to `tunnel_to`
    (whatever was asked for), absolute-form requests are answered by itself."""
    server = socket.create_server(("127.0.0.1", 0))
    upstream = Upstream(server.getsockname()[1])

    def handle(conn: socket.socket) -> None:
        with conn:
            head, rest = _read_head(conn)
            if not head:
                return
            upstream.heads.append(head)
            if head.startswith(b"CONNECT "):
                if tunnel_to is None:
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                    return
                with socket.create_connection(tunnel_to) as out:
                    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    if rest:
                        out.sendall(rest)
                    t = threading.Thread(target=_pipe, args=(out, conn), daemon=True)
                    t.start()
                    _pipe(conn, out)
                    t.join(10)
                return
            body = json.dumps({"via": "upstream", "line": head.split(b"\r\n")[0].decode()}).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield upstream
    finally:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        server.close()
        thread.join(5)


def test_plain_http_goes_through_upstream_with_credentials(start_proxy) -> None:
    with recording_upstream() as up:
        env = {"HTTP_PROXY": f"http://user:p%40ss@127.0.0.1:{up.port}"}
        with start_proxy(allow=[API], hosts=((API, (PUBLIC_IP,)),), upstream_env=env) as p:  # noqa: SIM117
            with httpx.Client(proxy=p.http_url) as client:
                r = client.get(f"http://{API}/path?q=1")
        assert r.status_code == 200 and r.json()["via"] == "upstream"
    assert up.request_lines() == [f"GET http://{API}/path?q=1 HTTP/1.1"]
    head = up.heads[0].decode().lower()
    expected = base64.b64encode(b"user:p@ss").decode().lower()
    assert f"proxy-authorization: basic {expected}" in head
    assert f"host: {API}" in head


def test_connect_and_https_go_through_upstream_tunnel(
    start_proxy, tls_origin: Origin, origin_ca_file: Path
) -> None:
    with recording_upstream(tunnel_to=("127.0.0.1", tls_origin.port)) as up:
        env = {"HTTPS_PROXY": up.url, "HTTP_PROXY": "http://127.0.0.1:9"}
        with start_proxy(allow=[API], hosts=((API, (PUBLIC_IP,)),), upstream_env=env) as p:
            context = ssl.create_default_context(cafile=str(origin_ca_file))
            with httpx.Client(proxy=p.http_url, verify=context) as client:
                assert client.get(f"https://{API}/tunnel").json()["path"] == "/tunnel"
            # absolute-form https: the proxy originates TLS through an upstream CONNECT
            addr = p.http_addr
            assert addr is not None
            with socket.create_connection(addr, timeout=10) as sock:
                sock.sendall(
                    f"GET https://{API}/abs HTTP/1.1\r\nHost: {API}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200")
    assert up.request_lines() == [f"CONNECT {API}:443 HTTP/1.1"] * 2
    assert [r.path for r in tls_origin.requests] == ["/tunnel", "/abs"]


def test_upstream_refusing_connect_is_502(start_proxy) -> None:
    with (
        recording_upstream(tunnel_to=None) as up,
        start_proxy(
            allow=[API], hosts=((API, (PUBLIC_IP,)),), upstream_env={"HTTPS_PROXY": up.url}
        ) as p,
    ):
        addr = p.http_addr
        assert addr is not None
        with socket.create_connection(addr, timeout=10) as sock:
            sock.sendall(f"CONNECT {API}:443 HTTP/1.1\r\nHost: {API}:443\r\n\r\n".encode())
            data = sock.recv(4096)
    assert data.startswith(b"HTTP/1.1 502")
    assert b"x-proxy-error: upstream-error" in data.lower()


@pytest.mark.parametrize("kind", ["route", "loopback-literal", "no_proxy", "no_proxy-star"])
def test_targets_that_go_direct(start_proxy, origin: Origin, kind: str) -> None:
    with recording_upstream() as up:
        env = {"HTTP_PROXY": up.url}
        config: dict[str, object] = {"allow": [API]}
        url = f"http://{API}:{origin.port}/direct"
        if kind == "route":
            config["routes"] = {f"{API}:80": origin.addr}
            url = f"http://{API}/direct"
        elif kind == "loopback-literal":
            config["allow"] = ["127.0.0.1"]
            url = f"http://127.0.0.1:{origin.port}/direct"
        else:
            env["NO_PROXY"] = ".example.test" if kind == "no_proxy" else "*"
            config.update(hosts=((API, ("127.0.0.1",)),), allow_local_binding=True)
        with start_proxy(upstream_env=env, **config) as p, httpx.Client(proxy=p.http_url) as client:
            r = client.get(url)
        assert r.status_code == 200 and r.json()["path"] == "/direct"
        assert up.heads == []


def test_no_proxy_suffix_matches_whole_labels_only(start_proxy) -> None:
    host = "notexample.test"
    with recording_upstream() as up:
        env = {"HTTP_PROXY": up.url, "NO_PROXY": "example.test"}
        with start_proxy(allow=[host], hosts=((host, (PUBLIC_IP,)),), upstream_env=env) as p:  # noqa: SIM117
            with httpx.Client(proxy=p.http_url) as client:
                assert client.get(f"http://{host}/").json()["via"] == "upstream"
    assert len(up.heads) == 1


def test_policy_is_applied_before_chaining(start_proxy) -> None:
    with recording_upstream() as up:  # noqa: SIM117
        with start_proxy(
            allow=[API],
            hosts=((API, (PUBLIC_IP,)),),
            upstream_env={"HTTP_PROXY": up.url, "HTTPS_PROXY": up.url},
        ) as p:
            with httpx.Client(proxy=p.http_url) as client:
                assert client.get("http://blocked.example.test/").status_code == 403
            addr = p.http_addr
            assert addr is not None
            with socket.create_connection(addr, timeout=10) as sock:
                sock.sendall(
                    b"CONNECT blocked.example.test:443 HTTP/1.1\r\n"
                    b"Host: blocked.example.test:443\r\n\r\n"
                )
                assert sock.recv(4096).startswith(b"HTTP/1.1 403")
    assert up.heads == []


def test_allow_upstream_proxy_false_dials_directly(start_proxy, origin: Origin) -> None:
    with (
        recording_upstream() as up,
        start_proxy(
            allow=[API],
            hosts=((API, ("127.0.0.1",)),),
            allow_local_binding=True,
            allow_upstream_proxy=False,
            upstream_env={"HTTP_PROXY": up.url},
        ) as p,
        httpx.Client(proxy=p.http_url) as client,
    ):
        assert client.get(f"http://{API}:{origin.port}/").status_code == 200
    assert up.heads == []


def test_chain_of_two_netproxies(start_proxy, origin: Origin, tmp_path: Path) -> None:
    """Both proxies judge the request: the upstream one routes it to the origin."""
    inner_cfg = ProxyConfig(
        proxy_url="127.0.0.1:0",
        enable_socks5=False,
        domains=((API, Access.ALLOW),),
        routes=((f"{API}:80", origin.addr),),
    )
    with BackgroundProxy(inner_cfg, home=tmp_path / "inner", upstream_env={}) as inner:
        with start_proxy(
            allow=[API], hosts=((API, (PUBLIC_IP,)),), upstream_env={"HTTP_PROXY": inner.http_url}
        ) as outer:
            with httpx.Client(proxy=outer.http_url) as client:
                assert client.get(f"http://{API}/chained").json()["path"] == "/chained"
                assert client.get("http://other.example.test/").status_code == 403
            assert [(e.host, e.decision) for e in outer.events()] == [
                (API, "allow"),
                ("other.example.test", "deny"),
            ]
        assert [(e.host, e.decision) for e in inner.events()] == [(API, "allow")]
    assert origin.requests[0].headers["host"] == API
