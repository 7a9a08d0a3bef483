"""Admin API (SPEC §11): a small JSON-over-HTTP control plane on its own listener.

Every request needs ``Authorization: Bearer <token>``. Routes::

    GET  /health                 {"status": "ok", "enabled", "mode", "events", "blocked_total"}
    GET  /config                 effective configuration, secrets redacted
    GET  /patterns               {"allowed": […], "denied": […]}
    GET  /blocked[?drain=1]      {"blocked": […], "total": N}
    GET  /events[?since=N]       {"events": […], "next": M}
    POST /mode     {"mode": "full"|"limited"}
    POST /domains  {"allow": […], "deny": […]}
    POST /reload                 re-read the config files; a bad file keeps the old config (400)

Errors are JSON too: ``{"error": "…", "status": N}`` — 400 bad request, 401 missing or wrong
token, 404 unknown route, 405 wrong method, 413 body over 64 KiB.

`AdminApi.dispatch` is the whole API without I/O (a request in, a `Reply` out); `serve` is the
h11 connection loop the proxy's admin listener runs. The token is never logged.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import h11

from .config.addresses import bind_addr
from .config.model import ProxyConfig
from .errors import NetproxyError
from .patterns import compile_pattern

if TYPE_CHECKING:
    from .handlers.context import ProxyContext
    from .proxy import NetworkProxy

__all__ = [
    "MAX_BODY",
    "AdminApi",
    "Reply",
    "admin_bind_addr",
    "new_admin_token",
    "write_admin_token",
]

MAX_BODY: Final = 64 * 1024
DEFAULT_ADMIN_PORT: Final = 8080
READ_SIZE: Final = 65_536
log = logging.getLogger("netproxy.proxy")


@dataclass(frozen=True, slots=True)
class Reply:
    """One admin response: status, JSON body, extra headers."""

    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = field(default=())

    def encode(self) -> tuple[list[tuple[bytes, bytes]], bytes]:
        payload = json.dumps(self.body, separators=(",", ":"), default=str).encode() + b"\n"
        headers = [
            (b"content-type", b"application/json"),
            (b"cache-control", b"no-store"),
            (b"content-length", str(len(payload)).encode()),
            *((k.encode(), v.encode()) for k, v in self.headers),
        ]
        return headers, payload


def error(status: int, message: str, *headers: tuple[str, str]) -> Reply:
    return Reply(status, {"error": message, "status": status}, headers)


class _BadRequest(Exception):
    pass


# --- token and address --------------------------------------------------------------------


def new_admin_token() -> str:
    return secrets.token_urlsafe(32)


def write_admin_token(home: Path, token: str) -> Path:
    """Write `token` to ``<home>/proxy/admin-token`` with mode 0600 (atomically)."""
    directory = home / "proxy"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / "admin-token"
    tmp = directory / f".admin-token.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def admin_bind_addr(config: ProxyConfig) -> tuple[str, int]:
    """The admin listener address: loopback unless `dangerously_allow_non_loopback_admin`.

    A non-loopback address is clamped to 127.0.0.1 (same port) with a warning; it is also
    clamped whenever unix sockets are enabled, whatever the flag says.
    """
    assert config.admin_url is not None
    return bind_addr(
        config.admin_url,
        DEFAULT_ADMIN_PORT,
        what="admin API",
        allow_non_loopback=config.dangerously_allow_non_loopback_admin,
        flag="dangerously_allow_non_loopback_admin",
        unix=config.unix_sockets_enabled,
    )


# --- the API ------------------------------------------------------------------------------


class AdminApi:
    """The admin API of one proxy.

    Args:
        proxy: the proxy to inspect and steer.
        token: the bearer token every request must carry.
    """

    def __init__(self, proxy: NetworkProxy, token: str) -> None:
        self.proxy = proxy
        self._token = token.encode()
        self._routes: dict[str, dict[str, Callable[[dict[str, list[str]], bytes], Reply]]] = {
            "/health": {"GET": self._health},
            "/config": {"GET": self._config},
            "/patterns": {"GET": self._patterns},
            "/blocked": {"GET": self._blocked},
            "/events": {"GET": self._events},
            "/mode": {"POST": self._mode},
            "/domains": {"POST": self._domains},
            "/reload": {"POST": self._reload},
        }

    def __repr__(self) -> str:
        return f"<AdminApi routes={sorted(self._routes)}>"

    def authorized(self, authorization: list[bytes]) -> bool:
        if len(authorization) != 1:
            return False
        scheme, _, given = authorization[0].strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token)

    def route(self, method: str, target: str) -> Reply | None:
        """The error for a request that cannot reach a handler (404/405), else None."""
        path = urlsplit(target).path
        methods = self._routes.get(path)
        if methods is None:
            return error(404, f"no admin route {path}")
        if method not in methods:
            allowed = ", ".join(methods)
            return error(405, f"{path} accepts {allowed}, not {method}", ("allow", allowed))
        return None

    def dispatch(self, method: str, target: str, authorization: list[bytes], body: bytes) -> Reply:
        """Answer one request (authorization first, then route, then the handler)."""
        if not self.authorized(authorization):
            return error(
                401,
                "missing or wrong admin token (send Authorization: Bearer <token>)",
                ("www-authenticate", 'Bearer realm="netproxy-admin"'),
            )
        if len(body) > MAX_BODY:
            return error(413, f"request body over {MAX_BODY} bytes")
        refused = self.route(method, target)
        if refused is not None:
            return refused
        parts = urlsplit(target)
        handler = self._routes[parts.path][method]
        try:
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
            return handler(query, body)
        except _BadRequest as exc:
            return error(400, str(exc))
        except NetproxyError as exc:
            return error(400, str(exc))
        except Exception:
            log.exception("admin API: %s %s failed", method, parts.path)
            return error(500, "internal error (see the proxy's log)")

    # --- handlers -----------------------------------------------------------------------

    def _health(self, query: dict[str, list[str]], body: bytes) -> Reply:
        config, audit = self.proxy.config, self.proxy.audit
        return Reply(
            200,
            {
                "status": "ok",
                "enabled": config.enabled,
                "mode": str(config.mode),
                "events": audit.emitted,
                "blocked_total": audit.blocked_total,
            },
        )

    def _config(self, query: dict[str, list[str]], body: bytes) -> Reply:
        return Reply(200, self.proxy.config.redacted())

    def _patterns(self, query: dict[str, list[str]], body: bytes) -> Reply:
        return Reply(200, _patterns(self.proxy.config))

    def _blocked(self, query: dict[str, list[str]], body: bytes) -> Reply:
        drain = _flag(query, "drain")
        records = self.proxy.audit.blocked(drain=drain)
        return Reply(
            200,
            {"blocked": [r.to_dict() for r in records], "total": self.proxy.audit.blocked_total},
        )

    def _events(self, query: dict[str, list[str]], body: bytes) -> Reply:
        since = 0
        if "since" in query:
            text = query["since"][-1].strip()
            if not text.isdigit():
                raise _BadRequest(f"since must be a non-negative integer, not {text!r}")
            since = int(text)
        events, emitted = self.proxy.audit.events_since(since)
        return Reply(200, {"events": [e.to_dict() for e in events], "next": emitted})

    def _mode(self, query: dict[str, list[str]], body: bytes) -> Reply:
        data = _json_object(body, ("mode",))
        if "mode" not in data:
            raise _BadRequest('body must be {"mode": "full"} or {"mode": "limited"}')
        mode = data["mode"]
        if mode not in ("full", "limited"):
            raise _BadRequest(f'mode must be "full" or "limited", not {mode!r}')
        self.proxy.set_mode(mode)
        log.info("admin API: network mode set to %s", mode)
        return Reply(200, {"mode": str(self.proxy.config.mode)})

    def _domains(self, query: dict[str, list[str]], body: bytes) -> Reply:
        data = _json_object(body, ("allow", "deny"))
        lists: dict[str, list[str]] = {}
        for key in ("allow", "deny"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise _BadRequest(f"{key} must be a list of pattern strings")
            for pattern in value:
                compile_pattern(pattern)  # ConfigError (400) naming the entry
            lists[key] = value
        previous = self.proxy.config
        try:
            if lists["allow"]:
                self.proxy.allow(*lists["allow"])
            if lists["deny"]:
                self.proxy.deny(*lists["deny"])
        except NetproxyError:
            self.proxy.state.replace(previous)  # all or nothing
            raise
        log.info("admin API: domains updated (allow %s, deny %s)", lists["allow"], lists["deny"])
        return Reply(200, _patterns(self.proxy.config))

    def _reload(self, query: dict[str, list[str]], body: bytes) -> Reply:
        try:
            config = self.proxy.reload_from_sources()
        except NetproxyError as exc:
            log.error("admin API: reload failed, keeping the previous configuration: %s", exc)
            return error(400, f"reload failed, previous configuration kept: {exc}")
        log.info("admin API: reloaded configuration from %s", ", ".join(config.sources) or "flags")
        return Reply(200, {"reloaded": True, "sources": list(config.sources), **_patterns(config)})

    # --- connection loop ----------------------------------------------------------------

    async def serve(
        self, ctx: ProxyContext, stream: anyio.abc.ByteStream, client_addr: str | None
    ) -> None:
        """Serve admin requests on one connection (keep-alive) until it closes."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=ctx.limits.max_header_bytes)
        first = True
        while True:
            wait = ctx.limits.handshake_timeout if first else ctx.limits.idle_timeout
            try:
                with anyio.fail_after(wait), ctx.idle_wait() as idle:
                    ctx.idle_waits.add(idle)
                    try:
                        event = await _next_event(conn, stream)
                    finally:
                        ctx.idle_waits.discard(idle)
                if idle.cancelled_caught:
                    return
                if not isinstance(event, h11.Request):
                    return
                reply, close = await self._exchange(ctx, conn, stream, event)
            except TimeoutError:
                return
            except h11.RemoteProtocolError as exc:
                await _send(conn, stream, error(exc.error_status_hint, str(exc)), close=True)
                return
            await _send(conn, stream, reply, close=close)
            if close or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
            first = False

    async def _exchange(
        self,
        ctx: ProxyContext,
        conn: h11.Connection,
        stream: anyio.abc.ByteStream,
        request: h11.Request,
    ) -> tuple[Reply, bool]:
        """Read the body (bounded) and dispatch; returns (reply, close the connection)."""
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        authorization = [v for n, v in request.headers if n == b"authorization"]
        if not self.authorized(authorization):
            return self.dispatch(method, target, authorization, b""), True
        length = [v for n, v in request.headers if n == b"content-length"]
        if length and int(length[0]) > MAX_BODY:
            return error(413, f"request body over {MAX_BODY} bytes"), True
        body = bytearray()
        with anyio.fail_after(ctx.limits.handshake_timeout):
            while True:
                event = await _next_event(conn, stream)
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        return error(413, f"request body over {MAX_BODY} bytes"), True
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return error(400, "incomplete request"), True
        return self.dispatch(method, target, authorization, bytes(body)), False


