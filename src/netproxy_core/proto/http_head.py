"""Request-target forms, Host checks, hop-by-hop stripping, proxy auth (SPEC §5). Pure.

Works on h11 events: `classify()` turns a request head into `Forward`, `Connect` or `Reject`;
the I/O driver in `handlers/http.py` acts on the result.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, NamedTuple

from ..errors import InvalidHost
from ..hosts import canonicalize_host, format_host_port, split_host_port
from ..policy.model import Reason

__all__ = [
    "DEFAULT_PORTS",
    "HOP_BY_HOP",
    "TE_AND_CL",
    "UNIX_SOCKET_HEADER",
    "Connect",
    "Forward",
    "Headers",
    "Reject",
    "check_proxy_auth",
    "classify",
    "connection_tokens",
    "has_content_length",
    "head_size",
    "header_value",
    "oversize_request",
    "protocol_error_text",
    "status_phrase",
    "strip_hop_by_hop",
    "target_authority",
]

Headers = Sequence[tuple[bytes, bytes]]

UNIX_SOCKET_HEADER: Final = b"x-unix-socket"  # SPEC §6: a request for a local unix socket
_AUTHORITY_END: Final = re.compile(r"[/?#]")
DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
    }
)


class Forward(NamedTuple):
    """Forward the request to `scheme://host:port` with `path` (origin-form, query kept).

    `host` is canonical; `authority` is the Host value to send upstream. A named tuple, not a
    frozen dataclass: one is built per request, and a frozen dataclass costs four times more.
    """

    scheme: str
    host: str
    port: int
    path: bytes
    authority: bytes
    absolute: bool

    @property
    def tls(self) -> bool:
        return self.scheme in ("https", "wss")


@dataclass(frozen=True, slots=True)
class Connect:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse with `status`; `reason` set when the refusal is a policy event to audit."""

    status: int
    detail: str
    reason: Reason | None = None
    host: str = ""
    port: int = 0


