"""`net.tls.start_tls`: the event loop's TLS behind an anyio ByteStream (MITM legs).

Real sockets on 127.0.0.1, trustme certificates, on plain asyncio and on uvloop.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import pytest
import trustme
from anyio.streams.tls import TLSAttribute, TLSStream

from netproxy_core.net.streams import ReplayStream, peek
from netproxy_core.net.tls import READ_HIGH, TlsStream, start_tls

try:
    import uvloop  # noqa: F401

    LOOPS = ["asyncio", "uvloop"]
except ImportError:  # pragma: no cover - the speed extra is optional
    LOOPS = ["asyncio"]

HOST = "tls.example.test"


@pytest.fixture(scope="module")
def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server)
    server.set_alpn_protocols(["http/1.1"])
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.set_alpn_protocols(["http/1.1"])
    return server, client


Handler = Callable[[anyio.abc.ByteStream], Awaitable[None]]


def run(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})


async def with_server(
    server_ctx: ssl.SSLContext, handler: Handler, client: Callable[[int], Awaitable[None]]
) -> None:
    """Accept one connection: peek its first bytes (as tunnel routing does), then TLS."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    done = anyio.Event()

    async def accept(stream: anyio.abc.SocketStream) -> None:
        replay = ReplayStream(stream)
        try:
            await peek(replay, 5, first_byte_timeout=5, total_timeout=5)
            tls = await start_tls(replay, server_ctx, server_side=True, handshake_timeout=5)
            try:
                await handler(tls)
            finally:
                await tls.aclose()
        finally:
            await replay.aclose()
            done.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, accept)
            await client(port)
            await done.wait()
            tg.cancel_scope.cancel()


async def dial_tls(port: int, client_ctx: ssl.SSLContext) -> anyio.abc.ByteStream:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    return await start_tls(
        stream, client_ctx, server_side=False, hostname=HOST, handshake_timeout=5
    )


