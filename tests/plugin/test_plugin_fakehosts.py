# ruff: noqa: E501  (expected output lines are kept whole to stay readable)
"""netproxy fixture + FakeHost with real children (curl, httpx, requests, urllib) (SPEC §14.1)."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]  # a module-level request: sub-directory conftests may not

CHILDREN = """
import sys
import pytest

CLIENTS = {
    "curl": lambda url: ["curl", "-sS", "--fail-with-body", url],
    "httpx": lambda url: [sys.executable, "-c",
        f"import httpx; r = httpx.get({url!r}); print(r.status_code, r.text)"],
    "requests": lambda url: [sys.executable, "-c",
        f"import requests; r = requests.get({url!r}); print(r.status_code, r.text)"],
    "urllib": lambda url: [sys.executable, "-c",
        f"import urllib.request as u; r = u.urlopen({url!r}); print(r.status, r.read().decode())"],
}

@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_child_reaches_fake_host(netproxy, client, tls):
    fake = netproxy.fake_host("api.github.com", tls=tls)
    fake.route("GET", "/repos/o/r", json={"name": "r"})
    netproxy.allow("api.github.com")
    result = netproxy.run(CLIENTS[client](fake.url + "/repos/o/r?page=2"))
    assert result.returncode == 0, result.stderr
    assert '{"name": "r"}' in result.stdout
    assert fake.requests[0].path == "/repos/o/r?page=2"
    netproxy.assert_allowed("api.github.com", port=443 if tls else 80)
    netproxy.assert_no_blocked()

@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_fake_host_is_not_allowed_implicitly(netproxy, tls):
    fake = netproxy.fake_host("api.github.com", tls=tls)
    fake.route("GET", "/", body=b"secret")
    result = netproxy.run(["curl", "-sS", fake.url + "/"])
    assert "secret" not in result.stdout
    assert fake.requests == []
    netproxy.assert_blocked("api.github.com", reason="not_allowed")
    netproxy.assert_not_contacted("api.github.com")
"""


def test_children_reach_fake_hosts_through_the_proxy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_children=CHILDREN)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=10)


def test_routes_handler_404_and_recorded_requests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import sys

            def test_fake_host_api(netproxy):
                fake = netproxy.fake_host("api.example.com", port=8443)
                assert fake.url == "https://api.example.com:8443"
                fake.route("POST", "/items", status=201, json={"id": 7},
                           headers={"X-Thing": "yes"})
                fake.route("GET", "/q?x=1", body=b"exact-query")
                fake.route("GET", "/q", body=b"any-query")
                @fake.handler
                def dynamic(request):
                    return 418, {"x-path": request.path}, request.body[::-1]
                netproxy.allow("api.example.com")
                script = (
                    "import httpx, json\\n"
                    "base = 'https://api.example.com:8443'\\n"
                    "with httpx.Client() as c:\\n"
                    "    r = c.post(base + '/items', content=b'abc', headers={'X-Mixed-Case': 'v'})\\n"
                    "    print(r.status_code, r.headers['x-thing'], r.json()['id'])\\n"
                    "    print(c.get(base + '/q?x=1').text, c.get(base + '/q?y=2').text)\\n"
                    "    r = c.put(base + '/dyn', content=b'xyz')\\n"
                    "    print(r.status_code, r.headers['x-path'], r.text)\\n"
                )
                out = netproxy.run([sys.executable, "-c", script])
                assert out.returncode == 0, out.stderr
                assert out.stdout.split("\\n")[:3] == [
                    "201 yes 7", "exact-query any-query", "418 /dyn zyx"]
                first = fake.requests[0]
                assert (first.method, first.path, first.body) == ("POST", "/items", b"abc")
                assert first.headers["x-mixed-case"] == "v"
                assert ("X-Mixed-Case", "v") in first.raw_headers
                assert [r.method for r in fake.requests] == ["POST", "GET", "GET", "PUT"]

            def test_unknown_path_is_404(netproxy):
                fake = netproxy.fake_host("plain.example.com", tls=False)
                netproxy.allow("plain.example.com")
                out = netproxy.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                    "http://plain.example.com/nope"])
                assert out.stdout == "404"
                assert fake.requests[0].path == "/nope"
            """
        )
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_runtime_policy_clear_and_make_netproxy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            def test_runtime(netproxy):
                fake = netproxy.fake_host("svc.example.com", tls=False)
                fake.route("GET", "/", body=b"ok")
                url = fake.url + "/"
                assert "ok" not in netproxy.run(["curl", "-sS", url]).stdout
                netproxy.allow("svc.example.com")
                assert netproxy.run(["curl", "-sS", url]).stdout == "ok"
                netproxy.deny("svc.example.com")
                assert netproxy.run(["curl", "-sS", url]).stdout != "ok"
                netproxy.assert_blocked("svc.example.com", reason="denied")
                assert len(netproxy.decisions) == 3 and len(netproxy.blocked) == 2
                netproxy.clear()
                assert netproxy.decisions == [] and netproxy.blocked == []

            def test_make_netproxy_keeps_its_own_decisions(netproxy, make_netproxy):
                other = make_netproxy(allow=["svc.example.com"], mode="limited")
                assert other.http_url != netproxy.http_url
                fake = other.fake_host("svc.example.com", tls=False)
                fake.route("GET", "/", body=b"ok")
                assert other.run(["curl", "-sS", fake.url + "/"]).stdout == "ok"
                post = other.run(["curl", "-sS", "-X", "POST", fake.url + "/"])
                assert post.stdout != "ok"
                other.assert_blocked("svc.example.com", reason="method_not_allowed", method="POST")
                assert netproxy.decisions == []
            """
        )
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
