"""MITM hook compilation, matching and actions (SPEC §7.5), as tables."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netproxy_core.config.model import (
    MitmAction,
    MitmConfig,
    MitmHook,
    MitmInjectHeader,
    ProxyConfig,
)
from netproxy_core.errors import ConfigError
from netproxy_core.mitm_hooks import Matcher, compile_hooks, has_encoded_traversal

H = list[tuple[bytes, bytes]]


def hook(name: str = "h", host: str = "api.github.com", **kw: object) -> MitmHook:
    fields: dict[str, object] = {
        "methods": ("POST",),
        "path_prefixes": ("/repos/openai/",),
        "action": ("strip_auth",),
    }
    fields.update(kw)
    return MitmHook(name=name, host=host, **fields)  # type: ignore[arg-type]


STRIP = ("strip_auth", MitmAction(strip_request_headers=("authorization",)))


def config(*hooks: MitmHook, actions: tuple[tuple[str, MitmAction], ...] = (STRIP,)) -> MitmConfig:
    return MitmConfig(hooks=hooks, actions=actions)


# --- matchers ---------------------------------------------------------------------------

MATCHERS = [
    pytest.param("/repos/", True, "/repos/openai/x", True, id="literal-path-is-prefix"),
    pytest.param("/repos/", True, "/rep", False, id="literal-path-longer-than-path"),
    pytest.param("pattern:/repos/*/issues", True, "/repos/x/issues", True, id="star-one-segment"),
    pytest.param("pattern:/repos/*/issues", True, "/repos/x/y/issues", False, id="star-no-slash"),
    pytest.param("pattern:/repos/**/issues", True, "/repos/x/y/issues", True, id="dstar-crosses"),
    pytest.param("pattern:/repos/**/issues", True, "/repos/issues", True, id="dstar-dir-empty"),
    pytest.param("pattern:/repos/**", True, "/repos/a/b/c", True, id="dstar-tail"),
    pytest.param("pattern:/a?c", True, "/abc", True, id="qmark"),
    pytest.param("pattern:/a?c", True, "/a/c", False, id="qmark-no-slash-in-path"),
    pytest.param("pattern:/v[0-9]/x", True, "/v2/x", True, id="class-range"),
    pytest.param("pattern:/v[!0-9]/x", True, "/v2/x", False, id="class-negated"),
    pytest.param(r"pattern:/a\*b", True, "/a*b", True, id="escaped-star-literal"),
    pytest.param(r"pattern:/a\*b", True, "/axb", False, id="escaped-star-not-glob"),
    pytest.param("pattern:/exact", True, "/exact/more", False, id="glob-is-whole-path"),
    pytest.param("literal:pattern:/x", True, "pattern:/x/y", True, id="literal-prefix-escape"),
    pytest.param("v1", False, "v1", True, id="literal-value-equal"),
    pytest.param("v1", False, "v10", False, id="literal-value-not-prefix"),
    pytest.param("pattern:a*z", False, "a/b/z", True, id="value-star-crosses-slash"),
    pytest.param("pattern:a?z", False, "a/z", True, id="value-qmark-crosses-slash"),
]


@pytest.mark.parametrize(("entry", "path", "value", "expected"), MATCHERS)
def test_matcher(entry: str, path: bool, value: str, expected: bool) -> None:
    assert Matcher.parse(entry, path=path).matches(value) is expected


def test_glob_is_linear_for_hostile_patterns() -> None:
    m = Matcher.parse("pattern:*a*a*a*a*a*a*b", path=False)
    assert not m.matches("a" * 5000)
    assert m.matches("a" * 5000 + "b")


@pytest.mark.parametrize(
    ("entry", "path"),
    [
        pytest.param("pattern:", True, id="empty-glob"),
        pytest.param("", True, id="empty-path-prefix"),
        pytest.param("literal:", True, id="empty-literal-path"),
        pytest.param("pattern:/a[bc", True, id="unclosed-class"),
        pytest.param("pattern:/a\\", True, id="lone-backslash"),
        pytest.param("pattern:[z-a]", False, id="reversed-range"),
    ],
)
def test_bad_matcher(entry: str, path: bool) -> None:
    with pytest.raises(ValueError):
        Matcher.parse(entry, path=path)


TRAVERSAL = [
    pytest.param("/openai/openai/%2e%2e/codex", True, id="encoded-dotdot"),
    pytest.param("/openai/%2E%2e/x", True, id="encoded-dotdot-mixed-case"),
    pytest.param("/openai/%2e/x", True, id="encoded-dot"),
    pytest.param("/openai/../x", True, id="raw-dotdot"),
    pytest.param("/openai/a%2fb", True, id="encoded-slash"),
    pytest.param("/openai/a%2Fb", True, id="encoded-slash-upper"),
    pytest.param("/openai/a%5cb", True, id="encoded-backslash"),
    pytest.param("/openai/a\\b", True, id="raw-backslash"),
    pytest.param("/openai/a%252e", True, id="encoded-percent"),
    pytest.param("/openai/a%zz", True, id="bad-percent"),
    pytest.param("/openai/a%2", True, id="truncated-percent"),
    pytest.param("/openai/a%", True, id="trailing-percent"),
    pytest.param("/openai/a%41b", False, id="harmless-escape"),
    pytest.param("/openai/.../x", False, id="three-dots-is-a-name"),
    pytest.param("/openai/a.b/x", False, id="dots-inside-name"),
]


@pytest.mark.parametrize(("path", "expected"), TRAVERSAL)
def test_encoded_traversal(path: str, expected: bool) -> None:
    assert has_encoded_traversal(path) is expected


# --- hook matching ----------------------------------------------------------------------

GITHUB = [
    hook(
        "writes",
        methods=("post", "PUT"),
        path_prefixes=("/repos/openai/", "pattern:/orgs/*/teams"),
        query=(("state", ("open", "pattern:draft-*")),),
        headers=(("x-kind", ("a", "pattern:b*")), ("x-present", ())),
    ),
    hook("fallback", methods=("GET",), path_prefixes=("/",)),
]
OK_HEADERS: H = [(b"x-kind", b"bee"), (b"x-present", b"")]

MATCHES = [
    pytest.param("POST", "/repos/openai/x?state=open", OK_HEADERS, "writes", id="all-constraints"),
    pytest.param("post", "/repos/openai/x?state=open", OK_HEADERS, "writes", id="method-upcased"),
    pytest.param("PUT", "/orgs/o/teams?state=draft-1", OK_HEADERS, "writes", id="glob-and-glob"),
    pytest.param("PUT", "/orgs/o/x/teams?state=open", OK_HEADERS, None, id="glob-no-cross"),
    pytest.param("DELETE", "/repos/openai/x?state=open", OK_HEADERS, None, id="method-not-listed"),
    pytest.param("POST", "/repos/other/x?state=open", OK_HEADERS, None, id="path-not-listed"),
    pytest.param("POST", "/repos/openai/x", OK_HEADERS, None, id="query-missing"),
    pytest.param("POST", "/repos/openai/x?state=closed", OK_HEADERS, None, id="query-wrong"),
    pytest.param(
        "POST",
        "/repos/openai/x?state=closed&state=open",
        OK_HEADERS,
        "writes",
        id="query-any-value",
    ),
    pytest.param(
        "POST", "/repos/openai/x?state=draft%2D2", OK_HEADERS, "writes", id="query-decoded"
    ),
    pytest.param(
        "POST", "/repos/openai/x?state=open", [(b"x-kind", b"bee")], None, id="header-absent"
    ),
    pytest.param(
        "POST",
        "/repos/openai/x?state=open",
        [(b"x-kind", b"zed"), (b"x-present", b"1")],
        None,
        id="header-value-wrong",
    ),
    pytest.param(
        "POST",
        "/repos/openai/x?state=open",
        [(b"x-kind", b"\xffb"), (b"x-kind", b"a"), (b"x-present", b"1")],
        "writes",
        id="header-non-utf8-skipped",
    ),
    pytest.param(
        "POST", "/repos/openai/%2e%2e/x?state=open", OK_HEADERS, None, id="traversal-never-matches"
    ),
    pytest.param(
        "POST",
        "https://api.github.com/repos/openai/x?state=open",
        OK_HEADERS,
        "writes",
        id="absolute-form",
    ),
    pytest.param("GET", "/anything", [], "fallback", id="second-hook"),
    pytest.param("GET", "/a/%2e%2e/b", [], None, id="traversal-even-for-catch-all"),
]


@pytest.mark.parametrize(("method", "target", "headers", "expected"), MATCHES)
def test_hook_matching(method: str, target: str, headers: H, expected: str | None) -> None:
    hooks = compile_hooks(config(*GITHUB))
    found = hooks.match("api.github.com", method, target, headers)
    assert (found.name if found else None) == expected


def test_first_matching_hook_wins_in_config_order() -> None:
    actions = (STRIP, ("strip_key", MitmAction(strip_request_headers=("x-api-key",))))
    first = hook("first", path_prefixes=("/",))
    second = hook("second", path_prefixes=("/repos/",), action=("strip_key",))
    hooks = compile_hooks(config(first, second, actions=actions))
    found = hooks.match("api.github.com", "POST", "/repos/x", [])
    assert found is not None and found.name == "first"


def test_hooks_are_grouped_by_canonical_host() -> None:
    hooks = compile_hooks(config(hook(host="API.GitHub.com."), hook("other", host="x.test")))
    assert hooks.hooked("api.github.com")
    assert hooks.hooked("x.test")
    assert not hooks.hooked("github.com")
    assert hooks.match("github.com", "POST", "/repos/openai/", []) is None


# --- actions ----------------------------------------------------------------------------


def test_strip_then_inject_replaces_and_concatenates_actions(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("  file-secret\n")
    actions = (
        STRIP,
        (
            "inject",
            MitmAction(
                strip_request_headers=("cookie",),
                inject_request_headers=(
                    MitmInjectHeader(name="Authorization", secret_env_var="TOK", prefix="Bearer "),
                    MitmInjectHeader(name="x-file", secret_file=str(secret_file)),
                ),
            ),
        ),
    )
    hooks = compile_hooks(
        config(hook(action=("strip_auth", "inject")), actions=actions),
        environ={"TOK": "env-secret"},
    )
    matched = hooks.match("api.github.com", "POST", "/repos/openai/x", [])
    assert matched is not None
    out = matched.apply(
        [
            (b"authorization", b"Bearer client"),
            (b"cookie", b"c=1"),
            (b"x-file", b"old"),
            (b"accept", b"*/*"),
        ]
    )
    assert out == [
        (b"accept", b"*/*"),
        (b"authorization", b"Bearer env-secret"),
        (b"x-file", b"file-secret"),
    ]
    text = repr(hooks)
    assert "env-secret" not in text and "file-secret" not in text and "***" in text
    with pytest.raises(TypeError):
        pickle.dumps(matched)


def test_secret_is_read_at_compile_time(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("first")
    inject = MitmAction(
        inject_request_headers=(MitmInjectHeader(name="x-t", secret_file=str(secret_file)),)
    )
    hooks = compile_hooks(config(hook(action=("i",)), actions=(("i", inject),)))
    secret_file.write_text("second")
    matched = hooks.match("api.github.com", "POST", "/repos/openai/", [])
    assert matched is not None and matched.apply([]) == [(b"x-t", b"first")]


def test_default_environment_is_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETPROXY_TEST_HOOK_SECRET", "from-os-environ")
    inject = MitmAction(
        inject_request_headers=(
            MitmInjectHeader(name="x-t", secret_env_var="NETPROXY_TEST_HOOK_SECRET"),
        )
    )
    hooks = compile_hooks(config(hook(action=("i",)), actions=(("i", inject),)))
    matched = hooks.match("api.github.com", "POST", "/repos/openai/", [])
    assert matched is not None and matched.apply([]) == [(b"x-t", b"from-os-environ")]
    assert os.environ["NETPROXY_TEST_HOOK_SECRET"] == "from-os-environ"


def _inject(**kw: str) -> tuple[tuple[str, MitmAction], ...]:
    return (("i", MitmAction(inject_request_headers=(MitmInjectHeader(name="x-t", **kw),))),)


ERRORS = [
    pytest.param(config(hook(host="*.github.com")), "mitm.hooks.h.host", id="wildcard-host"),
    pytest.param(config(hook(host="bad host")), "mitm.hooks.h.host", id="invalid-host"),
    pytest.param(config(hook(methods=())), "mitm.hooks.h.methods", id="no-methods"),
    pytest.param(config(hook(methods=("GE T",))), "mitm.hooks.h.methods", id="bad-method"),
    pytest.param(config(hook(path_prefixes=())), "mitm.hooks.h.path_prefixes", id="no-paths"),
    pytest.param(
        config(hook(path_prefixes=("pattern:",))), "mitm.hooks.h.path_prefixes", id="empty-glob"
    ),
    pytest.param(config(hook(query=(("q", ()),))), "mitm.hooks.h.query", id="query-no-values"),
    pytest.param(
        config(hook(headers=(("bad name", ()),))), "mitm.hooks.h.headers", id="bad-header-name"
    ),
    pytest.param(config(hook(action=())), "mitm.hooks.h.action", id="no-actions"),
    pytest.param(config(hook(action=("nope",))), "mitm.hooks.h.action", id="undefined-action"),
    pytest.param(
        config(hook(action=("e",)), actions=(("e", MitmAction()),)),
        "mitm.actions.e",
        id="empty-action",
    ),
    pytest.param(
        config(hook(action=("i",)), actions=_inject(secret_env_var="NETPROXY_SURELY_UNSET_VAR")),
        "mitm.actions.i.inject_request_headers",
        id="missing-env-var",
    ),
    pytest.param(
        config(hook(action=("i",)), actions=_inject(secret_file="/nonexistent/netproxy/secret")),
        "mitm.actions.i.inject_request_headers",
        id="unreadable-file",
    ),
    pytest.param(
        config(hook(action=("i",)), actions=_inject(secret_file="relative/secret")),
        "mitm.actions.i.inject_request_headers",
        id="relative-file",
    ),
    pytest.param(
        config(hook(action=("i",)), actions=_inject(secret_env_var="CTL", prefix="a\nb")),
        "mitm.actions.i.inject_request_headers",
        id="control-chars",
    ),
]


@pytest.mark.parametrize(("mitm", "key"), ERRORS)
def test_compile_errors_name_the_key(mitm: MitmConfig, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_hooks(mitm, environ={"CTL": "s3cr3t-value"})
    assert info.value.key == key
    assert str(info.value).startswith(key)
    assert "s3cr3t-value" not in str(info.value)


def test_error_names_the_hook_using_an_action() -> None:
    mitm = config(hook("github_write", action=("i",)), actions=_inject(secret_env_var="UNSET_X"))
    with pytest.raises(ConfigError, match=r"github_write.*UNSET_X|UNSET_X.*github_write"):
        compile_hooks(mitm, environ={})


def test_unreferenced_action_secrets_are_not_read() -> None:
    mitm = config(hook(), actions=(STRIP, *_inject(secret_env_var="UNSET_Y")))
    assert compile_hooks(mitm, environ={}).hooked("api.github.com")


def test_toml_schema_with_named_actions(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("tok")
    text = f"""
