"""The fast path's strict head parser (`proto.h1_fast`) is a subset of h11 (SPEC §5.1).

Tables pin each function; hypothesis checks, for heads from a small grammar plus mutations
(obs-fold, bare LF/CR, NUL, space before colon, empty names, duplicate Content-Length,
Transfer-Encoding, odd versions, leading CRLF, non-ASCII bytes), that whenever the fast path
would serve a head, h11 accepts it too and reads the very same start line and header list,
and that the bytes the fast path writes are the bytes h11 writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netproxy_core.proto.h1_fast import (
    RequestHead,
    ResponseHead,
    body_length,
    find_head_end,
    keep_alive,
    parse_request_head,
    parse_response_head,
    serialize_request,
    serialize_response_head,
    simple_request,
    simple_response,
)
from netproxy_core.proto.http_head import connection_tokens, strip_hop_by_hop

Headers = list[tuple[bytes, bytes]]
BIG = 1 << 20  # h11's incomplete-event limit: never the reason for a rejection here
# Request fields only h11's path handles (SPEC §5.5, §5.6, §5.10, §6).
SLOW_REQUEST_FIELDS = {
    b"transfer-encoding",
    b"upgrade",
    b"expect",
    b"proxy-authorization",
    b"x-unix-socket",
}
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- find_head_end ----------------------------------------------------------------------------

HEAD_ENDS = [
    pytest.param(b"", None, id="empty"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n", None, id="incomplete"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 27, id="whole"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY", 27, id="body-after"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n", 18, id="first-of-two"),
    pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", None, id="bare-lf-only"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\n\nX: b\r\n\r\n", None, id="bare-lf-blank-first"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\n\r\nX: b\r\n\r\n", None, id="lf-crlf-blank-first"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", 28, id="stray-cr-in-line"),
]


@pytest.mark.parametrize(("data", "end"), HEAD_ENDS)
def test_find_head_end(data: bytes, end: int | None) -> None:
    assert find_head_end(data) == end
    assert find_head_end(bytearray(data)) == end


# --- parse_request_head -----------------------------------------------------------------------

REQUESTS = [
    pytest.param(
        b"GET http://a.test/x?y=1 HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n",
        (b"GET", b"http://a.test/x?y=1", b"1.1", [(b"host", b"a.test"), (b"accept", b"*/*")]),
        id="absolute-form",
    ),
    pytest.param(b"GET / HTTP/1.0\r\n\r\n", (b"GET", b"/", b"1.0", []), id="http10-no-headers"),
    pytest.param(
        b"POST /p HTTP/1.1\r\nHOST: h\r\nContent-Length: 3\r\n\r\n",
        (b"POST", b"/p", b"1.1", [(b"host", b"h"), (b"content-length", b"3")]),
        id="names-lowercased",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nX-A: \t v  w \t\r\nX-B:\r\nX-C:   \r\n\r\n",
        (b"GET", b"/", b"1.1", [(b"x-a", b"v  w"), (b"x-b", b""), (b"x-c", b"")]),
        id="ows-stripped-empty-values",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nX: caf\xc3\xa9\x7f\x01\r\n\r\n",
        (b"GET", b"/", b"1.1", [(b"x", b"caf\xc3\xa9\x7f\x01")]),
        id="obs-text-and-ctl-in-value",
    ),
    pytest.param(
        b"M-!#$%&'*+.^_`|~9 * HTTP/1.1\r\nHost: h\r\n\r\n",
        (b"M-!#$%&'*+.^_`|~9", b"*", b"1.1", [(b"host", b"h")]),
        id="token-method",
    ),
    pytest.param(b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", None, id="obs-fold"),
    pytest.param(b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n", None, id="bare-lf-in-block"),
    pytest.param(b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", None, id="bare-cr-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", None, id="nul-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nX : a\r\n\r\n", None, id="space-before-colon"),
    pytest.param(b"GET / HTTP/1.1\r\n: a\r\n\r\n", None, id="empty-name"),
    pytest.param(b"GET / HTTP/1.1\r\nX\xe9: a\r\n\r\n", None, id="non-ascii-name"),
    pytest.param(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", None, id="no-colon"),
    pytest.param(b"GET / HTTP/1.2\r\n\r\n", None, id="http12"),
    pytest.param(b"GET / HTTP/2.0\r\n\r\n", None, id="http20"),
    pytest.param(b"GET / HTTP/1.10\r\n\r\n", None, id="http110"),
    pytest.param(b"GET / http/1.1\r\n\r\n", None, id="lowercase-version"),
    pytest.param(b"GET /a b HTTP/1.1\r\n\r\n", None, id="space-in-target"),
    pytest.param(b"GET  / HTTP/1.1\r\n\r\n", None, id="double-space"),
    pytest.param(b"GET /\xe9 HTTP/1.1\r\n\r\n", None, id="non-ascii-target"),
    pytest.param(b"G(T / HTTP/1.1\r\n\r\n", None, id="bad-method"),
    pytest.param(b"\r\nGET / HTTP/1.1\r\n\r\n", None, id="leading-crlf"),
    pytest.param(b"GET / HTTP/1.1 \r\n\r\n", None, id="trailing-space-line"),
    pytest.param(b"GET / HTTP/1.1\r\n X: a\r\n\r\n", None, id="leading-space-header"),
]


@pytest.mark.parametrize(("head", "expected"), REQUESTS)
def test_parse_request_head(
    head: bytes, expected: tuple[bytes, bytes, bytes, Headers] | None
) -> None:
    parsed = parse_request_head(head)
    if expected is None:
        assert parsed is None
        return
    assert parsed is not None
    assert (parsed.method, parsed.target, parsed.version, parsed.headers) == expected
    assert parsed.size == len(head)


# --- parse_response_head ----------------------------------------------------------------------

RESPONSES = [
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
        (b"1.1", 200, b"OK", [(b"content-length", b"2")]),
        id="plain",
    ),
    pytest.param(b"HTTP/1.0 404 Not Found\r\n\r\n", (b"1.0", 404, b"Not Found", []), id="http10"),
    pytest.param(b"HTTP/1.1 204\r\n\r\n", (b"1.1", 204, b"", []), id="no-reason"),
    pytest.param(b"HTTP/1.1 204 \r\n\r\n", (b"1.1", 204, b"", []), id="empty-reason"),
    pytest.param(
        b"HTTP/1.1 200 \tOK \xe9 \r\n\r\n", (b"1.1", 200, b"\tOK \xe9 ", []), id="reason-kept-raw"
    ),
    pytest.param(b"HTTP/1.1 103 Early Hints\r\n\r\n", (b"1.1", 103, b"Early Hints", []), id="1xx"),
    pytest.param(b"HTTP/1.1 20 OK\r\n\r\n", None, id="two-digit-status"),
    pytest.param(b"HTTP/1.1 2000 OK\r\n\r\n", None, id="four-digit-status"),
    pytest.param(b"HTTP/1.1  200 OK\r\n\r\n", None, id="double-space"),
    pytest.param(b"HTTP/2 200 OK\r\n\r\n", None, id="http2"),
    pytest.param(b"HTTP/1.1 200 O\x00K\r\n\r\n", None, id="nul-in-reason"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX: a\r\n\tb\r\n\r\n", None, id="obs-fold"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n", None, id="space-before-colon"),
    pytest.param(b"HTTP/1.1 200 OK\nX: a\r\n\r\n", None, id="bare-lf-status-line"),
]


@pytest.mark.parametrize(("head", "expected"), RESPONSES)
def test_parse_response_head(
    head: bytes, expected: tuple[bytes, int, bytes, Headers] | None
) -> None:
    parsed = parse_response_head(head)
    if expected is None:
        assert parsed is None
        return
    assert parsed is not None
    assert (parsed.version, parsed.status, parsed.reason, parsed.headers) == expected
    assert parsed.size == len(head)


# --- body_length, keep_alive --------------------------------------------------------------------

LENGTHS = [
    pytest.param([], -1, id="none"),
    pytest.param([(b"content-length", b"0")], 0, id="zero"),
    pytest.param([(b"content-length", b"0042")], 42, id="leading-zeros"),
    pytest.param([(b"content-length", b"9" * 18)], 10**18 - 1, id="eighteen-digits"),
    pytest.param([(b"content-length", b"1" * 19)], None, id="nineteen-digits"),
    pytest.param([(b"content-length", b"5"), (b"content-length", b"5")], None, id="duplicate"),
    pytest.param([(b"content-length", b"5, 5")], None, id="list"),
    pytest.param([(b"content-length", b"-1")], None, id="negative"),
    pytest.param([(b"content-length", b"+1")], None, id="plus"),
    pytest.param([(b"content-length", b"")], None, id="empty"),
    pytest.param([(b"content-length", b"0x10")], None, id="hex"),
    pytest.param([(b"transfer-encoding", b"chunked")], None, id="chunked"),
    pytest.param([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], None, id="cl-te"),
    pytest.param([(b"x-content-length", b"3")], -1, id="other-name"),
]


@pytest.mark.parametrize(("headers", "expected"), LENGTHS)
def test_body_length(headers: Headers, expected: int | None) -> None:
    assert body_length(headers) == expected


KEEP_ALIVE = [
    pytest.param(b"1.1", [], True, id="11-default"),
    pytest.param(b"1.0", [], False, id="10-default"),
    pytest.param(b"1.0", [(b"connection", b"keep-alive")], False, id="10-keep-alive"),
    pytest.param(b"1.1", [(b"connection", b"close")], False, id="11-close"),
    pytest.param(b"1.1", [(b"connection", b" Keep-Alive , CLOSE ")], False, id="11-close-list"),
    pytest.param(b"1.1", [(b"connection", b"x"), (b"connection", b"close")], False, id="second"),
    pytest.param(b"1.1", [(b"connection", b"closed, xclose")], True, id="not-close-token"),
    pytest.param(b"1.1", [(b"x-connection", b"close")], True, id="other-name"),
]


@pytest.mark.parametrize(("version", "headers", "expected"), KEEP_ALIVE)
def test_keep_alive(version: bytes, headers: Headers, expected: bool) -> None:
    assert keep_alive(version, headers) is expected
    assert _h11_keeps_alive(version, headers) is expected  # the table is h11's rule


# --- serialisation, against h11's own writer ------------------------------------------------------

SERIALIZE_REQUESTS = [
    pytest.param(b"GET", b"/", [(b"host", b"a.test")], id="get"),
    pytest.param(
        b"POST",
        b"/p?q=1",
        [(b"host", b"a.test:8080"), (b"content-length", b"3"), (b"x-e", b"")],
        id="post",
    ),
    pytest.param(b"GET", b"http://a.test/", [(b"host", b"a.test"), (b"x", b"a \xe9")], id="abs"),
    pytest.param(b"GET", b"/", [(b"accept", b"*/*"), (b"host", b"a.test")], id="host-not-first"),
]


@pytest.mark.parametrize(("method", "target", "headers"), SERIALIZE_REQUESTS)
def test_serialize_request_is_h11s(method: bytes, target: bytes, headers: Headers) -> None:
    client = h11.Connection(h11.CLIENT)
    expected = client.send(h11.Request(method=method, target=target, headers=headers))
    assert serialize_request(method, target, headers) == expected


SERIALIZE_RESPONSES = [
    pytest.param(b"1.1", [], 200, b"OK", [(b"content-length", b"2")], id="keep-alive"),
    pytest.param(b"1.1", [], 204, b"", [], id="no-reason-no-length"),
    pytest.param(b"1.1", [], 304, b"Not Modified", [(b"content-length", b"50")], id="304"),
    pytest.param(b"1.0", [], 200, b"OK", [(b"content-length", b"2")], id="http10-client"),
    pytest.param(
        b"1.1",
        [(b"connection", b"close")],
        200,
        b"OK",
        [(b"content-length", b"0"), (b"x", b"y")],
        id="client-asked-close",
    ),
]


@pytest.mark.parametrize(
    ("version", "req_headers", "status", "reason", "headers"), SERIALIZE_RESPONSES
)
def test_serialize_response_head_is_h11s(
    version: bytes, req_headers: Headers, status: int, reason: bytes, headers: Headers
) -> None:
    """The head bytes h11's server writes for this response, to a client that sent `version`."""
    expected, close = _h11_response_bytes(version, req_headers, b"GET", status, reason, headers)
    assert close is not keep_alive(version, req_headers)
    assert serialize_response_head(status, reason, headers, close=close) == expected


