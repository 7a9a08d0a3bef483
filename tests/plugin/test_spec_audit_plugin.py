"""SPEC §14.1 audit gaps in the `netproxy` fixture's public interface.

- `import pytest_netproxy` gives the types a test annotates with.
- `netproxy.run(args, **kw)` accepts every `subprocess.run` keyword (``check=True`` too).
- A ``mitm=False`` proxy still hands children the session CA, so TLS fake hosts verify.
- The fixture's methods keep the exact SPEC signatures.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from typing import Any

import pytest

import pytest_netproxy
from pytest_netproxy import FakeHost, FakeRequest, NetproxyHandle

FETCH = "import httpx, sys; r = httpx.get(sys.argv[1]); print(r.status_code, r.text)"


def test_package_exports_the_types_tests_annotate_with(netproxy: NetproxyHandle) -> None:
    assert set(pytest_netproxy.__all__) >= {"FakeHost", "FakeRequest", "NetproxyHandle"}
    assert isinstance(netproxy, NetproxyHandle)
    fake = netproxy.fake_host("types.example.com")
    assert isinstance(fake, FakeHost)
    assert FakeRequest.__dataclass_fields__.keys() >= {
        "method",
        "path",
        "headers",
        "raw_headers",
        "body",
    }


def test_run_takes_subprocess_run_keywords(netproxy: NetproxyHandle) -> None:
    code = "import os, sys; print(os.environ['HTTPS_PROXY']); sys.exit(int(sys.argv[1]))"
    done = netproxy.run([sys.executable, "-c", code, "0"], check=True)
    assert done.returncode == 0 and done.stdout.strip() == netproxy.http_url
    assert netproxy.run([sys.executable, "-c", code, "3"]).returncode == 3  # check off
    with pytest.raises(subprocess.CalledProcessError):
        netproxy.run([sys.executable, "-c", code, "3"], check=True)


@pytest.mark.netproxy(mitm=False, allow=["plain.example.com"])
def test_mitm_off_children_still_trust_fake_hosts(netproxy: NetproxyHandle) -> None:
    fake = netproxy.fake_host("plain.example.com")
    fake.route("GET", "/hello", body=b"hi")
    assert netproxy.ca_cert_path is not None and netproxy.ca_cert_path.is_file()
    assert netproxy.ca_bundle_path is not None and netproxy.ca_bundle_path.is_file()
    env = netproxy.env()
    assert env["SSL_CERT_FILE"] == str(netproxy.ca_bundle_path)
    assert env["NODE_EXTRA_CA_CERTS"] == str(netproxy.ca_cert_path)
    done = netproxy.run([sys.executable, "-c", FETCH, f"{fake.url}/hello"])
    assert done.stdout.split() == ["200", "hi"], done.stderr[-2000:]
    netproxy.assert_allowed("plain.example.com", method="CONNECT", port=443)
    assert [(r.method, r.path) for r in fake.requests] == [("GET", "/hello")]


def _params(fn: Any) -> list[tuple[str, Any, Any]]:
    return [
        (p.name, p.kind, p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.name != "self"
    ]


POS, KW, VAR_POS, VAR_KW = (
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    inspect.Parameter.KEYWORD_ONLY,
    inspect.Parameter.VAR_POSITIONAL,
    inspect.Parameter.VAR_KEYWORD,
)
EMPTY = inspect.Parameter.empty


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("env", [("base", POS, None), ("socks", KW, False)]),
        ("allow", [("patterns", VAR_POS, EMPTY)]),
        ("deny", [("patterns", VAR_POS, EMPTY)]),
        ("set_mode", [("mode", POS, EMPTY)]),
        ("credentials", [("real", VAR_KW, EMPTY)]),
        ("fake_host", [("name", POS, EMPTY), ("port", KW, None), ("tls", KW, True)]),
        ("clear", []),
        ("assert_allowed", [("host", POS, EMPTY), ("method", KW, None), ("port", KW, None)]),
        (
            "assert_blocked",
            [("host", POS, EMPTY), ("reason", KW, None), ("method", KW, None), ("port", KW, None)],
        ),
        ("assert_not_contacted", [("host", POS, EMPTY)]),
        ("assert_no_blocked", []),
        ("expect_blocked", [("host", POS, EMPTY), ("reason", KW, None)]),
    ],
)
def test_fixture_method_signatures(name: str, expected: list[tuple[str, Any, Any]]) -> None:
    assert _params(getattr(NetproxyHandle, name)) == expected


def test_run_popen_and_fake_host_signatures() -> None:
    for name in ("run", "popen"):
        params = _params(getattr(NetproxyHandle, name))
        assert params[0][:2] == ("args", POS) and params[-1][1] == VAR_KW
    assert _params(FakeHost.route) == [
        ("method", POS, EMPTY),
        ("path", POS, EMPTY),
        ("status", KW, 200),
        ("json", KW, None),
        ("body", KW, b""),
        ("headers", KW, None),
    ]
    assert _params(FakeHost.handler) == [("fn", POS, EMPTY)]
    for attr in ("http_url", "socks_url", "ca_cert_path", "ca_bundle_path", "decisions", "blocked"):
        assert isinstance(inspect.getattr_static(NetproxyHandle, attr), property), attr
    for attr in ("url", "requests"):
        assert isinstance(inspect.getattr_static(FakeHost, attr), property), attr