[permissions.ws.network]
domains = {{ "api.github.com" = "allow" }}
[permissions.ws.network.mitm.hooks.github_write]
host = "api.github.com"
methods = ["POST", "PUT"]
path_prefixes = ["/repos/openai/"]
query = {{ state = ["open"] }}
headers = {{ "X-Kind" = [] }}
action = ["strip_auth", "add"]
[permissions.ws.network.mitm.actions.strip_auth]
strip_request_headers = ["authorization"]
[permissions.ws.network.mitm.actions.add]
inject_request_headers = [{{ name = "x-token", secret_file = "{secret}", prefix = "T " }}]
"""
    hooks = compile_hooks(ProxyConfig.from_toml(text, profile="ws").mitm)
    matched = hooks.match("api.github.com", "PUT", "/repos/openai/x?state=open", [(b"x-kind", b"")])
    assert matched is not None and matched.name == "github_write"
    assert matched.apply([(b"authorization", b"x")]) == [(b"x-token", b"T tok")]


@given(st.text(max_size=200))
def test_traversal_check_and_matching_never_raise(path: str) -> None:
    hooks = compile_hooks(config(hook(path_prefixes=("/", "pattern:/**/x*y"))))
    has_encoded_traversal(path)
    hooks.match("api.github.com", "POST", path, [])