# --- h11 as the oracle --------------------------------------------------------------------------


def _h11_keeps_alive(version: bytes, headers: Headers) -> bool:
    """Whether h11's server keeps the connection after a whole response to this request."""
    server = h11.Connection(h11.SERVER)
    host = [] if any(n == b"host" for n, _ in headers) else [(b"host", b"h")]
    server.receive_data(
        serialize_request(b"GET", b"/", [*host, *headers]).replace(b"HTTP/1.1", b"HTTP/" + version)
    )
    assert isinstance(server.next_event(), h11.Request)
    server.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
    server.send(h11.EndOfMessage())
    return server.our_state is h11.DONE


def _h11_response_bytes(
    version: bytes,
    req_headers: Headers,
    method: bytes,
    status: int,
    reason: bytes,
    headers: Headers,
) -> tuple[bytes, bool]:
    """(head bytes h11 writes, whether it closes after) for a response to such a request."""
    server = h11.Connection(h11.SERVER)
    request = b"".join(
        [method, b" / HTTP/", version, b"\r\nhost: h\r\n"]
        + [n + b": " + v + b"\r\n" for n, v in req_headers]
        + [b"\r\n"]
    )
    server.receive_data(request)
    assert isinstance(server.next_event(), h11.Request)
    assert isinstance(server.next_event(), h11.EndOfMessage)
    out = server.send(h11.Response(status_code=status, headers=headers, reason=reason))
    assert out is not None
    return out, not server._cstate.keep_alive


