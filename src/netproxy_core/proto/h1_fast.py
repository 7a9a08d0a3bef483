"""Strict HTTP/1.x head parsing for the plain-forwarding fast path (sans-IO).

The fast path (`handlers/fast_forward.py`) serves the common exchange — a whole request head
in hand, no request body or a small one, a response framed by `Content-Length` — without h11.
Everything here accepts a strict *subset* of what h11 accepts: the start lines and header
fields are matched with h11's own ABNF (RFC 9110/9112), lines must end in CRLF, and framing
must be unambiguous. Anything else returns None, and the caller hands the connection to the
h11 path, which then answers exactly as it always has (400, 414, 431, 501, 502, …).

Header names come out lower-cased and values stripped of surrounding whitespace, as h11
presents them, so the bytes sent on are the same whichever path forwarded them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from .http_head import (
    HOP_BY_HOP,
    UNIX_SOCKET_HEADER,
    Headers,
    connection_tokens,
    head_size,
    oversize_request,
)

__all__ = [
    "MAX_BODY",
    "RequestHead",
    "ResponseHead",
    "SimpleRequest",
    "SimpleResponse",
    "body_length",
    "find_head_end",
    "keep_alive",
    "parse_request_head",
    "parse_response_head",
    "serialize_request",
    "serialize_response_head",
    "simple_request",
    "simple_response",
]

# h11/_abnf.py, verbatim in meaning (RFC 9110 §5.5, RFC 9112 §3, §4).
_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
# A header line is `token ":" OWS field-value OWS`, and field-value is runs of field-vchar
# ([^\x00\s]) separated by runs of SP/HT: together, any run of field-vchar, SP and HT, which
# is every byte but NUL, CR, LF, VT and FF (a reason phrase is such a run too). One class is
# the same language as h11's nested form, matched in one loop per line instead of per word.
_FIELD_LINE_TEXT: Final = rb"[^\x00\r\n\x0b\x0c]*+"
_HEADER_BLOCK: Final = re.compile(rb"(?:" + _TOKEN + rb":" + _FIELD_LINE_TEXT + rb"\r\n)*+")
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/(1\.[01])")
_STATUS_LINE: Final = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: (" + _FIELD_LINE_TEXT + rb"))?")
_DIGITS: Final = re.compile(rb"[0-9]{1,18}")
_CRLF: Final = b"\r\n"

MAX_BODY: Final = 1 << 16  # a request body larger than this is streamed by h11
# Requests carrying these need the h11 path's machinery (SPEC §5.5, §5.6, §5.10, §6).
_SLOW_HEADERS: Final = frozenset(
    {b"transfer-encoding", b"upgrade", b"expect", b"proxy-authorization", UNIX_SOCKET_HEADER}
)
# Request fields `simple_request` must look at: those, and framing, Host and Connection.
_REQUEST_WATCH: Final = _SLOW_HEADERS | {b"host", b"content-length", b"connection"}


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    size: int  # bytes of the head on the wire, blank line included


@dataclass(slots=True)
class ResponseHead:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    size: int


def find_head_end(data: bytes | bytearray) -> int | None:
    """Offset just past the head's blank line; None while incomplete or not CRLF-framed.

    A bare-LF blank line before the CRLF one (which h11 would take as the end) is not ours.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    if data.find(b"\n\n", 0, end) >= 0 or data.find(b"\n\r\n", 0, end) >= 0:
        return None
    return end + 4


def _fields(head: bytes, start: int) -> list[tuple[bytes, bytes]] | None:
    """Header fields from offset `start` of a head ending in CRLFCRLF; None unless all are valid."""
    end = len(head) - 2
    if _HEADER_BLOCK.fullmatch(head, start, end) is None:
        return None  # obs-fold, bare CR/LF, NUL, bad name: h11 decides
    fields = []
    for line in head[start : end - 2].split(_CRLF) if end > start else ():
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(b" \t")))
    return fields


