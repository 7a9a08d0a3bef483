"""The egress-filter bypass corpus (reference/ecosystem.md §5) end to end through a running proxy.

Every trick is sent by a real client socket to the live listeners (HTTP absolute-form, CONNECT,
SOCKS5) and each test asserts the exact audited reason. Allowed names are routed to a local
recording origin; refused destinations never reach a socket (the origin records nothing).
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.origins import Origin
from netproxy_core import BackgroundProxy, PolicyDecisionEvent

API = "api.example.test"
EVIL = "evil.example.test"
TIMEOUT = 10.0


# --- tiny clients --------------------------------------------------------------------------------


def _addr(p: BackgroundProxy, socks: bool = False) -> tuple[str, int]:
    addr = p.socks_addr if socks else p.http_addr
    assert addr is not None
    return addr


def read_response(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """One HTTP response (head + Content-Length body), or what arrived before EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def status(data: bytes) -> int:
    assert data.startswith(b"HTTP/1."), data[:100]
    return int(data.split(b" ", 2)[1])


def send(p: BackgroundProxy, data: bytes) -> bytes:
    with socket.create_connection(_addr(p), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        return read_response(sock)


def get(p: BackgroundProxy, target: str, host: str | None = None, method: str = "GET") -> bytes:
    """A request with `target`; `Host` is the target's authority unless given."""
    if host is None and "://" in target:
        host = target.split("://", 1)[1].split("/", 1)[0]
    host_line = f"Host: {host}\r\n" if host is not None else ""
    return send(p, f"{method} {target} HTTP/1.1\r\n{host_line}\r\n".encode())


def open_tunnel(p: BackgroundProxy, authority: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(_addr(p), timeout=TIMEOUT)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    return sock, read_response(sock)


def socks_connect(
    p: BackgroundProxy, atyp: int, addr: bytes, port: int
) -> tuple[socket.socket, int]:
    """SOCKS5 no-auth CONNECT; returns the socket and the reply code."""
    sock = socket.create_connection(_addr(p, socks=True), timeout=TIMEOUT)
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    if atyp == 3:
        addr = bytes([len(addr)]) + addr
    sock.sendall(b"\x05\x01\x00" + bytes([atyp]) + addr + struct.pack("!H", port))
    head = recv_exact(sock, 4)
    tail = {1: 4, 4: 16}.get(head[3])
    if tail is None:
        tail = recv_exact(sock, 1)[0]
    recv_exact(sock, tail + 2)
    return sock, head[1]


def socks_domain(p: BackgroundProxy, host: str, port: int) -> tuple[socket.socket, int]:
    return socks_connect(p, 3, host.encode("utf-8"), port)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def wait_closed(sock: socket.socket | ssl.SSLSocket) -> None:
    """Read until the proxy closes the connection (bounded by the socket timeout)."""
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError, OSError):
        pass


def events_after(p: BackgroundProxy, n: int) -> list[PolicyDecisionEvent]:
    return p.events()[n:]


def wait_event(p: BackgroundProxy, n: int, *, deadline: float = 5.0) -> PolicyDecisionEvent:
    """The first event after the first `n` (bounded poll: some refusals are audited after the
    client saw its answer, e.g. a tunnel closed on a bad ClientHello)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        new = events_after(p, n)
        if new:
            return new[0]
        time.sleep(0.01)
    raise AssertionError(f"no audit event after #{n}: {p.events()[-3:]}")


def only_event(p: BackgroundProxy, n: int) -> PolicyDecisionEvent:
    new = events_after(p, n)
    assert len(new) == 1, new
    return new[0]


@pytest.fixture
def proxy(start_proxy, origin: Origin) -> Iterator[BackgroundProxy]:
    hosts = {
        "rebind.example.test": ["127.0.0.1"],
        "mixed.example.test": ["93.184.216.34", "10.0.0.5"],
        "mapped.example.test": ["::ffff:127.0.0.1"],
        "meta.example.test": ["169.254.169.254"],
    }
    with start_proxy(
        allow=[API, "**.allowed.example.test", *hosts],
        deny=[EVIL],
        routes={f"{API}:80": origin.addr, f"{API}:443": origin.addr},
        hosts=tuple((k, tuple(v)) for k, v in hosts.items()),
    ) as p:
        yield p


# --- 1, 2, 3, 4, 5, 6: numeric hosts through absolute-form HTTP ----------------------------------

LOCAL_LITERALS = [
    # (target host as sent, canonical host in the event)
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0x7F.0.0.1", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("167772161", "10.0.0.1"),
    ("012.0.0.1", "10.0.0.1"),
    ("0xa9fea9fe", "169.254.169.254"),
    ("169.254.169.254.", "169.254.169.254"),
    ("100.64.0.1", "100.64.0.1"),
    ("198.18.0.1", "198.18.0.1"),
    ("0.0.0.0", "0.0.0.0"),
    ("0", "0.0.0.0"),
    ("[::]", "::"),
    ("[::1]", "::1"),
    ("[0:0:0:0:0:0:0:1]", "::1"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("[::ffff:7f00:1]", "::ffff:7f00:1"),
    ("[::127.0.0.1]", "::7f00:1"),
    ("[::ffff:169.254.169.254]", "::ffff:a9fe:a9fe"),
    ("[::ffff:10.0.0.1]", "::ffff:a00:1"),
    ("[64:ff9b::7f00:1]", "64:ff9b::7f00:1"),
    ("[64:ff9b::10.0.0.1]", "64:ff9b::a00:1"),
    ("[2002:7f00:1::]", "2002:7f00:1::"),
    ("[2002:a9fe:a9fe::1]", "2002:a9fe:a9fe::1"),
    ("[fd00:ec2::254]", "fd00:ec2::254"),
    ("[fe80::1%25eth0]", "fe80::1%eth0"),
    ("[::1%25]", "::1%25"),
    ("[::1%lo]", "::1%lo"),
    ("::1", "::1"),  # unbracketed: judged as the address it names, never as a name
    ("localhost", "localhost"),
    ("localhost.", "localhost"),
    ("LOCALHOST", "localhost"),
    ("x.localhost", "x.localhost"),
]


@pytest.mark.parametrize(("host", "canonical"), LOCAL_LITERALS)
def test_local_and_private_literals_are_not_allowed_local(
    proxy: BackgroundProxy, host: str, canonical: str
) -> None:
    n = len(proxy.events())
    data = get(proxy, f"http://{host}/latest/meta-data/")
    assert status(data) == 403
    assert b"x-proxy-error: blocked-by-allowlist" in data.lower()
    event = only_event(proxy, n)
    assert (event.host, event.reason, event.decision, event.protocol) == (
        canonical,
        "not_allowed_local",
        "deny",
        "http",
    )


@pytest.mark.parametrize(
    ("host", "canonical"),
    [
        ("010.0.0.1", "8.0.0.1"),  # leading zero = octal: 010 is 8, a public address
        ("0x5db8d822", "93.184.216.34"),
        ("1572395042", "93.184.216.34"),
        ("[::ffff:93.184.216.34]", "::ffff:5db8:d822"),
        ("[64:ff9b::93.184.216.34]", "64:ff9b::5db8:d822"),
        # a zone id that spells an allowed name is still just a zone of a (public) address
        ("[::ffff:1.2.3.4%25x.api.example.test]", "::ffff:102:304%x.api.example.test"),
    ],
)
def test_public_numeric_forms_are_judged_as_the_address(
    proxy: BackgroundProxy, host: str, canonical: str
) -> None:
    n = len(proxy.events())
    assert status(get(proxy, f"http://{host}/")) == 403
    event = only_event(proxy, n)
    assert (event.host, event.reason) == (canonical, "not_allowed")


@pytest.mark.parametrize(
    ("authority", "canonical"),
    [
        ("2130706433:443", "127.0.0.1"),
        ("[::ffff:127.0.0.1]:443", "::ffff:7f00:1"),
        ("0:22", "0.0.0.0"),
    ],
)
def test_connect_to_local_literal_forms(
    proxy: BackgroundProxy, authority: str, canonical: str
) -> None:
    n = len(proxy.events())
    sock, head = open_tunnel(proxy, authority)
    sock.close()
    assert status(head) == 403
    event = only_event(proxy, n)
    assert (event.host, event.reason, event.protocol) == (
        canonical,
        "not_allowed_local",
        "https_connect",
    )


# --- 7, 8, 9: trailing dots, case, label boundaries ----------------------------------------------


@pytest.mark.parametrize("host", [f"{API}.", "API.Example.TEST", "Api.Example.Test."])
def test_spelling_variants_of_an_allowed_name_reach_it_as_that_name(
    proxy: BackgroundProxy, origin: Origin, host: str
) -> None:
    n = len(proxy.events())
    data = get(proxy, f"http://{host}/x", host=host)
    assert status(data) == 200, data
    event = only_event(proxy, n)
    assert (event.host, event.reason) == (API, "allow")


@pytest.mark.parametrize("host", [f"{EVIL}.", "EVIL.example.TEST", "Evil.Example.Test."])
def test_spelling_variants_of_a_denied_name_are_denied(proxy: BackgroundProxy, host: str) -> None:
    n = len(proxy.events())
    data = get(proxy, f"http://{host}/")
    assert status(data) == 403 and b"blocked-by-denylist" in data
    assert (only_event(proxy, n).host, only_event(proxy, n).reason) == (EVIL, "denied")


@pytest.mark.parametrize("host", [f"{API}..", "api..example.test", ".api.example.test", "."])
def test_empty_labels_are_invalid(proxy: BackgroundProxy, host: str) -> None:
    n = len(proxy.events())
    assert status(get(proxy, f"http://{host}/")) == 400
    event = only_event(proxy, n)
    assert (event.reason, event.decision) == ("invalid_host", "deny")


@pytest.mark.parametrize(
    "host",
    [
        "evilapi.example.test",
        f"{API}.evil.io",
        f"x{API}",
        "allowed.example.test.evil.io",
        "sub-api.example.test",
    ],
)
def test_no_suffix_or_prefix_over_match(proxy: BackgroundProxy, host: str) -> None:
    n = len(proxy.events())
    assert status(get(proxy, f"http://{host}/")) == 403
    assert (only_event(proxy, n).host, only_event(proxy, n).reason) == (host, "not_allowed")


def test_double_star_pattern_matches_apex_and_subdomains_only(proxy: BackgroundProxy) -> None:
    n = len(proxy.events())
    sock, head = open_tunnel(proxy, "notallowed.example.test:443")
    sock.close()
    assert status(head) == 403
    assert only_event(proxy, n).reason == "not_allowed"


# --- 10: IDN look-alikes and full-width dots -----------------------------------------------------

CYRILLIC_A = "\u0430"  # looks like Latin "a"


def test_idn_lookalike_a_label_is_a_different_host(proxy: BackgroundProxy) -> None:
    lookalike = f"{CYRILLIC_A}pi.example.test".encode("idna").decode()
    assert lookalike.startswith("xn--") and lookalike != API
    n = len(proxy.events())
    assert status(get(proxy, f"http://{lookalike}/")) == 403
    assert (only_event(proxy, n).host, only_event(proxy, n).reason) == (lookalike, "not_allowed")


def test_idn_lookalike_u_label_over_socks_is_not_the_ascii_name(proxy: BackgroundProxy) -> None:
    n = len(proxy.events())
    sock, code = socks_domain(proxy, f"{CYRILLIC_A}pi.example.test", 80)
    sock.close()
    assert code == 0x02
    event = only_event(proxy, n)
    assert event.host.startswith("xn--") and event.host != API
    assert (event.reason, event.protocol) == ("not_allowed", "socks5_tcp")


@pytest.mark.parametrize("dot", ["\u3002", "\uff0e", "\uff61"])
def test_full_width_dots_canonicalise_to_the_same_decision(
    proxy: BackgroundProxy, origin: Origin, dot: str
) -> None:
    n = len(proxy.events())
    sock, code = socks_domain(proxy, f"api{dot}example{dot}test", 80)
    with sock:
        assert code == 0x00
        sock.sendall(f"GET /fw HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert status(read_response(sock)) == 200
    sock, code = socks_domain(proxy, f"evil{dot}example{dot}test", 80)
    sock.close()
    assert code == 0x02
    first, second = events_after(proxy, n)
    assert (first.host, first.reason) == (API, "allow")
    assert (second.host, second.reason) == (EVIL, "denied")


@pytest.mark.parametrize("host", ["api\u3002example\u3002test", f"{CYRILLIC_A}pi.example.test"])
def test_non_ascii_http_targets_are_refused_unforwarded(
    proxy: BackgroundProxy, origin: Origin, host: str
) -> None:
    """Raw UTF-8 in the request line is malformed HTTP (h11 rejects it before any policy)."""
    data = send(proxy, f"GET http://{host}/ HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
    assert status(data) == 400
    assert origin.requests == []


# --- 11, 12: userinfo, %, control characters, zone ids -------------------------------------------

INVALID_AUTHORITIES = [
    f"{API}@{EVIL}",
    f"{API}:80@{EVIL}",
    f"{API}%2f@{EVIL}",
    f"{API}%40{EVIL}",
    f"{EVIL}%00.{API}",
    "%61pi.example.test",
    f"{API}%2e",
    f"{EVIL}\\.{API}",
    f"{API};.evil",
    "[api.example.test]",
    f"[{API}]:80",
    "[127.0.0.1]",
]


@pytest.mark.parametrize("authority", INVALID_AUTHORITIES)
def test_userinfo_percent_and_zone_tricks_are_invalid_host(
    proxy: BackgroundProxy, origin: Origin, authority: str
) -> None:
    n = len(proxy.events())
    data = get(proxy, f"http://{authority}/")
    assert status(data) == 400, data
    event = only_event(proxy, n)
    assert (event.reason, event.decision) == ("invalid_host", "deny")
    assert event.host != API
    assert origin.requests == []


@pytest.mark.parametrize("authority", [f"{API}@{EVIL}:443", f"{API}%2f@{EVIL}:443", f"[{API}]:443"])
def test_connect_userinfo_and_percent_tricks_are_invalid_host(
    proxy: BackgroundProxy, authority: str
) -> None:
    n = len(proxy.events())
    sock, head = open_tunnel(proxy, authority)
    sock.close()
    assert status(head) == 400
    event = only_event(proxy, n)
    assert (event.reason, event.protocol) == ("invalid_host", "https_connect")


@pytest.mark.parametrize("host", [f"{API}@{EVIL}", f"{EVIL}\x00.{API}", f"{API}%2f"])
def test_socks_domain_tricks_are_invalid_host(proxy: BackgroundProxy, host: str) -> None:
    n = len(proxy.events())
    sock, code = socks_domain(proxy, host, 80)
    sock.close()
    assert code == 0x02
    event = only_event(proxy, n)
    assert (event.reason, event.protocol) == ("invalid_host", "socks5_tcp")


def test_userinfo_in_host_header_of_origin_form_is_invalid(proxy: BackgroundProxy) -> None:
    n = len(proxy.events())
    assert status(get(proxy, "/", host=f"{API}@{EVIL}")) == 400
    assert only_event(proxy, n).reason == "invalid_host"


# --- 13, 22: rebinding through static answers and mixed answers ----------------------------------


@pytest.mark.parametrize(
    "name",
    ["rebind.example.test", "mixed.example.test", "mapped.example.test", "meta.example.test"],
)
def test_allowed_names_with_local_answers_are_not_allowed_local(
    proxy: BackgroundProxy, name: str
) -> None:
    n = len(proxy.events())
    assert status(get(proxy, f"http://{name}/")) == 403
    sock, head = open_tunnel(proxy, f"{name}:443")
    sock.close()
    assert status(head) == 403
    sock, code = socks_domain(proxy, name, 443)
    sock.close()
    assert code == 0x02
    events = events_after(proxy, n)
    assert [(e.host, e.reason, e.protocol) for e in events] == [
        (name, "not_allowed_local", "http"),
        (name, "not_allowed_local", "https_connect"),
        (name, "not_allowed_local", "socks5_tcp"),
    ]


# --- 15: absolute-form vs Host -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (f"http://{API}/", EVIL),
        (f"http://{EVIL}/", API),
        (f"http://{API}/", f"{API}:8080"),
        (f"http://{API}:8080/", API),
        (f"http://{API}/", f"{API}@{EVIL}"),
        (f"http://{API}/", f"{EVIL}, {API}"),
    ],
)
def test_absolute_form_host_mismatch(
    proxy: BackgroundProxy, origin: Origin, target: str, host: str
) -> None:
    n = len(proxy.events())
    data = get(proxy, target, host=host)
    assert status(data) == 400 and b"does not match" in data
    event = only_event(proxy, n)
    assert (event.reason, event.decision) == ("host_mismatch", "deny")
    assert origin.requests == []


def test_duplicate_host_headers_are_refused(proxy: BackgroundProxy, origin: Origin) -> None:
    n = len(proxy.events())
    data = send(
        proxy, f"GET http://{API}/ HTTP/1.1\r\nHost: {API}\r\nHost: {EVIL}\r\n\r\n".encode()
    )
    assert status(data) == 400
    assert [e.decision for e in events_after(proxy, n)] in ([], ["deny"])
    assert origin.requests == []


def test_keep_alive_request_switching_host_is_judged_on_its_own(
    proxy: BackgroundProxy, origin: Origin
) -> None:
    n = len(proxy.events())
    with socket.create_connection(_addr(proxy), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET http://{API}/one HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert status(read_response(sock)) == 200
        sock.sendall(b"GET http://127.0.0.1/two HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status(read_response(sock)) == 403
        sock.sendall(b"GET /three HTTP/1.1\r\nHost: 0x7f000001\r\n\r\n")
        assert status(read_response(sock)) == 403
    assert [(e.host, e.reason) for e in events_after(proxy, n)] == [
        (API, "allow"),
        ("127.0.0.1", "not_allowed_local"),
        ("127.0.0.1", "not_allowed_local"),
    ]
    assert [r.path for r in origin.requests] == ["/one"]


# --- 16: CONNECT vs SNI vs inner Host ------------------------------------------------------------


@pytest.fixture
def tls_proxy(start_proxy, tls_origin: Origin) -> Iterator[BackgroundProxy]:
    with start_proxy(allow=[API], routes={f"{API}:443": tls_origin.addr}) as p:
        yield p


def _client_context(cafile: Path | str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


@pytest.mark.parametrize("delay", [0.0, 1.0])
def test_connect_sni_mismatch_is_host_mismatch(
    tls_proxy: BackgroundProxy, tls_origin: Origin, origin_ca_file: Path, delay: float
) -> None:
    n = len(tls_proxy.events())
    sock, head = open_tunnel(tls_proxy, f"{API}:443")
    assert status(head) == 200
    time.sleep(delay)  # a ClientHello that arrives late must still be inspected
    context = _client_context(origin_ca_file)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with sock, pytest.raises((ssl.SSLError, OSError)):
        context.wrap_socket(sock, server_hostname="other.example.test").sendall(b"x")
    end = time.monotonic() + 5
    while len(events_after(tls_proxy, n)) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    assert [e.reason for e in events_after(tls_proxy, n)] == ["allow", "host_mismatch"]
    assert tls_origin.requests == []


def test_socks_sni_mismatch_is_host_mismatch(
    tls_proxy: BackgroundProxy, tls_origin: Origin
) -> None:
    n = len(tls_proxy.events())
    sock, code = socks_domain(tls_proxy, API, 443)
    assert code == 0
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with sock, pytest.raises((ssl.SSLError, OSError)):
        context.wrap_socket(sock, server_hostname="other.example.test").sendall(b"x")
    end = time.monotonic() + 5
    while len(events_after(tls_proxy, n)) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    assert [(e.reason, e.protocol) for e in events_after(tls_proxy, n)] == [
        ("allow", "socks5_tcp"),
        ("host_mismatch", "socks5_tcp"),
    ]
    assert tls_origin.requests == []


def test_matching_sni_and_ip_tunnel_without_sni_pass(
    tls_proxy: BackgroundProxy, tls_origin: Origin, origin_ca_file: Path
) -> None:
    sock, head = open_tunnel(tls_proxy, f"{API}:443")
    assert status(head) == 200
    with _client_context(origin_ca_file).wrap_socket(sock, server_hostname=API) as tls:
        tls.sendall(f"GET /ok HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert status(read_response(tls)) == 200
    assert [r.path for r in tls_origin.requests] == ["/ok"]


@pytest.fixture
def limited(start_proxy, tls_origin: Origin, origin: Origin) -> Iterator[BackgroundProxy]:
    with start_proxy(
        allow=[API, "other.example.test"],
        mode="limited",
        routes={f"{API}:443": tls_origin.addr, f"{API}:80": origin.addr},
    ) as p:
        yield p


def _intercepted(p: BackgroundProxy, host: str = API) -> ssl.SSLSocket:
    sock, head = open_tunnel(p, f"{host}:443")
    assert status(head) == 200
    assert p.ca_cert_path is not None
    return _client_context(p.ca_cert_path).wrap_socket(sock, server_hostname=host)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: api.example.test:8443\r\n\r\n",
        b"GET https://other.example.test/ HTTP/1.1\r\nHost: other.example.test\r\n\r\n",
        b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    ],
)
def test_inner_host_must_equal_connect_host(
    limited: BackgroundProxy, tls_origin: Origin, request_bytes: bytes
) -> None:
    with _intercepted(limited) as tls:
        n = len(limited.events())
        tls.sendall(request_bytes)
        data = read_response(tls)
    assert status(data) == 400
    event = only_event(limited, n)
    assert (event.reason, event.protocol, event.host) == ("host_mismatch", "https", API)
    assert tls_origin.requests == []


def test_inner_request_without_host_is_refused_unforwarded(
    limited: BackgroundProxy, tls_origin: Origin
) -> None:
    with _intercepted(limited) as tls:
        n = len(limited.events())
        tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert status(read_response(tls)) == 400
    assert all(e.decision == "deny" for e in events_after(limited, n))
    assert tls_origin.requests == []


def test_second_inner_request_switching_host_is_refused(
    limited: BackgroundProxy, tls_origin: Origin
) -> None:
    with _intercepted(limited) as tls:
        n = len(limited.events())
        tls.sendall(f"GET /first HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert status(read_response(tls)) == 200
        tls.sendall(b"GET /second HTTP/1.1\r\nHost: other.example.test\r\n\r\n")
        assert status(read_response(tls)) == 400
    assert [(e.reason, e.protocol) for e in events_after(limited, n)] == [
        ("allow", "https"),
        ("host_mismatch", "https"),
    ]
    assert [r.path for r in tls_origin.requests] == ["/first"]


def test_intercepted_sni_mismatch_is_host_mismatch(limited: BackgroundProxy) -> None:
    n = len(limited.events())
    sock, head = open_tunnel(limited, f"{API}:443")
    assert status(head) == 200
    assert limited.ca_cert_path is not None
    context = _client_context(limited.ca_cert_path)
    context.check_hostname = False
    with sock, pytest.raises((ssl.SSLError, OSError)):
        context.wrap_socket(sock, server_hostname="other.example.test").sendall(b"x")
    end = time.monotonic() + 5
    while len(events_after(limited, n)) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    assert [e.reason for e in events_after(limited, n)] == ["allow", "host_mismatch"]


# --- 20, 21: limited mode: non-TLS tunnels and method smuggling ----------------------------------


def test_plain_http_inside_a_limited_tunnel_is_method_not_allowed(
    limited: BackgroundProxy, origin: Origin
) -> None:
    n = len(limited.events())
    sock, head = open_tunnel(limited, f"{API}:443")
    with sock:
        assert status(head) == 200
        sock.sendall(f"POST / HTTP/1.1\r\nHost: {API}\r\nContent-Length: 0\r\n\r\n".encode())
        wait_closed(sock)
    assert [(e.reason, e.source, e.protocol) for e in events_after(limited, n)] == [
        ("allow", "baseline_policy", "https_connect"),
        ("method_not_allowed", "mode_guard", "https_connect"),
    ]
    assert origin.requests == []


@pytest.mark.parametrize(
    "method", ["post", "Get", "POST", "DELETE", "PUT", "PATCH", "TRACE", "get"]
)
def test_limited_mode_judges_the_real_method_line(
    limited: BackgroundProxy, origin: Origin, method: str
) -> None:
    n = len(limited.events())
    data = send(
        limited,
        f"{method} http://{API}/ HTTP/1.1\r\nHost: {API}\r\nContent-Length: 2\r\n\r\nhi".encode(),
    )
    assert status(data) == 403 and b"blocked-by-method-policy" in data
    event = only_event(limited, n)
    assert (event.reason, event.method, event.source) == (
        "method_not_allowed",
        method,
        "mode_guard",
    )
    assert origin.requests == []


@pytest.mark.parametrize(
    "header", ["X-HTTP-Method-Override: DELETE", "X-HTTP-Method: PUT", "X-Method-Override: POST"]
)
def test_method_override_headers_do_not_change_the_judged_method(
    limited: BackgroundProxy, origin: Origin, header: str
) -> None:
    n = len(limited.events())
    data = send(limited, f"GET http://{API}/o HTTP/1.1\r\nHost: {API}\r\n{header}\r\n\r\n".encode())
    assert status(data) == 200
    event = only_event(limited, n)
    assert (event.reason, event.method) == ("allow", "GET")
    name, _, value = header.partition(": ")
    assert origin.requests[-1].method == "GET"
    assert origin.requests[-1].headers[name.lower()] == value


def test_post_inside_an_intercepted_tunnel_is_method_not_allowed(
    limited: BackgroundProxy, tls_origin: Origin
) -> None:
    with _intercepted(limited) as tls:
        n = len(limited.events())
        tls.sendall(f"POST /p HTTP/1.1\r\nHost: {API}\r\nContent-Length: 1\r\n\r\nx".encode())
        data = read_response(tls)
        assert status(data) == 403
        assert json.loads(data.partition(b"\r\n\r\n")[2])["reason"] == "method_not_allowed"
        tls.sendall(f"GET /g HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert status(read_response(tls)) == 200  # a 403 does not close the connection
    assert [(e.reason, e.protocol) for e in events_after(limited, n)] == [
        ("method_not_allowed", "https"),
        ("allow", "https"),
    ]
    assert [r.path for r in tls_origin.requests] == ["/g"]


@pytest.mark.parametrize(
    "line", [f"CONNECT {API}:443 HTTP/1.1", "CONNECT other.example.test:443 HTTP/1.1"]
)
def test_connect_inside_an_intercepted_tunnel_is_405(
    limited: BackgroundProxy, tls_origin: Origin, line: str
) -> None:
    with _intercepted(limited) as tls:
        tls.sendall(f"{line}\r\nHost: {API}:443\r\n\r\n".encode())
        assert status(read_response(tls)) == 405
    assert tls_origin.requests == []


def test_upgrade_is_refused_in_limited_mode(limited: BackgroundProxy, origin: Origin) -> None:
    n = len(limited.events())
    data = send(
        limited,
        f"GET http://{API}/ws HTTP/1.1\r\nHost: {API}\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode(),
    )
    assert status(data) == 403
    assert [e.reason for e in events_after(limited, n)][-1] == "method_not_allowed"
    assert origin.requests == []


def test_socks_non_443_in_limited_mode_is_method_not_allowed(limited: BackgroundProxy) -> None:
    n = len(limited.events())
    sock, code = socks_domain(limited, API, 80)
    sock.close()
    assert code == 0x02
    assert [(e.reason, e.protocol) for e in events_after(limited, n)][-1] == (
        "method_not_allowed",
        "socks5_tcp",
    )


# --- 17: IP-literal SOCKS targets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("atyp", "addr", "canonical", "reason"),
    [
        (1, socket.inet_aton("127.0.0.1"), "127.0.0.1", "not_allowed_local"),
        (1, socket.inet_aton("10.1.2.3"), "10.1.2.3", "not_allowed_local"),
        (1, socket.inet_aton("169.254.169.254"), "169.254.169.254", "not_allowed_local"),
        (1, socket.inet_aton("0.0.0.0"), "0.0.0.0", "not_allowed_local"),
        (1, socket.inet_aton("93.184.216.34"), "93.184.216.34", "not_allowed"),
        (4, socket.inet_pton(socket.AF_INET6, "::1"), "::1", "not_allowed_local"),
        (
            4,
            socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1"),
            "::ffff:7f00:1",
            "not_allowed_local",
        ),
        (
            4,
            socket.inet_pton(socket.AF_INET6, "64:ff9b::a00:1"),
            "64:ff9b::a00:1",
            "not_allowed_local",
        ),
        (4, socket.inet_pton(socket.AF_INET6, "::"), "::", "not_allowed_local"),
        (3, b"2130706433", "127.0.0.1", "not_allowed_local"),
        (3, b"0x7f.1", "127.0.0.1", "not_allowed_local"),
        (3, b"localhost", "localhost", "not_allowed_local"),
    ],
)
def test_ip_literal_socks_targets(
    proxy: BackgroundProxy, atyp: int, addr: bytes, canonical: str, reason: str
) -> None:
    n = len(proxy.events())
    sock, code = socks_connect(proxy, atyp, addr, 80)
    sock.close()
    assert code == 0x02
    event = only_event(proxy, n)
    assert (event.host, event.reason, event.protocol) == (canonical, reason, "socks5_tcp")