@dataclass
class H11Result:
    event: h11.Request | h11.Response | h11.InformationalResponse | None
    error: str | None
    after: bytes | None  # what h11 left after this message (when its body was in hand)


def _h11_request(data: bytes) -> H11Result:
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=BIG)
    server.receive_data(data)
    try:
        event = server.next_event()
        if not isinstance(event, h11.Request):
            return H11Result(None, f"no request: {event!r}", None)
        rest = server.next_event()
        while isinstance(rest, h11.Data):
            rest = server.next_event()
    except h11.RemoteProtocolError as exc:
        return H11Result(None, str(exc), None)
    after = server.trailing_data[0] if isinstance(rest, h11.EndOfMessage) else None
    return H11Result(event, None, after)


def _h11_response(data: bytes, method: bytes = b"GET") -> H11Result:
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=BIG)
    client.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"h")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    try:
        event = client.next_event()
        if not isinstance(event, (h11.Response, h11.InformationalResponse)):
            return H11Result(None, f"no response: {event!r}", None)
        if isinstance(event, h11.InformationalResponse):
            return H11Result(event, None, None)
        rest = client.next_event()
        while isinstance(rest, h11.Data):
            rest = client.next_event()
    except h11.RemoteProtocolError as exc:
        return H11Result(None, str(exc), None)
    after = client.trailing_data[0] if isinstance(rest, h11.EndOfMessage) else None
    return H11Result(event, None, after)


