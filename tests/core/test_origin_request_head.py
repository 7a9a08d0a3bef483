"""`origin_request_head`, the fast path's one-pass rewrite, writes what the two-step way does.

The oracle is `origin_request` (SPEC §5.4: hop-by-hop and Connection-listed fields go, Host is
added when missing, absolute-form with credentials through an upstream proxy) followed by
`serialize_request` (h11's bytes).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netproxy_core.handlers.forward import origin_request, origin_request_head
from netproxy_core.net.upstream import UpstreamProxy
from netproxy_core.proto.h1_fast import serialize_request
from netproxy_core.proto.http_head import Forward

NAMES = [
    b"host", b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"user-agent", b"accept", b"x-trace", b"cookie",
]  # fmt: skip
CONNECTION_OPTIONS = [
    b"close",
    b"keep-alive",
    b"upgrade",
    b"x-trace",
    b"host",
    b"te",
    b"",
    b"Cookie",
]

fields = st.lists(
    st.tuples(
        st.sampled_from(NAMES),
        st.one_of(
            st.sampled_from([b"", b"a", b"example.test", b"curl/8.5.0"]),
            st.lists(st.sampled_from(CONNECTION_OPTIONS), min_size=1, max_size=3).map(
                lambda options: b", ".join(options)
            ),
        ),
    ),
    max_size=8,
)
targets = st.builds(
    lambda scheme, host, port, path: Forward(scheme, host, port, path, b"ignored", True),
    st.sampled_from(["http", "https"]),
    st.sampled_from(["example.test", "127.0.0.1", "::1"]),
    st.sampled_from([80, 443, 8080]),
    st.sampled_from([b"/", b"/a?b=c", b"/small"]),
)
proxies = st.one_of(
    st.none(),
    st.builds(
        UpstreamProxy, st.just("proxy.test"), st.just(3128), st.sampled_from([None, b"Basic eDp5"])
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([b"GET", b"POST", b"HEAD"]), fields, targets, proxies)
def test_one_pass_equals_the_two_steps(
    method: bytes, headers: list[tuple[bytes, bytes]], target: Forward, via: UpstreamProxy | None
) -> None:
    path, out = origin_request(headers, target, via, upgrade=False)
    assert origin_request_head(method, headers, target, via) == serialize_request(method, path, out)


@pytest.mark.parametrize(
    ("headers", "expected_fields"),
    [
        # Host leads, hop-by-hop fields go.
        ([(b"accept", b"*/*"), (b"host", b"a.test"), (b"proxy-connection", b"keep-alive")],
         b"host: a.test\r\naccept: */*\r\n"),
        # No Host: the target's authority, port only when not the default.
        ([(b"accept", b"*/*")], b"host: a.test:8080\r\naccept: */*\r\n"),
        # A Connection option naming an end-to-end field drops that field too.
        ([(b"host", b"a.test"), (b"connection", b"x-trace"), (b"x-trace", b"1")],
         b"host: a.test\r\n"),
    ],
)  # fmt: skip
def test_examples(headers: list[tuple[bytes, bytes]], expected_fields: bytes) -> None:
    target = Forward("http", "a.test", 8080, b"/p", b"a.test:8080", True)
    head = origin_request_head(b"GET", headers, target, None)
    assert head == b"GET /p HTTP/1.1\r\n" + expected_fields + b"\r\n"


def test_through_an_upstream_proxy_the_target_is_absolute_with_its_credentials() -> None:
    target = Forward("http", "a.test", 80, b"/p", b"a.test", True)
    via = UpstreamProxy("proxy.test", 3128, b"Basic eDp5")
    head = origin_request_head(b"GET", [(b"host", b"a.test")], target, via)
    expected = (
        b"GET http://a.test/p HTTP/1.1\r\nhost: a.test\r\nproxy-authorization: Basic eDp5\r\n\r\n"
    )
    assert head == expected
