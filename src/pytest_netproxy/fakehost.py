"""`FakeHost`: an HTTP(S) origin on 127.0.0.1 for one test (SPEC §14.1).

The origin is served by h11 on the event loop of the test's proxy (no thread of its own), with
a certificate for its public name issued by the session CA (the shared leaf key: one signature
per name per worker, cached). Every request is recorded; routes are matched first, then the
handler, else 404. A handler runs on the proxy's event loop, so it must be quick.

Not here: routing the public name to this origin (``handle.fake_host``) and the policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSStream

__all__ = ["FakeHost", "FakeRequest", "Handler"]

_MAX_BODY: Final = 16 * 1024 * 1024
_HANDSHAKE_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class FakeRequest:
    """One request a `FakeHost` received."""

    method: str
    path: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return jsonlib.loads(self.body)


Handler = Callable[[FakeRequest], tuple[int, Mapping[str, str], bytes]]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    path: str
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(slots=True, eq=False)
class _Server:
    listener: anyio.abc.Listener[anyio.abc.SocketStream]
    task: asyncio.Task[None] | None = None


class FakeHost:
    """An origin reachable through the proxy as ``name:port`` (see `url`).

    Attributes:
        name: the public host name (canonical, lower case).
        port: the public port (443 with TLS, else 80, unless given).
        tls: whether the origin speaks HTTPS.
        address: ``(ip, port)`` the origin actually listens on (127.0.0.1, ephemeral).
        requests: every request received, in order.
    """

    def __init__(
        self, name: str, *, port: int, tls: bool, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.name = name
        self.port = port
        self.tls = tls
        self._ssl_context = ssl_context
        self._routes: list[_Route] = []
        self._handler: Handler | None = None
        self._lock = threading.Lock()
        self._requests: list[FakeRequest] = []
        self._server: _Server | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    def __repr__(self) -> str:
        return (
            f"<FakeHost {self.url} at {self.address[0]}:{self.address[1]} "
            f"routes={len(self._routes)} requests={len(self._requests)}>"
        )

    @property
    def url(self) -> str:
        """``https://name`` (or ``http://name``), with ``:port`` when not the default."""
        scheme = "https" if self.tls else "http"
        default = 443 if self.tls else 80
        suffix = "" if self.port == default else f":{self.port}"
        return f"{scheme}://{self.name}{suffix}"

    @property
    def requests(self) -> list[FakeRequest]:
        with self._lock:
            return list(self._requests)

    def route(
        self,
        method: str,
        path: str,
        *,
        status: int = 200,
        json: Any = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> FakeHost:
        """Answer ``method path`` (an exact path-and-query match wins; a route without a query
        matches any query) with `status`, `headers` and `json` (serialised, JSON content
        type) or `body`. Later routes for the same method and path win. Returns self."""
        hdrs = dict(headers or {})
        if json is not None:
            body = jsonlib.dumps(json).encode()
            if not any(k.lower() == "content-type" for k in hdrs):
                hdrs["content-type"] = "application/json"
        with self._lock:
            self._routes.insert(
                0, _Route(method.upper(), path, status, tuple(hdrs.items()), bytes(body))
            )
        return self

    def handler(self, fn: Handler) -> Handler:
        """Answer requests no route matches with ``fn(request) -> (status, headers, body)``.

        Usable as a decorator. The function runs on the proxy's event loop: keep it quick."""
        self._handler = fn
        return fn

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    # --- serving (runs on the proxy's event loop) ---------------------------------------

    async def start(self) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        sockaddr = listener.extra(anyio.abc.SocketAttribute.local_address)
        self.address = (str(sockaddr[0]), int(sockaddr[1]))
        server = _Server(listener)
        server.task = asyncio.get_running_loop().create_task(self._serve(server))
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None or server.task is None:
            return
        server.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server.task

    async def _serve(self, server: _Server) -> None:
        try:
            async with anyio.create_task_group() as tg:
                await server.listener.serve(self._connection, task_group=tg)
        finally:
            with anyio.CancelScope(shield=True):
                await server.listener.aclose()

    async def _connection(self, raw: anyio.abc.SocketStream) -> None:
        stream: anyio.abc.ByteStream = raw
        try:
            if self._ssl_context is not None:
                with anyio.fail_after(_HANDSHAKE_TIMEOUT):
                    stream = await TLSStream.wrap(
                        raw,
                        server_side=True,
                        ssl_context=self._ssl_context,
                        standard_compatible=False,
                    )
            await self._exchange(stream)
        except (
            OSError,
            ssl.SSLError,
            TimeoutError,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            anyio.EndOfStream,
            h11.ProtocolError,
        ):
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await raw.aclose()

    async def _exchange(self, stream: anyio.abc.ByteStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive()
                    except anyio.EndOfStream:
                        data = b""
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > _MAX_BODY:
                        raise h11.RemoteProtocolError("body too large", error_status_hint=413)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
            assert request is not None
            recorded = _record(request, bytes(body))
            with self._lock:
                self._requests.append(recorded)
            status, headers, payload = self._answer(recorded)
            out = [(k, v) for k, v in headers if k.lower() != "content-length"]
            out.append(("content-length", str(len(payload))))
            data = conn.send(h11.Response(status_code=status, headers=out)) or b""
            if recorded.method != "HEAD":
                data += conn.send(h11.Data(data=payload)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send(data)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    def _answer(self, request: FakeRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        bare = request.path.partition("?")[0]
        with self._lock:
            routes = list(self._routes)
            handler = self._handler
        candidates = [r for r in routes if r.method == request.method]
        matches = [r for r in candidates if r.path == request.path] + [
            r for r in candidates if "?" not in r.path and r.path == bare
        ]
        if matches:
            return matches[0].status, list(matches[0].headers), matches[0].body
        if handler is not None:
            try:
                status, headers, body = handler(request)
            except Exception as exc:  # the test's handler failed: say so to the client
                message = f"FakeHost {self.name} handler raised {type(exc).__name__}: {exc}"
                return 500, [("content-type", "text/plain")], message.encode()
            return status, list(dict(headers).items()), bytes(body)
        message = f"FakeHost {self.name}: no route for {request.method} {request.path}\n"
        return 404, [("content-type", "text/plain")], message.encode()


def _record(request: h11.Request, body: bytes) -> FakeRequest:
    raw = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in request.headers.raw_items()
    ]
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return FakeRequest(
        method=request.method.decode("ascii"),
        path=request.target.decode("latin-1"),
        headers=headers,
        raw_headers=raw,
        body=body,
    )