def header_value(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _authority(text: str, default_port: int | None) -> tuple[str, int]:
    """Canonical host and port of an authority; raises InvalidHost."""
    known = _AUTHORITIES.get((text, default_port))
    if known is not None:
        return known
    found = _parse_authority(text, default_port)
    if len(_AUTHORITIES) >= 4096:
        _AUTHORITIES.clear()
    _AUTHORITIES[(text, default_port)] = found
    return found


# Parsed authorities (a pure function of the text: the canonicaliser is the costly part).
_AUTHORITIES: dict[tuple[str, int | None], tuple[str, int]] = {}


def _parse_authority(text: str, default_port: int | None) -> tuple[str, int]:
    if "@" in text:
        raise InvalidHost(f"invalid host {text!r}: userinfo is not allowed", host=text)
    _, port = split_host_port(text)
    if port is None:
        if default_port is None:
            raise InvalidHost(f"invalid CONNECT target {text!r}: a port is required", host=text)
        port = default_port
    if port == 0:
        raise InvalidHost(f"invalid port 0 in {text!r}", host=text)
    # The whole authority, so the canonicaliser sees the brackets ("[name]" is invalid).
    return canonicalize_host(text), port


def classify(method: bytes, target: bytes, headers: Headers) -> Forward | Connect | Reject:
    """Decide the request form (SPEC §5.2, §5.3)."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        return Reject(400, "request target is not ASCII")
    if method == b"CONNECT":
        try:
            host, port = _authority(text, None)
        except InvalidHost as exc:
            return Reject(
                400, str(exc), Reason.INVALID_HOST, host=_raw_host(text), port=_raw_port(text, 443)
            )
        return Connect(host, port)
    host_header = header_value(headers, b"host")
    if text.startswith("/") or text == "*":
        if not host_header:
            return Reject(400, "request has no host")
        return _origin_form(text, host_header)
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        return Reject(400, f"unsupported request target {text[:100]!r}")
    found = _AUTHORITY_END.search(rest)
    end = found.start() if found else len(rest)
    authority_text, path = rest[:end], rest[end:].partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    try:
        host, port = _authority(authority_text, DEFAULT_PORTS[scheme])
    except InvalidHost as exc:
        return Reject(
            400,
            str(exc),
            Reason.INVALID_HOST,
            host=_raw_host(authority_text),
            port=DEFAULT_PORTS[scheme],
        )
    if host_header is not None:
        try:
            h_host, h_port = _authority(host_header.decode("latin-1"), DEFAULT_PORTS[scheme])
        except InvalidHost:
            h_host, h_port = "", 0
        if (h_host, h_port) != (host, port):
            return Reject(
                400,
                "Host header does not match request target",
                Reason.HOST_MISMATCH,
                host=host,
                port=port,
            )
    authority = host_header or authority_text.encode("ascii")
    return Forward(scheme, host, port, path.encode("ascii"), authority, True)  # absolute-form


def _origin_form(target: str, host_header: bytes) -> Forward | Reject:
    raw = host_header.decode("latin-1")
    try:
        host, port = _authority(raw, 80)
    except InvalidHost as exc:
        return Reject(400, str(exc), Reason.INVALID_HOST, host=_raw_host(raw), port=80)
    return Forward("http", host, port, target.encode("ascii"), host_header, False)


def _raw_host(text: str) -> str:
    return text[:255]


def _raw_port(text: str, default: int) -> int:
    _, _, port = text.rpartition(":")
    return int(port) if port.isdigit() and len(port) <= 5 and int(port) <= 65535 else default


def strip_hop_by_hop(
    headers: Iterable[tuple[bytes, bytes]], *, keep_upgrade: bool = False
) -> list[tuple[bytes, bytes]]:
    """Remove hop-by-hop headers and those the Connection header lists (SPEC §5.4).

    With `keep_upgrade`, ``Upgrade`` and ``Connection: upgrade`` survive for a WebSocket relay.
    """
    headers = list(headers)
    drop = HOP_BY_HOP
    for name, value in headers:
        if name == b"connection":
            drop = drop | connection_tokens(value)
    if keep_upgrade:
        drop = drop - {b"upgrade"}
    out = [(n, v) for n, v in headers if n not in drop]
    if keep_upgrade and any(n == b"upgrade" for n, _ in headers):
        out.append((b"connection", b"upgrade"))
    return out


def connection_tokens(value: bytes) -> set[bytes]:
    """The lower-cased options one `Connection` field lists (RFC 9110 §7.6.1)."""
    return {t.strip().lower() for t in value.split(b",")}


def check_proxy_auth(headers: Headers, token: str) -> bool:
    """`Proxy-Authorization: Basic` with `token` as the password (any user) — SPEC §5.10."""
    value = header_value(headers, b"proxy-authorization")
    if value is None:
        return False
    scheme, _, encoded = value.partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    _, sep, password = decoded.partition(":")
    return bool(sep) and hmac.compare_digest(password.encode(), token.encode())


def authority_for(host: str, port: int, scheme: str) -> bytes:
    """Host header value for a destination: the port only when not the scheme default."""
    if DEFAULT_PORTS.get(scheme) == port:
        return (f"[{host}]" if ":" in host else host).encode("ascii")
    return format_host_port(host, port).encode("ascii")


def head_size(line: int, headers: Headers) -> int:
    """Bytes of a message head: a start line of `line` bytes plus ``name: value\\r\\n`` each."""
    return line + 2 + sum(len(n) + len(v) + 4 for n, v in headers) + 2


def oversize_request(method: bytes, target: bytes, headers: Headers, limit: int) -> int | None:
    """414 / 431 when a parsed request head exceeds `limit` bytes (SPEC §5.9, §15), else None.

    h11 only bounds *incomplete* heads, so a head that arrives whole in one read is checked
    here after parsing.
    """
    line = len(method) + 1 + len(target) + len(b" HTTP/1.1")
    if line > limit:
        return 414
    if head_size(line, headers) > limit:
        return 431
    return None


TE_AND_CL = "request has both Transfer-Encoding and Content-Length"


def has_content_length(raw: bytes) -> bool:
    """The raw request head has a Content-Length field (TE + CL is 400, not 501: SPEC §5.1)."""
    head = raw.partition(b"\r\n\r\n")[0]
    return any(
        line.lstrip().lower().startswith(b"content-length") for line in head.split(b"\n")[1:]
    )


def target_authority(line: bytes) -> bytes | None:
    """The authority named by a CONNECT or absolute-form request line, else None."""
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) != 3:
        return None
    method, target, _ = parts
    if method == b"CONNECT":
        return target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower().decode("latin-1") not in DEFAULT_PORTS:
        return None
    for stop in (b"/", b"?", b"#"):
        rest = rest.partition(stop)[0]
    return rest


def status_phrase(status: int) -> bytes:
    """The standard reason phrase for `status` (empty when it has none)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def protocol_error_text(status: int, exc: Exception | None) -> str:
    """The text of a 4xx answer to a request head h11 could not take."""
    if status == 414:
        return "request line too long"
    if status == 431:
        return "request headers too large"
    return f"malformed request: {exc}"