def _fast_serves_request(head: RequestHead) -> bool:
    """The head-level gate of `fast_forward._FastSession._plan` (policy aside)."""
    hosts = sum(name == b"host" for name, _ in head.headers)
    if hosts > 1 or (hosts == 0 and head.version == b"1.1"):
        return False
    return body_length(head.headers) is not None


def _fast_serves_response(head: ResponseHead) -> bool:
    """The head-level gate of `fast_links.OriginLink._on_head`."""
    return head.status >= 200 and body_length(head.headers) is not None


# --- generated heads --------------------------------------------------------------------------

TOKEN_CHARS = "-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=8).map(str.encode)
vchar_text = st.binary(min_size=1, max_size=6).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E) or b"x"
)
field_chars = st.binary(min_size=1, max_size=6).map(
    lambda b: bytes(c for c in b if c not in b"\x00 \t\n\r\x0b\x0c") or b"v"
)
ows = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t "])
values = st.one_of(
    st.just(b""),
    st.lists(field_chars, min_size=1, max_size=3).flatmap(
        lambda parts: st.lists(
            st.sampled_from([b" ", b"\t", b"  "]), min_size=len(parts) - 1, max_size=len(parts) - 1
        ).map(lambda seps: parts[0] + b"".join(s + p for s, p in zip(seps, parts[1:], strict=True)))
    ),
)
names = st.one_of(
    st.sampled_from(
        [b"Host", b"host", b"Content-Length", b"Connection", b"Accept", b"X-A", b"Keep-Alive"]
    ),
    tokens,
)
header_lines = st.one_of(
    st.tuples(names, ows, values, ows).map(lambda t: t[0] + b":" + t[1] + t[2] + t[3]),
    st.sampled_from(
        [
            b"Host: api.example.test",
            b"Content-Length: 0",
            b"Content-Length: 3",
            b"Connection: close",
            b"Connection: keep-alive",
            b"Keep-Alive: timeout=5",
            b"Connection: X-Hop",
            b"X-Hop: 1",
            b"TE: trailers",
            b"Connection: Content-Length",
        ]
    ),
)
methods = st.one_of(st.sampled_from([b"GET", b"HEAD", b"POST", b"OPTIONS", b"PUT"]), tokens)
targets = st.one_of(
    st.sampled_from([b"/", b"/a?b=c", b"*", b"http://api.example.test/x", b"http://h:81/p"]),
    vchar_text,
)
versions = st.sampled_from([b"1.1"] * 6 + [b"1.0"] * 3 + [b"0.9", b"1.2", b"2.0"])
statuses = st.one_of(
    st.sampled_from([b"200", b"204", b"304", b"404", b"103", b"100"]),
    st.integers(0, 999).map(lambda n: b"%03d" % n),
)
reasons = st.one_of(
    st.sampled_from([b"", b" OK", b" Not Found", b" ", b" \tx\xe9 "]),
    field_chars.map(lambda v: b" " + v),
)

