"""`fast_forward.connect_head`: a remembered CONNECT parse is exactly a fresh one.

The fast path parses each distinct CONNECT head once (a tool opening tunnel after tunnel sends
the same bytes each time). The memo must be invisible: the same answer as `simple_request` +
`classify` for every head, valid or not, and bounded in entries and in head size.
"""

from __future__ import annotations

import pytest

from netproxy_core.handlers import fast_forward
from netproxy_core.handlers.fast_forward import (
    CONNECT_MEMO_ENTRIES,
    CONNECT_MEMO_HEAD,
    connect_head,
)
from netproxy_core.proto.h1_fast import find_head_end, simple_request
from netproxy_core.proto.http_head import Connect, classify

LIMIT = 65536
HEADS = [
    b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n",
    b"CONNECT API.Example.Test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n",
    b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n",
    b"CONNECT 127.0.0.1:22 HTTP/1.0\r\n\r\n",
    b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n"
    b"Connection: close\r\n\r\n",
    b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two Hosts
    b"CONNECT api.example.test HTTP/1.1\r\nHost: api.example.test\r\n\r\n",  # no port
    b"CONNECT api.example.test:443 HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",  # obs-fold
    b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: x\r\nX-Pad: "
    + b"p" * CONNECT_MEMO_HEAD
    + b"\r\n\r\n",
]


def _fresh(data: bytes, end: int, limit: int) -> object:
    simple = simple_request(data, end, limit, connect=True)
    if simple is None:
        return None
    target = classify(simple.head.method, simple.head.target, simple.head.headers)
    return (simple, target) if isinstance(target, Connect) else None


@pytest.fixture(autouse=True)
def empty_memo() -> None:
    fast_forward._connect_heads.clear()


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("limit", [LIMIT, 40])
def test_a_remembered_parse_is_the_fresh_parse(head: bytes, limit: int) -> None:
    end = find_head_end(head)
    assert end is not None
    for _ in range(2):  # the first call parses, the second (if kept) remembers
        buffer = bytearray(head + b"\x16\x03\x01 early tunnel bytes")
        assert connect_head(buffer, end, limit) == _fresh(head, end, limit)
        assert buffer.startswith(head)  # nothing consumed


def test_a_repeated_head_is_parsed_once() -> None:
    head = HEADS[0]
    end = find_head_end(head)
    assert end is not None
    first = connect_head(bytearray(head), end, LIMIT)
    assert first is not None
    assert connect_head(bytearray(head), end, LIMIT) is first
    assert connect_head(bytearray(head), end, LIMIT + 1) is not first  # the limit is in the key


def test_the_memo_is_bounded() -> None:
    for i in range(CONNECT_MEMO_ENTRIES * 2 + 7):
        head = b"CONNECT h%d.example.test:443 HTTP/1.1\r\nHost: h%d.example.test:443\r\n\r\n" % (
            i,
            i,
        )
        assert connect_head(bytearray(head), len(head), LIMIT) is not None
        assert len(fast_forward._connect_heads) <= CONNECT_MEMO_ENTRIES
    long_head = HEADS[-1]
    fast_forward._connect_heads.clear()
    assert connect_head(bytearray(long_head), len(long_head), LIMIT) is not None
    assert fast_forward._connect_heads == {}  # a long head is parsed every time