def parse_request_head(head: bytes) -> RequestHead | None:
    """`head` is everything up to and including the blank line (see `find_head_end`)."""
    line_end = head.find(_CRLF)
    m = _REQUEST_LINE.fullmatch(head, 0, line_end)
    if m is None:
        return None
    headers = _fields(head, line_end + 2)
    if headers is None:
        return None
    method, target, version = m.groups()
    return RequestHead(method, target, version, headers, len(head))


def parse_response_head(head: bytes) -> ResponseHead | None:
    line_end = head.find(_CRLF)
    m = _STATUS_LINE.fullmatch(head, 0, line_end)
    if m is None:
        return None
    headers = _fields(head, line_end + 2)
    if headers is None:
        return None
    return ResponseHead(m.group(1), int(m.group(2)), m.group(3) or b"", headers, len(head))


@dataclass(slots=True)
class SimpleRequest:
    """A request a fast path may serve: its head, whole body and raw bytes."""

    head: RequestHead
    host: bytes | None  # the Host field, if any
    raw: bytes  # head and body as the client sent them
    body: bytes
    keep_alive: bool  # the client connection stays open after the exchange


def simple_request(
    data: bytes | bytearray, end: int, limit: int, *, connect: bool = False
) -> SimpleRequest | None:
    """The request whose head is `data[:end]`, if it is simple; None leaves it to h11.

    Simple: a head within `limit` bytes (as h11's path measures it too) that parses strictly,
    CONNECT only when `connect` is asked for (and then with no body), none of the fields that
    need h11's machinery, one Host at most (one for HTTP/1.1), and a body of at most
    `MAX_BODY` bytes framed by one Content-Length and already in `data`.
    """
    if end > limit:
        return None
    wire = bytes(data[:end])
    head = parse_request_head(wire)
    if head is None or (head.method == b"CONNECT") != connect:
        return None
    host: bytes | None = None
    length = -1
    listed: set[bytes] = set()  # what the Connection fields name
    for name, value in head.headers:
        if name in _REQUEST_WATCH:
            if name == b"host":
                if host is not None:
                    return None
                host = value
            elif name == b"content-length":
                found = _content_length(length, value)
                if found is None:
                    return None
                length = found
            elif name == b"connection":
                listed |= connection_tokens(value)
            else:
                return None  # a field only h11's path handles
    if host is None and head.version == b"1.1":
        return None
    length = max(length, 0)
    if length > (0 if connect else MAX_BODY) or end + length > len(data):
        return None
    if end + len(head.headers) > limit and (
        oversize_request(head.method, head.target, head.headers, limit) is not None
    ):
        return None  # normalised fields can be a byte longer each than on the wire
    raw = bytes(data[: end + length]) if length else wire
    keeps = head.version == b"1.1" and b"close" not in listed
    return SimpleRequest(head, host, raw, raw[end:], keeps)


@dataclass(slots=True)
class SimpleResponse:
    """A response a fast path relays itself: the head to send on and its body's length."""

    head: bytes  # as h11 writes it: hop-by-hop fields gone, `Connection: close` if asked
    length: int  # body bytes that follow the origin's head
    keep_alive: bool  # the origin keeps the connection open after this response


# Response fields `simple_response` must look at: framing, and the hop-by-hop ones it drops.
_RESPONSE_WATCH: Final = HOP_BY_HOP | {b"content-length", b"host"}