HOSTS = [b"api.example.test", b"h:81", b"", b"[::1]:8080"]

MUTATIONS = [
    "obs-fold",
    "bare-lf",
    "bare-cr",
    "nul",
    "space-before-colon",
    "empty-name",
    "dup-cl-same",
    "dup-cl-differ",
    "transfer-encoding",
    "odd-version",
    "leading-crlf",
    "non-ascii",
    "control",
    "drop-byte",
    "cl-list",
]


@st.composite
def mutated(draw: st.DrawFn, start_line: bytes, lines: list[bytes]) -> bytes:
    """`start_line` and header `lines`, CRLF-framed, then up to three mutations."""
    lines = list(lines)
    ops = draw(st.one_of(st.just([]), st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)))
    prefix = b""
    for op in ops:
        at = draw(st.integers(0, len(lines)))
        if op == "obs-fold" and lines:
            lines.insert(max(1, at), draw(st.sampled_from([b" ", b"\t"])) + b"folded")
        elif op == "space-before-colon":
            lines.insert(at, b"X-Sp" + draw(st.sampled_from([b" ", b"\t"])) + b": v")
        elif op == "empty-name":
            lines.insert(at, b": v")
        elif op == "dup-cl-same":
            lines[at:at] = [b"Content-Length: 3", b"Content-Length: 3"]
        elif op == "dup-cl-differ":
            lines[at:at] = [b"Content-Length: 3", b"Content-Length: 4"]
        elif op == "cl-list":
            lines.insert(at, b"Content-Length: 3, 3")
        elif op == "transfer-encoding":
            lines.insert(at, b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"gzip"])))
        elif op == "odd-version":
            odd = draw(st.sampled_from([b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1"]))
            start_line = start_line.replace(b"HTTP/1.1", odd).replace(b"HTTP/1.0", odd)
        elif op == "leading-crlf":
            prefix = b"\r\n" + prefix
    data = prefix + b"\r\n".join([start_line, *lines]) + b"\r\n\r\n"
    for op in ops:  # byte-level mutations anywhere in the head
        at = draw(st.integers(0, len(data) - 1))
        if op == "bare-lf" and b"\r\n" in data:
            spots = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\r\n"]
            i = draw(st.sampled_from(spots))
            data = data[:i] + data[i + 1 :]
        elif op == "bare-cr":
            data = data[:at] + b"\r" + data[at:]
        elif op == "nul":
            data = data[:at] + b"\x00" + data[at:]
        elif op == "non-ascii":
            data = (
                data[:at] + draw(st.sampled_from([b"\xe9", b"\xff", b"\x80", b"\x85"])) + data[at:]
            )
        elif op == "control":  # VT and FF end a field value for h11; other controls do not
            byte = draw(st.sampled_from([b"\x0b", b"\x0c", b"\x01", b"\x1f", b"\x7f", b"\t"]))
            data = data[:at] + byte + data[at:]
        elif op == "drop-byte":
            data = data[:at] + data[at + 1 :]
    return data


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    line = b"%s %s HTTP/%s" % (draw(methods), draw(targets), draw(versions))
    lines = draw(st.lists(header_lines, max_size=6))
    if draw(st.booleans()):  # most real requests name their host
        lines.insert(draw(st.integers(0, len(lines))), b"Host: " + draw(st.sampled_from(HOSTS)))
    return draw(mutated(line, lines))


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    line = b"HTTP/%s %s%s" % (draw(versions), draw(statuses), draw(reasons))
    lines = draw(st.lists(header_lines, max_size=6))
    return draw(mutated(line, lines))


BODY = b"0123456789abcdef" * 4
TAIL = b"NEXT / HTTP/1.1\r\n"


@PROPERTY
@given(request_heads())
def test_request_heads_the_fast_path_serves_are_h11s(data: bytes) -> None:
    end = find_head_end(data)
    if end is None:
        return
    head = parse_request_head(data[:end])
    if head is None:
        return
    length = max(body_length(head.headers) or 0, 0)
    body = BODY[:length] if length <= len(BODY) else None
    h11_result = _h11_request(data[:end] + (body or b"") + TAIL)
    if not _fast_serves_request(head):
        return  # the fast path hands this one to h11 (missing Host, framing h11 judges)
    assert h11_result.error is None, (data, h11_result.error)
    event = h11_result.event
    assert isinstance(event, h11.Request)
    assert (head.method, head.target, head.version) == (
        event.method,
        event.target,
        event.http_version,
    )
    assert head.headers == list(event.headers)
    assert keep_alive(head.version, head.headers) is _h11_keeps_alive(head.version, head.headers)
    if body is not None:  # h11 ends the head, and the body, where the fast path does
        assert h11_result.after == TAIL
    if any(name == b"host" for name, _ in head.headers):
        client = h11.Connection(h11.CLIENT)
        wire = client.send(
            h11.Request(method=head.method, target=head.target, headers=head.headers)
        )
        assert serialize_request(head.method, head.target, head.headers) == wire


@PROPERTY
@given(request_heads())
def test_simple_request_takes_what_h11_reads(data: bytes) -> None:
    """What `simple_request` serves, h11 reads the same: head, body, Host and keep-alive."""
    end = find_head_end(data)
    if end is None:
        return
    served = simple_request(data + BODY + TAIL, end, BIG)
    head = parse_request_head(data[:end])
    should = (
        head is not None
        and head.method != b"CONNECT"
        and _fast_serves_request(head)
        and not any(name in SLOW_REQUEST_FIELDS for name, _ in head.headers)
    )
    assert (served is not None) == should, data
    if served is None:
        return
    result = _h11_request(served.raw + TAIL)
    event = result.event
    assert isinstance(event, h11.Request) and result.after == TAIL, (data, result.error)
    assert (served.head.method, served.head.target, served.head.headers) == (
        event.method,
        event.target,
        list(event.headers),
    )
    assert served.raw == data[:end] + served.body
    assert served.host == next((v for n, v in event.headers if n == b"host"), None)
    assert served.keep_alive is _h11_keeps_alive(event.http_version, list(event.headers))


@PROPERTY
@given(response_heads(), st.sampled_from([b"GET", b"HEAD"]))
def test_response_heads_the_fast_path_serves_are_h11s(data: bytes, method: bytes) -> None:
    end = find_head_end(data)
    if end is None:
        return
    head = parse_response_head(data[:end])
    if head is None:
        return
    framed = body_length(head.headers)
    bodiless = method == b"HEAD" or head.status in (204, 304) or (100 <= head.status < 200)
    length = 0 if bodiless else max(framed or 0, 0)
    body = BODY[:length] if length <= len(BODY) else None
    h11_result = _h11_response(data[:end] + (body or b"") + TAIL, method)
    if not _fast_serves_response(head):
        return  # 1xx and framing the fast path leaves to h11
    assert h11_result.error is None, (data, h11_result.error)
    event = h11_result.event
    assert isinstance(event, h11.Response)
    assert (head.version, head.status, head.reason) == (
        event.http_version,
        event.status_code,
        event.reason,
    )
    assert head.headers == list(event.headers)
    if body is not None and (bodiless or (framed is not None and framed >= 0)):
        assert h11_result.after == TAIL


@PROPERTY
@given(response_heads(), st.sampled_from([b"GET", b"HEAD"]))
def test_simple_response_sends_what_h11_writes(data: bytes, method: bytes) -> None:
    """What `simple_response` relays: h11's reading of the origin, h11's bytes to the client."""
    end = find_head_end(data)
    if end is None:
        return
    bodiless = method == b"HEAD"
    served = simple_response(data + BODY + TAIL, end, bodiless=bodiless, limit=BIG, close=False)
    head = parse_response_head(data[:end])
    framed = None if head is None else body_length(head.headers)
    should = (
        head is not None
        and head.status >= 200
        and framed is not None
        and (framed >= 0 or head.status in (204, 304))
        and all(name != b"host" for name, _ in head.headers)
        and not any(
            b"content-length" in connection_tokens(v) for n, v in head.headers if n == b"connection"
        )
    )
    assert (served is not None) == should, data
    if served is None or head is None:
        return
    length = 0 if bodiless or head.status in (204, 304) else served.length
    result = _h11_response(data[:end] + BODY[:length] + TAIL, method)
    event = result.event
    assert isinstance(event, h11.Response) and result.after == TAIL, (data, result.error)
    assert served.keep_alive is _h11_keeps_alive(event.http_version, list(event.headers))
    for version, req_headers in ((b"1.1", []), (b"1.0", []), (b"1.1", [(b"connection", b"close")])):
        stripped = strip_hop_by_hop(event.headers)
        expected, close = _h11_response_bytes(
            version, req_headers, method, event.status_code, event.reason, stripped
        )
        again = simple_response(data, end, bodiless=bodiless, limit=BIG, close=close)
        assert again is not None and again.head == expected, (version, req_headers)


@PROPERTY
@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_parse_to_something_h11_reads_otherwise(data: bytes) -> None:
    data = b"GET / HTTP/1.1\r\nHost: h\r\n" + data + b"\r\n\r\n"
    end = find_head_end(data)
    if end is None:
        return
    head = parse_request_head(data[:end])
    if head is None or not _fast_serves_request(head):
        return
    result = _h11_request(data[:end])
    assert isinstance(result.event, h11.Request), result.error
    assert head.headers == list(result.event.headers)


@pytest.mark.parametrize(
    ("head", "bodiless", "close", "expected"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\n"
            b"Connection: X-Hop\r\nX-Hop: 1\r\nX-Kept: 2\r\n\r\n",
            False,
            False,
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-kept: 2\r\n\r\n", 5, True),
            id="hop-by-hop-stripped",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
            False,
            True,
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nConnection: close\r\n\r\n", 2, False),
            id="origin-closes-client-closes",
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\n",
            True,
            False,
            (b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", 0, False),
            id="head-answer-from-http10",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            False,
            False,
            None,
            id="chunked-is-h11s",
        ),
        pytest.param(b"HTTP/1.1 103 Early Hints\r\n\r\n", False, False, None, id="1xx"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: content-length\r\n\r\n",
            False,
            False,
            None,
            id="framing-listed-as-hop-by-hop-is-h11s",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nHost: h\r\nContent-Length: 2\r\n\r\n",
            False,
            False,
            None,
            id="host-field-is-h11s",
        ),
        pytest.param(
            b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
            False,
            False,
            (b"HTTP/1.1 304 Not Modified\r\netag: x\r\n\r\n", 0, True),
            id="304-without-length",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\n\r\n", False, False, None, id="close-delimited-is-h11s"),
    ],
)
def test_simple_response(
    head: bytes, bodiless: bool, close: bool, expected: tuple[bytes, int, bool] | None
) -> None:
    """The head sent on, the body length and whether the origin keeps the connection."""
    end = find_head_end(head)
    assert end == len(head)
    response = simple_response(head + b"body...", end, bodiless=bodiless, limit=8192, close=close)
    got = None if response is None else (response.head, response.length, response.keep_alive)
    assert got == expected
