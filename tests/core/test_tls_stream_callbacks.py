"""`TlsStream`'s callback use: `set_listener`, `take`, `write`, `write_blocked`, `ended`, `idle`,
`abort` (what the intercepted fast path relays with, no task waking per arrival).

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

from netproxy_core.net.tls import TlsStream, start_tls

try:
    import uvloop  # noqa: F401

    LOOPS = ["asyncio", "uvloop"]
except ImportError:  # pragma: no cover - the speed extra is optional
    LOOPS = ["asyncio"]

HOST = "callbacks.example.test"
PAYLOAD = bytes(range(256)) * (16 * 1024)  # 4 MiB


@pytest.fixture(scope="module")
def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def run(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})


async def pair(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> tuple[anyio.abc.ByteStream, anyio.abc.ByteStream, anyio.abc.Listener[Any]]:
    """(server side, client side) of one TLS connection on 127.0.0.1."""
    server_ctx, client_ctx = contexts
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    accepted: list[anyio.abc.ByteStream] = []

    async def accept() -> None:
        stream = await listener.listeners[0].accept()  # type: ignore[attr-defined]
        accepted.append(await start_tls(stream, server_ctx, server_side=True, handshake_timeout=5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(accept)
        raw = await anyio.connect_tcp("127.0.0.1", port)
        client = await start_tls(
            raw, client_ctx, server_side=False, hostname=HOST, handshake_timeout=5
        )
    return accepted[0], client, listener


@pytest.mark.parametrize("loop", LOOPS)
def test_a_listener_echoes_and_sees_the_close(
    loop: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    seen: dict[str, Any] = {"calls": 0}

    async def main() -> None:
        with anyio.fail_after(30):
            server, client, listener = await pair(contexts)
            assert isinstance(server, TlsStream)
            seen["idle"] = server.idle
            ended = anyio.Event()

            def on_event() -> None:  # echo what came, as far as the client keeps up
                seen["calls"] += 1
                while not server.write_blocked:
                    data = server.take()
                    if not data:
                        break
                    server.write(data)
                if server.ended:
                    ended.set()

            server.set_listener(on_event)
            echoed = bytearray()

            async def read_back() -> None:
                while len(echoed) < len(PAYLOAD):
                    echoed.extend(await client.receive())

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_back)
                await client.send(PAYLOAD)
            await client.aclose()
            await ended.wait()
            server.set_listener(None)
            seen["idle_after"] = server.idle
            with pytest.raises(anyio.BrokenResourceError):
                server.write(b"late")
            server.abort()
            with pytest.raises(anyio.ClosedResourceError):
                server.write(b"later")
            await listener.aclose()
            assert bytes(echoed) == PAYLOAD

    run(loop, main)
    assert seen["idle"] is True and seen["idle_after"] is False
    assert seen["calls"] > 1


@pytest.mark.parametrize("loop", LOOPS)
def test_take_returns_what_came_and_an_abort_ends_the_stream(
    loop: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    async def main() -> None:
        with anyio.fail_after(30):
            server, client, listener = await pair(contexts)
            assert isinstance(server, TlsStream)
            assert server.take() == b""
            arrived = anyio.Event()
            server.set_listener(arrived.set)
            await client.send(b"one")
            await arrived.wait()
            data = server.take()
            while len(data) < 3:  # a record may come in pieces
                arrived = anyio.Event()
                server.set_listener(arrived.set)
                await arrived.wait()
                data += server.take()
            assert data == b"one" and server.take() == b"" and server.idle
            server.set_listener(None)
            server.abort()
            assert server.ended and not server.idle
            with pytest.raises(anyio.EndOfStream):
                await client.receive()
            await client.aclose()
            await listener.aclose()

    run(loop, main)