def simple_response(
    data: bytes | bytearray, end: int, *, bodiless: bool, limit: int, close: bool
) -> SimpleResponse | None:
    """The response whose head is `data[:end]`, if a fast path may relay it; None leaves it
    to h11. `close`: the client connection ends after it.

    Simple: a final (2xx-5xx) head that parses strictly, within `limit` as h11's path measures
    it, framed by one Content-Length, or bodiless (204, 304, or a HEAD answer that states its
    length; h11 frames a HEAD answer without one as chunked). A `Connection` field listing
    Content-Length, or a Host field, is h11's too. The head sent on is the one h11 writes for
    the origin's fields without the hop-by-hop ones, in one pass over the lines (the relay's
    hot path: the same rules as `parse_response_head`, `body_length`, `keep_alive`,
    `strip_hop_by_hop` and `serialize_response_head` together).
    """
    head = bytes(data[:end])
    line_end = head.find(_CRLF)
    status_line = _STATUS_LINE.fullmatch(head, 0, line_end)
    if status_line is None or _HEADER_BLOCK.fullmatch(head, line_end + 2, end - 2) is None:
        return None
    version, code, reason = status_line.groups()
    status = int(code)
    if status < 200:
        return None
    length = -1
    listed: set[bytes] = set()  # what the Connection fields name
    kept: list[tuple[bytes, bytes]] = []
    lines = head[line_end + 2 : end - 4].split(_CRLF) if end - line_end > 4 else []
    for line in lines:
        name, _, value = line.partition(b":")
        name, value = name.lower(), value.strip(b" \t")
        if name in _RESPONSE_WATCH:
            if name == b"content-length":
                found = _content_length(length, value)
                if found is None:
                    return None
                length = found
            elif name == b"connection":
                listed |= connection_tokens(value)
                continue
            elif name == b"transfer-encoding" or name == b"host":
                return None
            else:
                continue  # hop-by-hop
        kept.append((name, value))
    if status in (204, 304) or (bodiless and length >= 0):
        length = 0
    elif length < 0:
        return None  # close-delimited, or a HEAD answer h11 would frame
    if listed:
        if b"content-length" in listed:
            return None
        kept = [(n, v) for n, v in kept if n not in listed]
    reason = reason or b""
    if (
        end + len(lines) > limit
        and head_size(len(reason) + 13, _fields(head, line_end + 2) or []) > limit
    ):
        return None  # h11's path answers 502 for an oversized head
    parts = [b"HTTP/1.1 ", code, b" ", reason, _CRLF]
    for name, value in kept:
        parts += (name, b": ", value, _CRLF)
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(_CRLF)
    keeps = version == b"1.1" and b"close" not in listed
    return SimpleResponse(b"".join(parts), length, keeps)


def body_length(headers: Headers) -> int | None:
    """The body length one plain `Content-Length` frames; -1 when there is none.

    None for anything the fast path leaves to h11: Transfer-Encoding, repeated or
    malformed Content-Length.
    """
    length = -1
    for name, value in headers:
        if name == b"content-length":
            found = _content_length(length, value)
            if found is None:
                return None
            length = found
        elif name == b"transfer-encoding":
            return None
    return length


def _content_length(length: int, value: bytes) -> int | None:
    """The length after one more Content-Length field (`length` -1: the first); None if it
    repeats or is not plain digits (h11 judges those)."""
    if length >= 0 or _DIGITS.fullmatch(value) is None:
        return None
    return int(value)


def keep_alive(version: bytes, headers: Headers) -> bool:
    """h11's rule: HTTP/1.1 without `Connection: close` (the fast paths apply it inline)."""
    return version == b"1.1" and not any(
        b"close" in connection_tokens(value) for name, value in headers if name == b"connection"
    )


def _write_fields(parts: list[bytes], headers: Headers) -> None:
    """Fields as h11 writes them: `host` first (RFC 9112 §3.2), then the rest in order."""
    for name, value in headers:
        if name == b"host":
            parts += (name, b": ", value, _CRLF)
    for name, value in headers:
        if name != b"host":
            parts += (name, b": ", value, _CRLF)


def serialize_request(method: bytes, target: bytes, headers: Headers) -> bytes:
    """Request head bytes exactly as h11 writes them."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    _write_fields(parts, headers)
    parts.append(_CRLF)
    return b"".join(parts)


def serialize_response_head(status: int, reason: bytes, headers: Headers, *, close: bool) -> bytes:
    """Response head bytes exactly as h11 writes them for a `Content-Length` response.

    With `close`, h11 adds `Connection: close` (the client asked to close, or is HTTP/1.0).
    """
    parts = [b"HTTP/1.1 ", str(status).encode(), b" ", reason, _CRLF]
    _write_fields(parts, headers)
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(_CRLF)
    return b"".join(parts)
