"""SOCKS5 listener, TCP side (SPEC §6, §4.5): real clients, raw-socket clients, reply codes, auth,
limited mode, audit events, and hostile input that must leave the listener serving."""

from __future__ import annotations

import errno
import json
import logging
import random
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import httpx
import pytest
import requests

from helpers.origins import Origin, run_origin
from netproxy_core import BackgroundProxy
from netproxy_core.config.model import Limits, MitmConfig
from netproxy_core.errors import UpstreamError
from netproxy_core.handlers.socks import reply_code_for
from netproxy_core.policy.model import NetworkDecision
from netproxy_core.proto.socks5 import ReplyCode

CURL = "/usr/bin/curl"
ROUTED = "api.example.test"


# --- a raw SOCKS5 client -------------------------------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def encode_addr(host: str, port: int) -> bytes:
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
        return b"\x01" + packed + struct.pack("!H", port)
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, host)
        return b"\x04" + packed + struct.pack("!H", port)
    except OSError:
        name = host.encode()
        return b"\x03" + bytes([len(name)]) + name + struct.pack("!H", port)


def read_reply(sock: socket.socket) -> tuple[int, str, int]:
    """(REP, BND.ADDR, BND.PORT)."""
    ver, rep, _rsv, atyp = recv_exact(sock, 4)
    assert ver == 5
    if atyp == 1:
        host = socket.inet_ntop(socket.AF_INET, recv_exact(sock, 4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exact(sock, 16))
    else:
        host = recv_exact(sock, recv_exact(sock, 1)[0]).decode()
    (port,) = struct.unpack("!H", recv_exact(sock, 2))
    return rep, host, port


@contextmanager
def socks_session(proxy: BackgroundProxy, password: str | None = None) -> Iterator[socket.socket]:
    """A connected, greeted (and authenticated) control socket."""
    assert proxy.socks_addr is not None
    sock = socket.create_connection(proxy.socks_addr, timeout=10)
    try:
        if password is None:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exact(sock, 2) == b"\x05\x00"
        else:
            sock.sendall(b"\x05\x01\x02")
            assert recv_exact(sock, 2) == b"\x05\x02"
            pw = password.encode()
            sock.sendall(b"\x01\x04user" + bytes([len(pw)]) + pw)
            assert recv_exact(sock, 2) == b"\x01\x00"
        yield sock
    finally:
        sock.close()


def connect(
    proxy: BackgroundProxy, host: str, port: int, *, cmd: int = 1, extra: bytes = b""
) -> tuple[socket.socket, tuple[int, str, int]]:
    """Send a request for host:port; returns the open socket (caller closes) and the reply."""
    with socks_session(proxy) as sock:
        sock.sendall(b"\x05" + bytes([cmd]) + b"\x00" + encode_addr(host, port) + extra)
        reply = read_reply(sock)
        dup = sock.dup()
    return dup, reply


def http_get(sock: socket.socket, host: str, path: str = "/") -> tuple[int, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def reply_code(proxy: BackgroundProxy, host: str, port: int, cmd: int = 1) -> int:
    sock, (rep, _, _) = connect(proxy, host, port, cmd=cmd)
    sock.close()
    return rep


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def events(proxy: BackgroundProxy, protocol: str = "socks5_tcp") -> list[dict[str, object]]:
    return [e.to_dict() for e in proxy.events() if str(e.protocol) == protocol]


def served(proxy: BackgroundProxy, origin: Origin) -> None:
    """A well-behaved client gets through (the listener is still serving)."""
    sock, (rep, _, _) = connect(proxy, ROUTED, 80)
    with sock:
        assert rep == 0
        assert http_get(sock, ROUTED, "/after")[0] == 200


def routed(origin: Origin) -> dict[str, str]:
    return {f"{ROUTED}:80": origin.addr}


# --- real clients --------------------------------------------------------------------------


def test_curl_socks5_hostname_allowed_and_blocked(start_proxy, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    with start_proxy(allow=[ROUTED], routes=routed(origin)) as p:
        proxy_arg = "{}:{}".format(*p.socks_addr)
        ok = subprocess.run(
            [CURL, "-sS", "--socks5-hostname", proxy_arg, f"http://{ROUTED}/curl"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["path"] == "/curl"
        blocked = subprocess.run(
            [CURL, "-sS", "--socks5-hostname", proxy_arg, "http://other.example.test/"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert blocked.returncode == 97, blocked.stderr
        assert "(2)" in blocked.stderr  # curl reports the SOCKS reply code
        got = [(e["server.address"], e["network.policy.reason"]) for e in events(p)]
        assert got == [(ROUTED, "allow"), ("other.example.test", "not_allowed")]
    assert origin.requests[0].headers["host"] == ROUTED


def test_httpx_and_requests_over_socks5h(start_proxy, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    with start_proxy(allow=[ROUTED], routes=routed(origin)) as p:
        with httpx.Client(proxy=p.socks_url, timeout=10) as client:
            assert client.get(f"http://{ROUTED}/httpx").json()["path"] == "/httpx"
            with pytest.raises(httpx.ProxyError):
                client.get("http://other.example.test/")
        session = requests.Session()
        session.trust_env = False
        proxies = {"http": p.socks_url, "https": p.socks_url}
        assert (
            session.get(f"http://{ROUTED}/req", proxies=proxies, timeout=10).json()["path"]
            == "/req"
        )
        with pytest.raises(requests.exceptions.ConnectionError):
            session.get("http://other.example.test/", proxies=proxies, timeout=10)
        assert [e["network.policy.reason"] for e in events(p)] == ["allow", "not_allowed"] * 2


def test_tls_through_socks_tunnel(start_proxy, tls_origin: Origin, origin_ca_file) -> None:  # type: ignore[no-untyped-def]
    with start_proxy(allow=[ROUTED], routes={f"{ROUTED}:443": tls_origin.addr}) as p:
        verify = ssl.create_default_context(cafile=str(origin_ca_file))
        with httpx.Client(proxy=p.socks_url, verify=verify, timeout=10) as client:
            assert client.get(f"https://{ROUTED}/tls").json()["tls"] is True


# --- address types and bound address -----------------------------------------------------


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("kind", ["ipv4", "domain", "ipv6"])
def test_address_types(start_proxy, kind: str) -> None:  # type: ignore[no-untyped-def]
    if kind == "ipv6" and not ipv6_loopback_available():
        pytest.fail("this machine has no ::1; the IPv6 address type cannot be exercised")
    bind = "::1" if kind == "ipv6" else "127.0.0.1"
    with run_origin(host=bind) as o:
        allow = {"ipv4": ["127.0.0.1"], "ipv6": ["::1"], "domain": [ROUTED]}[kind]
        target = {"ipv4": "127.0.0.1", "ipv6": "::1", "domain": ROUTED}[kind]
        with start_proxy(allow=allow, routes=routed(o)) as p:
            sock, (rep, bnd_host, bnd_port) = connect(p, target, o.port if kind != "domain" else 80)
            with sock:
                assert rep == 0
                assert bnd_host == bind and bnd_port != 0  # the upstream socket's local address
                status, body = http_get(sock, target, f"/{kind}")
            assert status == 200 and json.loads(body)["path"] == f"/{kind}"
            [event] = events(p)
            assert event["server.address"] == target and event["network.policy.reason"] == "allow"


def test_request_and_tunnel_bytes_in_one_packet(start_proxy, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    """Bytes after the request (leftover) are the tunnel's first bytes."""
    get = f"GET /pipelined HTTP/1.1\r\nHost: {ROUTED}\r\nConnection: close\r\n\r\n".encode()
    with start_proxy(allow=[ROUTED], routes=routed(origin)) as p:
        assert p.socks_addr is not None
        with socket.create_connection(p.socks_addr, timeout=10) as sock:
            sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00" + encode_addr(ROUTED, 80) + get)
            assert recv_exact(sock, 2) == b"\x05\x00"
            assert read_reply(sock)[0] == 0
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200") and origin.requests[0].path == "/pipelined"


# --- reply codes ---------------------------------------------------------------------------


def test_reply_not_allowed_for_policy(start_proxy, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    with start_proxy(
        allow=["*.example.test"], deny=["bad.example.test"], routes=routed(origin)
    ) as p:
        assert reply_code(p, "bad.example.test", 80) == ReplyCode.NOT_ALLOWED
        assert reply_code(p, "unlisted.test", 80) == ReplyCode.NOT_ALLOWED
        assert reply_code(p, "127.0.0.1", origin.port) == ReplyCode.NOT_ALLOWED  # local, not named
        assert reply_code(p, "a" * 255, 80) == ReplyCode.NOT_ALLOWED  # invalid host
        got = [(e["server.address"], e["network.policy.reason"]) for e in events(p)]
        assert got == [
            ("bad.example.test", "denied"),
            ("unlisted.test", "not_allowed"),
            ("127.0.0.1", "not_allowed_local"),
            ("a" * 255, "invalid_host"),
        ]


def test_reply_connection_refused(start_proxy) -> None:  # type: ignore[no-untyped-def]
    dead = closed_port()
    with start_proxy(
        allow=["127.0.0.1", ROUTED], routes={f"{ROUTED}:80": f"127.0.0.1:{dead}"}
    ) as p:
        assert reply_code(p, "127.0.0.1", dead) == ReplyCode.CONNECTION_REFUSED
        assert reply_code(p, ROUTED, 80) == ReplyCode.CONNECTION_REFUSED


def test_reply_connect_timeout(start_proxy) -> None:  # type: ignore[no-untyped-def]
    """A listener whose accept queue is full drops SYNs (Linux): the dial times out → 0x06."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                s = socket.socket()
                s.setblocking(False)
                with suppress(BlockingIOError):
                    s.connect(("127.0.0.1", port))
                fillers.append(s)
            with start_proxy(allow=["127.0.0.1"], limits=Limits(connect_timeout=0.5)) as p:
                assert reply_code(p, "127.0.0.1", port) == ReplyCode.TTL_EXPIRED
        finally:
            for s in fillers:
                s.close()


def _upstream_error(*causes: BaseException, timeout: bool = False) -> UpstreamError:
    """An UpstreamError as net.dial raises it: OSError('All connection attempts failed') from …"""
    error = UpstreamError("cannot connect", timeout=timeout)
    inner = OSError("All connection attempts failed")
    inner.__cause__ = causes[0] if len(causes) == 1 else ExceptionGroup("several", list(causes))  # type: ignore[arg-type]
    error.__cause__ = inner
    return error


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (NetworkDecision.deny("mitm_required"), ReplyCode.NOT_ALLOWED),
        (_upstream_error(OSError(errno.ENETUNREACH, "unreachable")), ReplyCode.NETWORK_UNREACHABLE),
        (_upstream_error(OSError(errno.EHOSTUNREACH, "no route")), ReplyCode.HOST_UNREACHABLE),
        (
            _upstream_error(ConnectionRefusedError(errno.ECONNREFUSED, "x")),
            ReplyCode.CONNECTION_REFUSED,
        ),
        (_upstream_error(OSError(errno.ETIMEDOUT, "x")), ReplyCode.TTL_EXPIRED),
        (_upstream_error(TimeoutError(), timeout=True), ReplyCode.TTL_EXPIRED),
        (
            _upstream_error(ValueError("x"), OSError(errno.EHOSTUNREACH, "x")),
            ReplyCode.HOST_UNREACHABLE,
        ),
        (UpstreamError("upstream proxy said no"), ReplyCode.CONNECTION_REFUSED),
    ],
)
def test_reply_code_mapping(outcome: UpstreamError | NetworkDecision, code: ReplyCode) -> None:
    """0x03 / 0x04 cannot be produced for real with loopback-only targets: the table is tested."""
    assert reply_code_for(outcome) is code


def test_reply_command_and_address_type_errors(start_proxy, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    with start_proxy(allow=[ROUTED], routes=routed(origin), enable_socks5_udp=False) as p:
        assert reply_code(p, ROUTED, 80, cmd=2) == ReplyCode.COMMAND_NOT_SUPPORTED  # BIND
        assert reply_code(p, "0.0.0.0", 0, cmd=3) == ReplyCode.COMMAND_NOT_SUPPORTED  # UDP off
        assert reply_code(p, ROUTED, 80, cmd=9) == ReplyCode.COMMAND_NOT_SUPPORTED
        with socks_session(p) as sock:
            sock.sendall(b"\x05\x01\x00\x02" + b"\x00" * 6)  # ATYP 2 does not exist
            assert read_reply(sock)[0] == ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
            assert sock.recv(1) == b""
        with socks_session(p) as sock:
            sock.sendall(b"\x05\x01\x00\x03\x00\x00\x50")  # empty domain
            assert read_reply(sock)[0] == ReplyCode.GENERAL_FAILURE
        assert p.events() == []  # none of these reached policy
        served(p, origin)


# --- authentication ------------------------------------------------------------------------


def test_username_password_auth(start_proxy, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    token = "test-token-123"
    with start_proxy(allow=[ROUTED], routes=routed(origin), proxy_auth_token=token) as p:
        with socks_session(p, password=token) as sock:
            sock.sendall(b"\x05\x01\x00" + encode_addr(ROUTED, 80))
            assert read_reply(sock)[0] == 0
            assert http_get(sock, ROUTED, "/auth")[0] == 200
        assert p.socks_addr is not None
        with socket.create_connection(p.socks_addr, timeout=10) as sock:  # wrong password
            sock.sendall(b"\x05\x01\x02\x01\x01u\x05wrong")
            assert recv_exact(sock, 4) == b"\x05\x02\x01\x01"
            assert sock.recv(1) == b""
        with socket.create_connection(p.socks_addr, timeout=10) as sock:  # no-auth only
            sock.sendall(b"\x05\x01\x00")
            assert recv_exact(sock, 2) == b"\x05\xff"
            assert sock.recv(1) == b""
        url = p.socks_url.replace("socks5h://", f"socks5h://anyone:{token}@")
        with httpx.Client(proxy=url, timeout=10) as client:
            assert client.get(f"http://{ROUTED}/httpx-auth").status_code == 200
        assert [r.path for r in origin.requests] == ["/auth", "/httpx-auth"]


# --- limited mode --------------------------------------------------------------------------


def test_limited_mode_refusals(start_proxy, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    """Without interception 443 is refused mitm_required; other ports and UDP method_not_allowed."""
    with start_proxy(
        allow=[ROUTED], routes={ROUTED: origin.addr}, mode="limited", mitm=MitmConfig(enabled=False)
    ) as p:
        assert reply_code(p, ROUTED, 443) == ReplyCode.NOT_ALLOWED
        assert reply_code(p, ROUTED, 80) == ReplyCode.NOT_ALLOWED
        assert reply_code(p, "other.example.test", 80) == ReplyCode.NOT_ALLOWED  # host first
        assert reply_code(p, "0.0.0.0", 0, cmd=3) == ReplyCode.NOT_ALLOWED  # UDP ASSOCIATE
        refusals = [
            (
                e["server.port"],
                e["network.policy.reason"],
                e["network.policy.source"],
                e["network.policy.scope"],
            )
            for e in events(p)
            if e["network.policy.decision"] == "deny"
        ]
        assert refusals == [
            (443, "mitm_required", "mode_guard", "non_domain"),
            (80, "method_not_allowed", "mode_guard", "non_domain"),
            (80, "not_allowed", "baseline_policy", "domain"),
        ]
        [udp] = events(p, "socks5_udp")
        assert (
            udp["network.policy.decision"],
            udp["network.policy.reason"],
            udp["network.policy.source"],
            udp["network.policy.scope"],
        ) == ("deny", "method_not_allowed", "mode_guard", "non_domain")
    assert origin.requests == []


def test_limited_mode_443_is_intercepted(start_proxy, tls_origin: Origin) -> None:  # type: ignore[no-untyped-def]
    """Answered at once (BND 0.0.0.0:0), then every inner request is checked (SPEC §4.5, §6)."""
    with start_proxy(allow=[ROUTED], routes={ROUTED: tls_origin.addr}, mode="limited") as p:
        sock, (rep, bnd_host, bnd_port) = connect(p, ROUTED, 443)
        sock.close()
        assert (rep, bnd_host, bnd_port) == (0, "0.0.0.0", 0)
        verify = ssl.create_default_context(cafile=str(p.ca_cert_path))
        with httpx.Client(proxy=p.socks_url, verify=verify, timeout=10) as client:
            assert client.get(f"https://{ROUTED}/inner").json()["path"] == "/inner"
            blocked = client.post(f"https://{ROUTED}/inner", content=b"x")
            assert blocked.status_code == 403
            assert blocked.headers["x-proxy-error"] == "blocked-by-method-policy"
    assert [r.method for r in tls_origin.requests] == ["GET"]


# --- hostile input -------------------------------------------------------------------------


def _assert_closed(sock: socket.socket) -> None:
    """The proxy closes the connection (EOF or reset), possibly after a failure reply."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


_rng = random.Random(1928)
HOSTILE = [
    ("wrong version", b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00"),
    ("http on socks port", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("truncated greeting", b"\x05"),
    ("truncated methods", b"\x05\x05\x00"),
    ("no methods", b"\x05\x00"),
    ("wrong request version", b"\x05\x01\x00\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50"),
    ("huge domain length, short", b"\x05\x01\x00\x05\x01\x00\x03\xff" + b"a" * 20),
    ("truncated ipv6", b"\x05\x01\x00\x05\x01\x00\x04" + b"\x00" * 7),
    *[(f"garbage {i}", _rng.randbytes(_rng.randint(1, 2000))) for i in range(12)],
]


@pytest.mark.parametrize(("name", "payload"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_closes_and_listener_keeps_serving(  # type: ignore[no-untyped-def]
    start_proxy, origin: Origin, caplog, name: str, payload: bytes
) -> None:
    caplog.set_level(logging.DEBUG, logger="netproxy")
    with start_proxy(
        allow=[ROUTED], routes=routed(origin), limits=Limits(handshake_timeout=2)
    ) as p:
        assert p.socks_addr is not None
        with socket.create_connection(p.socks_addr, timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            _assert_closed(sock)
        served(p, origin)
    loud = [
        r
        for r in caplog.records
        if r.levelno > logging.DEBUG and r.name.startswith("netproxy.proxy")
    ]
    assert [r for r in loud if r.exc_info] == []
    assert [r.getMessage() for r in loud if r.levelno >= logging.WARNING] == []


def test_slow_client_is_cut_at_handshake_timeout(start_proxy, origin: Origin, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG, logger="netproxy")
    with start_proxy(
        allow=[ROUTED], routes=routed(origin), limits=Limits(handshake_timeout=0.3)
    ) as p:
        assert p.socks_addr is not None
        for partial in (b"", b"\x05", b"\x05\x01\x00\x05\x01\x00\x03\x10abc"):
            with socket.create_connection(p.socks_addr, timeout=10) as sock:
                sock.sendall(partial)
                _assert_closed(sock)  # the proxy hangs up; the 10 s socket timeout would fail
        served(p, origin)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
