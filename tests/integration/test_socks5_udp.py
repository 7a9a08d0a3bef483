"""SOCKS5 UDP ASSOCIATE relay (SPEC §6): echo through the relay, per-destination policy, source
checks, fragments, and the association's end with its TCP control connection."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from netproxy_core import BackgroundProxy

DNS_NAME = "dns.example.test"


@contextmanager
def udp_echo(host: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    """A UDP server that sends every datagram back to its sender, prefixed with b'echo:'."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            sock.sendto(b"echo:" + data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield host, sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def encode_addr(host: str, port: int) -> bytes:
    for family, atyp in ((socket.AF_INET, b"\x01"), (socket.AF_INET6, b"\x04")):
        try:
            return atyp + socket.inet_pton(family, host) + struct.pack("!H", port)
        except OSError:
            continue
    name = host.encode()
    return b"\x03" + bytes([len(name)]) + name + struct.pack("!H", port)


def decode_addr(data: bytes) -> tuple[str, int, bytes]:
    """(host, port, rest) from ATYP + ADDR + PORT + rest."""
    atyp = data[0]
    if atyp == 1:
        host, rest = socket.inet_ntop(socket.AF_INET, data[1:5]), data[5:]
    elif atyp == 4:
        host, rest = socket.inet_ntop(socket.AF_INET6, data[1:17]), data[17:]
    else:
        n = data[1]
        host, rest = data[2 : 2 + n].decode(), data[2 + n :]
    return host, struct.unpack("!H", rest[:2])[0], rest[2:]


def datagram(host: str, port: int, payload: bytes, frag: int = 0) -> bytes:
    return b"\x00\x00" + bytes([frag]) + encode_addr(host, port) + payload


def unwrap(data: bytes) -> tuple[str, int, bytes]:
    assert data[:3] == b"\x00\x00\x00"
    return decode_addr(data[3:])


@contextmanager
def associate(
    proxy: BackgroundProxy, host: str = "0.0.0.0", port: int = 0
) -> Iterator[tuple[socket.socket, tuple[str, int]]]:
    """(control connection, relay address) of a UDP association."""
    assert proxy.socks_addr is not None
    control = socket.create_connection(proxy.socks_addr, timeout=10)
    try:
        control.sendall(b"\x05\x01\x00" + b"\x05\x03\x00" + encode_addr(host, port))
        assert recv_exact(control, 2) == b"\x05\x00"
        head = recv_exact(control, 4)
        assert head[:2] == b"\x05\x00", f"reply code {head[1]}"
        size = 4 if head[3] == 1 else 16
        relay_host = socket.inet_ntop(
            socket.AF_INET if size == 4 else socket.AF_INET6, recv_exact(control, size)
        )
        relay_port = struct.unpack("!H", recv_exact(control, 2))[0]
        yield control, (relay_host, relay_port)
    finally:
        control.close()