# --- helpers ------------------------------------------------------------------------------


def _patterns(config: ProxyConfig) -> dict[str, list[str]]:
    return {"allowed": list(config.allowed_patterns), "denied": list(config.denied_patterns)}


def _flag(query: dict[str, list[str]], name: str) -> bool:
    if name not in query:
        return False
    value = query[name][-1].strip().lower()
    if value in ("1", "true", "yes", ""):
        return True
    if value in ("0", "false", "no"):
        return False
    raise _BadRequest(f"{name} must be 1 or 0, not {value!r}")


def _json_object(body: bytes, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8")) if body.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _BadRequest(f"body must be a JSON object with {' / '.join(keys)}")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise _BadRequest(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(keys)}")
    return data


async def _next_event(conn: h11.Connection, stream: anyio.abc.ByteStream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is h11.PAUSED:
            return h11.ConnectionClosed()
        if event is not h11.NEED_DATA:
            assert isinstance(event, h11.Event)
            return event
        try:
            data = await stream.receive(READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            data = b""
        conn.receive_data(data)


async def _send(
    conn: h11.Connection, stream: anyio.abc.ByteStream, reply: Reply, *, close: bool
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    headers, payload = reply.encode()
    if close:
        headers.append((b"connection", b"close"))
    try:
        data = b"".join(
            conn.send(event) or b""
            for event in (
                h11.Response(status_code=reply.status, headers=headers),
                h11.Data(data=payload),
                h11.EndOfMessage(),
            )
        )
        await stream.send(data)
    except (h11.LocalProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return