async def read_exactly(stream: anyio.abc.ByteStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        data += await stream.receive()
    return bytes(data)


@pytest.mark.parametrize("loop", LOOPS)
def test_echo_both_ways_with_peeked_client_hello(
    loop: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = contexts
    payload = bytes(range(256)) * (8 * 1024)  # 2 MiB
    seen: dict[str, Any] = {}

    async def echo(tls: anyio.abc.ByteStream) -> None:
        seen["type"] = type(tls)
        seen["alpn"] = tls.extra(TLSAttribute.alpn_protocol)
        seen["server_side"] = tls.extra(TLSAttribute.server_side)
        seen["peer"] = tls.extra(anyio.abc.SocketAttribute.remote_address)
        seen["raw_socket"] = tls.extra(anyio.abc.SocketAttribute.raw_socket, None)
        while True:
            try:
                data = await tls.receive()
            except anyio.EndOfStream:
                return
            await tls.send(data)

    async def client(port: int) -> None:
        tls = await dial_tls(port, client_ctx)
        assert type(tls) is TlsStream
        assert tls.extra(TLSAttribute.tls_version) in ("TLSv1.2", "TLSv1.3")
        async with anyio.create_task_group() as tg:
            tg.start_soon(tls.send, payload)
            assert await read_exactly(tls, len(payload)) == payload
        await tls.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await tls.receive()

    async def main() -> None:
        await with_server(server_ctx, echo, client)

    run(loop, main)
    assert seen["type"] is TlsStream
    assert seen["alpn"] == "http/1.1"
    assert seen["server_side"] is True
    assert seen["peer"][0] == "127.0.0.1"
    assert seen["raw_socket"] is None  # nothing may read or splice under the TLS layer


@pytest.mark.parametrize("loop", LOOPS)
def test_close_after_send_delivers_everything_to_a_slow_reader(
    loop: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """`send` returns only when bytes reached the kernel, so closing (an abort) loses none."""
    server_ctx, client_ctx = contexts
    size = 16 << 20

    async def blast(tls: anyio.abc.ByteStream) -> None:
        await tls.receive()  # the client's go
        chunk = b"z" * (1 << 20)
        for _ in range(size // len(chunk)):
            await tls.send(chunk)

    async def client(port: int) -> None:
        tls = await dial_tls(port, client_ctx)
        await tls.send(b"go")
        await anyio.sleep(0.3)  # let the server fill every buffer on the way
        got = 0
        while True:
            try:
                got += len(await tls.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
        await tls.aclose()
        assert got == size

    async def main() -> None:
        await with_server(server_ctx, blast, client)

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_peer_close_reads_as_end_of_stream_and_send_fails(
    loop: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = contexts
    outcome: dict[str, object] = {}

    async def closer(tls: anyio.abc.ByteStream) -> None:
        await tls.send(b"bye")

    async def client(port: int) -> None:
        tls = await dial_tls(port, client_ctx)
        assert await read_exactly(tls, 3) == b"bye"
        with pytest.raises(anyio.EndOfStream):
            await tls.receive()
        try:
            await tls.send(b"late")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            outcome["send"] = type(exc)
        with pytest.raises(NotImplementedError):
            await tls.send_eof()
        await tls.aclose()

    async def main() -> None:
        await with_server(server_ctx, closer, client)

    run(loop, main)
    assert outcome["send"] is anyio.BrokenResourceError


@pytest.mark.parametrize("loop", LOOPS)
def test_untrusted_certificate_fails_the_handshake(
    loop: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, _ = contexts
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    errors: list[BaseException] = []

    async def never(tls: anyio.abc.ByteStream) -> None:
        raise AssertionError("handshake should have failed")

    async def client(port: int) -> None:
        stream = await anyio.connect_tcp("127.0.0.1", port)
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await start_tls(stream, stranger, server_side=False, hostname=HOST, handshake_timeout=5)
        errors.append(info.value)
        await stream.aclose()

    async def main() -> None:
        with pytest.raises(BaseExceptionGroup) as group:  # the server side fails too
            await with_server(server_ctx, never, client)
        assert group.group_contains(ssl.SSLError) or group.group_contains(OSError)

    run(loop, main)
    assert errors


def test_streams_without_a_transport_use_anyio_tls(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Any
) -> None:
    """A unix socket stream (no asyncio transport) takes anyio's TLSStream path."""
    server_ctx, client_ctx = contexts
    path = str(tmp_path / "s")
    kinds: list[type] = []

    async def main() -> None:
        listener = await anyio.create_unix_listener(path)

        async def accept(stream: anyio.abc.SocketStream) -> None:
            tls = await start_tls(stream, server_ctx, server_side=True, handshake_timeout=5)
            kinds.append(type(tls))
            await tls.send(await tls.receive())
            await tls.aclose()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, accept)
                stream = await anyio.connect_unix(path)
                tls = await start_tls(
                    stream, client_ctx, server_side=False, hostname=HOST, handshake_timeout=5
                )
                kinds.append(type(tls))
                await tls.send(b"ping")
                assert await tls.receive() == b"ping"
                await tls.aclose()
                tg.cancel_scope.cancel()

    anyio.run(main)
    assert kinds == [TLSStream, TLSStream]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reader_that_falls_behind_bounds_what_is_buffered(
    loop: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """Back-pressure reaches the socket: a stalled reader holds about `READ_HIGH`, not the
    whole 16 MiB the peer tries to send, and then still gets every byte."""
    server_ctx, client_ctx = contexts
    size = 16 << 20

    async def blast(tls: anyio.abc.ByteStream) -> None:
        await tls.receive()
        chunk = b"z" * (1 << 20)
        for _ in range(size // len(chunk)):
            await tls.send(chunk)

    async def client(port: int) -> None:
        tls = await dial_tls(port, client_ctx)
        await tls.send(b"go")
        await anyio.sleep(0.5)
        assert isinstance(tls, TlsStream)
        buffered = tls._protocol.size
        assert buffered <= READ_HIGH + (256 << 10), buffered
        got = 0
        while got < size:
            got += len(await tls.receive())
        await tls.aclose()
        assert got == size

    run(loop, lambda: with_server(server_ctx, blast, client))