@contextmanager
def udp_client(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def udp_events(proxy: BackgroundProxy) -> list[tuple[object, object, object]]:
    return [
        (e.host, e.port, str(e.reason)) for e in proxy.events() if str(e.protocol) == "socks5_udp"
    ]


def test_echo_through_relay_and_policy_per_destination(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with (
        udp_echo() as (echo_host, echo_port),
        start_proxy(
            allow=["127.0.0.1", DNS_NAME], routes={f"{DNS_NAME}:53": f"{echo_host}:{echo_port}"}
        ) as p,
    ):
        with associate(p) as (_control, relay), udp_client() as client:
            assert relay[0] == "127.0.0.1" and relay[1] != 0
            for i in range(3):
                client.sendto(datagram(echo_host, echo_port, b"ip%d" % i), relay)
                assert unwrap(client.recv(65535)) == (echo_host, echo_port, b"echo:ip%d" % i)
            # a routed name: the answer names the destination the client asked for
            client.sendto(datagram(DNS_NAME, 53, b"name"), relay)
            assert unwrap(client.recv(65535)) == (DNS_NAME, 53, b"echo:name")
            # denied destinations are dropped (the next answer is the allowed one's) and audited
            client.sendto(datagram("other.example.test", 53, b"denied"), relay)
            client.sendto(datagram("10.0.0.1", 53, b"local"), relay)
            client.sendto(datagram(echo_host, echo_port, b"after"), relay)
            assert unwrap(client.recv(65535))[2] == b"echo:after"
        # one evaluation per distinct destination per association (module docstring)
        assert udp_events(p) == [
            ("127.0.0.1", echo_port, "allow"),
            (DNS_NAME, 53, "allow"),
            ("other.example.test", 53, "not_allowed"),
            ("10.0.0.1", 53, "not_allowed_local"),
        ]


def test_ipv6_destination(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with (
        udp_echo("::1") as (_, echo_port),
        start_proxy(allow=["::1"]) as p,
        associate(p) as (_control, relay),
        udp_client() as client,
    ):
        client.sendto(datagram("::1", echo_port, b"six"), relay)
        assert unwrap(client.recv(65535)) == ("::1", echo_port, b"echo:six")


def test_only_the_associating_client_is_relayed(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with (
        udp_echo() as (echo_host, echo_port),
        start_proxy(allow=["127.0.0.1"]) as p,
        associate(p) as (_c, relay),
        udp_client() as first,
        udp_client() as other,
        udp_client("127.0.0.2") as stranger,
    ):
        first.sendto(datagram(echo_host, echo_port, b"first"), relay)  # fixes the port
        assert unwrap(first.recv(65535))[2] == b"echo:first"
        other.sendto(datagram(echo_host, echo_port, b"other-port"), relay)
        stranger.sendto(datagram(echo_host, echo_port, b"other-ip"), relay)
        first.sendto(datagram(echo_host, echo_port, b"again"), relay)
        assert unwrap(first.recv(65535))[2] == b"echo:again"  # not an echo of the others
        for ignored in (other, stranger):
            ignored.settimeout(0.2)
            with pytest.raises(TimeoutError):
                ignored.recv(65535)


def test_declared_client_port_is_enforced(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with (
        udp_echo() as (echo_host, echo_port),
        start_proxy(allow=["127.0.0.1"]) as p,
        udp_client() as declared,
        udp_client() as intruder,
        associate(p, "127.0.0.1", declared.getsockname()[1]) as (_c, relay),
    ):
        intruder.sendto(datagram(echo_host, echo_port, b"intruder"), relay)  # sent first
        declared.sendto(datagram(echo_host, echo_port, b"declared"), relay)
        assert unwrap(declared.recv(65535))[2] == b"echo:declared"
        intruder.settimeout(0.2)
        with pytest.raises(TimeoutError):
            intruder.recv(65535)


def test_fragments_and_bad_headers_are_dropped(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with (
        udp_echo() as (echo_host, echo_port),
        start_proxy(allow=["127.0.0.1"]) as p,
        associate(p) as (_c, relay),
        udp_client() as client,
    ):
        client.sendto(datagram(echo_host, echo_port, b"frag", frag=1), relay)
        client.sendto(b"\x00\x00\x00\x09garbage", relay)
        client.sendto(b"\x00", relay)
        client.sendto(datagram(echo_host, 0, b"port zero"), relay)
        client.sendto(datagram(echo_host, echo_port, b"whole"), relay)
        assert unwrap(client.recv(65535))[2] == b"echo:whole"  # the others were dropped


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait_until(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_association_ends_with_its_tcp_connection(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with (
        udp_echo() as (echo_host, echo_port),
        start_proxy(allow=["127.0.0.1", "::1"]) as p,
        udp_client() as client,
    ):
        baseline = _open_fds()
        with associate(p) as (control, relay):
            client.sendto(datagram(echo_host, echo_port, b"v4"), relay)
            assert unwrap(client.recv(65535))[2] == b"echo:v4"
            with udp_echo("::1") as (_h6, port6):  # opens the IPv6 outbound socket too
                client.sendto(datagram("::1", port6, b"v6"), relay)
                assert unwrap(client.recv(65535))[2] == b"echo:v6"
            control.shutdown(socket.SHUT_WR)
            assert control.recv(1) == b""  # the proxy closes its side
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect(relay)
        probe.settimeout(0.2)

        def relay_closed() -> bool:
            try:
                probe.send(b"x")
                probe.recv(1)
            except ConnectionRefusedError:
                return True
            except TimeoutError:
                return False
            return False

        try:
            assert _wait_until(relay_closed), "the relay socket is still open"
        finally:
            probe.close()
        assert _wait_until(lambda: _open_fds() <= baseline), "sockets leaked"


def test_shutdown_ends_open_associations(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with start_proxy(allow=["127.0.0.1"]) as p, associate(p) as (control, _relay):
        started = time.monotonic()
        p.close()  # must not wait shutdown_grace for the idle association
        assert time.monotonic() - started < 3
        assert control.recv(1) == b""
