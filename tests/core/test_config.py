"""Tests for `netproxy_core.config` (SPEC §2): TOML shape, layers, profiles, validation, addresses.

Every user mistake must become one `ConfigError` naming the key, its table and the file.
Catalogue rows 101-116 (codex-core §9.9) are adapted: a listener host name other than
`localhost` is an error here (SPEC §2.2), not a silent rebind.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
from pathlib import Path

import pytest

from netproxy_core.config import (
    Access,
    Limits,
    Mode,
    ProxyConfig,
    load_config,
    load_config_text,
    parse_listen_addr,
)
from netproxy_core.errors import ConfigError

SPEC_EXAMPLE = """
default_permissions = "workspace"

[permissions.workspace.network]
enabled = true
mode = "full"

[permissions.workspace.network.domains]
"**.example.com" = "allow"
"evil.example.com" = "deny"
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def net(profile: str, body: str) -> str:
    """A document with one profile's network table."""
    return f"[permissions.{profile}.network]\n{body}\n"


# --- §2.1 shape and profile selection -----------------------------------------------------------


def test_spec_example_loads() -> None:
    config = load_config_text(SPEC_EXAMPLE, source="x.toml")
    assert config.profile == "workspace"
    assert config.enabled is True
    assert config.mode is Mode.FULL
    assert config.domains == (("**.example.com", Access.ALLOW), ("evil.example.com", Access.DENY))
    assert config.allowed_patterns == ("**.example.com",)
    assert config.denied_patterns == ("evil.example.com",)
    assert config.sources == ("x.toml",)


def test_from_toml_is_load_config_text() -> None:
    assert ProxyConfig.from_toml(SPEC_EXAMPLE) == load_config_text(SPEC_EXAMPLE)


def test_defaults_match_the_spec_table() -> None:
    config = load_config_text("")
    assert config.profile == "full"
    assert config.enabled is True
    assert config.proxy_url == "http://127.0.0.1:3128"
    assert config.enable_socks5 is True
    assert config.socks_url == "http://127.0.0.1:8081"
    assert config.enable_socks5_udp is True
    assert config.allow_upstream_proxy is True
    assert config.dangerously_allow_non_loopback_proxy is False
    assert config.mode is Mode.FULL
    assert config.allow_local_binding is False
    assert config.domains == ()
    assert config.unix_sockets == ()
    assert config.mitm.enabled is None
    assert config.credential_broker is False
    assert config.admin_url is None
    assert config.dangerously_allow_all_domains is False
    assert config.limits == Limits()
    assert config.limits.dns_timeout == 2.0
    assert config.otel.enabled is False


PROFILE_SELECTION = [
    pytest.param(None, "workspace", id="default-permissions"),
    pytest.param("other", "other", id="explicit-profile-wins"),
    pytest.param("full", "full", id="explicit-builtin"),
]


@pytest.mark.parametrize(("profile", "expected"), PROFILE_SELECTION)
def test_profile_selection(profile: str | None, expected: str) -> None:
    text = SPEC_EXAMPLE + net("other", 'mode = "limited"')
    assert load_config_text(text, profile).profile == expected


def test_no_default_permissions_selects_builtin_full() -> None:
    config = load_config_text(net("ws", 'mode = "limited"'))
    assert config.profile == "full"
    assert config.mode is Mode.FULL
    assert config.domains == ()


def test_default_permissions_naming_a_missing_profile() -> None:
    with pytest.raises(ConfigError, match="default_permissions names profile 'nope'") as info:
        load_config_text('default_permissions = "nope"\n', source="x.toml")
    assert info.value.file == "x.toml"


def test_default_permissions_may_name_a_builtin() -> None:
    config = load_config_text('default_permissions = "limited"\n')
    assert (config.profile, config.mode) == ("limited", Mode.LIMITED)


# --- layers (later wins) ------------------------------------------------------------------------

LOWER = """
default_permissions = "ws"
[permissions.ws.network]
mode = "limited"
allow_local_binding = true
[permissions.ws.network.domains]
"a.example" = "allow"
"b.example" = "allow"
"evil.example" = "deny"
[permissions.ws.network.unix_sockets]
"/tmp/a.sock" = "allow"
[permissions.ws.network.mitm.hooks.gh]
host = "api.github.com"
methods = ["GET"]
path_prefixes = ["/repos/a"]
action = ["strip_auth"]
query = { page = ["1"] }
[permissions.ws.network.mitm.hooks.other]
host = "other.example"
methods = ["GET"]
path_prefixes = ["/"]
action = ["strip_auth"]
[permissions.ws.network.mitm.actions.strip_auth]
strip_request_headers = ["authorization", "cookie"]
[permissions.ws.network.limits]
connect_timeout = 3
"""

UPPER = """
[permissions.ws.network]
mode = "full"
[permissions.ws.network.domains]
"b.example" = "deny"
"c.example" = "allow"
"a.example" = "none"
[permissions.ws.network.unix_sockets]
"/tmp/b.sock" = "allow"
[permissions.ws.network.mitm.hooks.gh]
host = "api.github.com"
methods = ["POST"]
path_prefixes = ["/repos/b"]
action = ["strip_auth"]
[permissions.ws.network.mitm.actions.strip_auth]
strip_request_headers = ["x-api-key"]
[permissions.ws.network.limits]
idle_timeout = 60
"""


@pytest.fixture
def layered(tmp_path: Path) -> ProxyConfig:
    return load_config([write(tmp_path, "a.toml", LOWER), write(tmp_path, "b.toml", UPPER)])


def test_layers_later_scalar_wins(layered: ProxyConfig) -> None:
    assert layered.mode is Mode.FULL
    assert layered.allow_local_binding is True, "keys the upper layer omits are kept"
    assert layered.profile == "ws", "default_permissions of a lower layer still applies"


def test_layers_domains_merge_per_key(layered: ProxyConfig) -> None:
    assert dict(layered.domains) == {
        "b.example": Access.DENY,
        "evil.example": Access.DENY,
        "c.example": Access.ALLOW,
    }, '"none" removes a lower entry; others merge per key'


def test_layers_unix_sockets_merge_per_key(layered: ProxyConfig) -> None:
    assert dict(layered.unix_sockets) == {"/tmp/a.sock": Access.ALLOW, "/tmp/b.sock": Access.ALLOW}


def test_layers_named_hooks_replaced_wholesale(layered: ProxyConfig) -> None:
    hooks = {h.name: h for h in layered.mitm.hooks}
    assert set(hooks) == {"gh", "other"}
    assert hooks["gh"].methods == ("POST",)
    assert hooks["gh"].path_prefixes == ("/repos/b",)
    assert hooks["gh"].query == (), "the upper hook replaces the lower one, keys and all"
    assert hooks["other"].host == "other.example"


def test_layers_named_actions_replaced_wholesale(layered: ProxyConfig) -> None:
    action = layered.mitm.action("strip_auth")
    assert action is not None
    assert action.strip_request_headers == ("x-api-key",)


def test_layers_nested_tables_merge(layered: ProxyConfig) -> None:
    assert layered.limits.connect_timeout == 3.0
    assert layered.limits.idle_timeout == 60.0
    assert len(layered.sources) == 2
    assert layered.sources[0].endswith("a.toml") and layered.sources[1].endswith("b.toml")


def test_layers_credential_providers_replaced_wholesale(tmp_path: Path) -> None:
    lower = net("ws", "") + (
        "[permissions.ws.network.credential_providers.svc]\n"
        'env = ["A"]\nhosts = ["a.example"]\nscheme = "token"\n'
    )
    upper = net("ws", "") + (
        '[permissions.ws.network.credential_providers.svc]\nenv = ["B"]\nhosts = ["b.example"]\n'
    )
    config = load_config(
        [write(tmp_path, "a.toml", lower), write(tmp_path, "b.toml", upper)], profile="ws"
    )
    (provider,) = config.credential_providers
    assert (provider.env, provider.hosts, provider.scheme) == (("B",), ("b.example",), "bearer")


def test_documents_layer_after_paths(tmp_path: Path) -> None:
    doc = {"permissions": {"ws": {"network": {"mode": "full"}}}}
    config = load_config([write(tmp_path, "a.toml", LOWER)], documents=[(doc, "pyproject.toml")])
    assert config.mode is Mode.FULL
    assert config.sources[-1] == "pyproject.toml"


def test_mitm_bool_shorthand_merges_with_table(tmp_path: Path) -> None:
    lower = net("ws", "mitm = true")
    upper = net("ws", "[permissions.ws.network.mitm.actions.a]\nstrip_request_headers = ['x']")
    config = load_config(
        [write(tmp_path, "a.toml", lower), write(tmp_path, "b.toml", upper)], profile="ws"
    )
    assert config.mitm.enabled is True
    assert config.mitm.action("a") is not None


# --- extends ------------------------------------------------------------------------------------

BASE_AND_CHILD = """
[permissions.base.network]
mode = "limited"
allow_local_binding = true
[permissions.base.network.domains]
"a.example" = "allow"
"x.example" = "deny"
[permissions.child]
extends = "base"
[permissions.child.network]
allow_local_binding = false
[permissions.child.network.domains]
"b.example" = "allow"
"""


def test_extends_starts_from_the_other_profile() -> None:
    config = load_config_text(BASE_AND_CHILD, "child")
    assert config.mode is Mode.LIMITED
    assert config.allow_local_binding is False
    assert dict(config.domains) == {
        "a.example": Access.ALLOW,
        "x.example": Access.DENY,
        "b.example": Access.ALLOW,
    }


def test_extends_inside_network_table() -> None:
    text = net("base", 'mode = "limited"') + net("child", 'extends = "base"')
    assert load_config_text(text, "child").mode is Mode.LIMITED


def test_extends_chain() -> None:
    text = (
        net("a", "allow_local_binding = true")
        + net("b", 'extends = "a"\nmode = "limited"')
        + net("c", 'extends = "b"')
    )
    config = load_config_text(text, "c")
    assert (config.mode, config.allow_local_binding) == (Mode.LIMITED, True)


def test_extends_builtin() -> None:
    config = load_config_text(net("ws", 'extends = "limited"'), "ws")
    assert config.mode is Mode.LIMITED
    assert config.mitm.enabled is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(net("ws", 'extends = "ws"'), "loop: ws → ws", id="self-loop"),
        pytest.param(
            net("a", 'extends = "b"') + net("b", 'extends = "a"'), "loop: a → b → a", id="two-loop"
        ),
        pytest.param(net("a", 'extends = "zz"'), "extends unknown profile 'zz'", id="unknown"),
        pytest.param(net("a", "extends = 3"), "`extends`", id="not-a-string"),
    ],
)
def test_extends_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config_text(text, "a" if "[permissions.a" in text else "ws")


# --- built-in profiles overlay the default profile ----------------------------------------------

OVERLAY_BASE = """
default_permissions = "ws"
[permissions.ws.network]
allow_local_binding = true
[permissions.ws.network.mitm]
enabled = false
[permissions.ws.network.domains]
"a.example" = "allow"
"**.b.example" = "allow"
"evil.example" = "deny"
"""


def test_builtin_full_overlays_default_profile() -> None:
    config = load_config_text(
        OVERLAY_BASE.replace(
            "allow_local_binding = true", 'allow_local_binding = true\nmode = "limited"'
        ),
        "full",
    )
    assert config.profile == "full"
    assert config.mode is Mode.FULL
    assert config.allow_local_binding is True
    assert dict(config.domains)["a.example"] is Access.ALLOW


def test_builtin_limited_is_the_same_policy_read_only() -> None:
    config = load_config_text(OVERLAY_BASE, "limited")
    assert config.profile == "limited"
    assert config.mode is Mode.LIMITED
    assert config.mitm.enabled is True, "limited turns MITM on"
    assert config.allow_local_binding is True
    assert config.allowed_patterns == ("a.example", "**.b.example")
    assert config.denied_patterns == ("evil.example",)


def test_builtin_offline_removes_allows_and_socks() -> None:
    config = load_config_text(OVERLAY_BASE, "offline")
    assert config.profile == "offline"
    assert config.allowed_patterns == ()
    assert config.denied_patterns == ("evil.example",)
    assert config.enable_socks5 is False
    assert config.allow_local_binding is True


@pytest.mark.parametrize(
    ("profile", "mode", "socks"),
    [
        pytest.param("full", Mode.FULL, True, id="full"),
        pytest.param("limited", Mode.LIMITED, True, id="limited"),
        pytest.param("offline", Mode.FULL, False, id="offline"),
    ],
)
def test_builtins_without_a_file(profile: str, mode: Mode, socks: bool) -> None:
    config = load_config([], profile=profile)
    assert (config.profile, config.mode, config.enable_socks5) == (profile, mode, socks)
    assert config.domains == (), "with no file nothing is allowed"
    assert config.sources == ()


def test_file_profile_shadows_builtin_name() -> None:
    config = load_config_text(net("limited", "allow_local_binding = true"), "limited")
    assert config.mode is Mode.FULL, "a file's own `limited` profile is used as written"
    assert config.allow_local_binding is True


def test_builtin_without_default_permissions_overlays_defaults() -> None:
    config = load_config_text(
        net("ws", '[permissions.ws.network.domains]\n"a.example" = "allow"'), "limited"
    )
    assert config.domains == ()


def test_unknown_profile() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(net("workspace", ""), "worksapce", source="x.toml")
    message = str(info.value)
    assert "unknown profile 'worksapce'" in message
    assert "known: full, limited, offline, workspace" in message
    assert "did you mean 'workspace'?" in message
    assert info.value.file == "x.toml"


# --- §2.2 unknown keys, wrong types, bad values --------------------------------------------------

UNKNOWN_KEYS = [
    pytest.param(
        net("ws", "allow_local_bindings = true"),
        "unknown key `allow_local_bindings` in [permissions.ws.network] of x.toml; "
        "did you mean `allow_local_binding`?",
        id="spec-example",
    ),
    pytest.param(
        net("ws", "enable_sock5 = true"),
        "unknown key `enable_sock5` in [permissions.ws.network] of x.toml; "
        "did you mean `enable_socks5`?",
        id="typo",
    ),
    pytest.param(
        net("ws", "completely_unrelated = 1"),
        "unknown key `completely_unrelated` in [permissions.ws.network] of x.toml",
        id="no-suggestion",
    ),
    pytest.param(
        net("ws", "[permissions.ws.network.limits]\nconect_timeout = 1"),
        "unknown key `conect_timeout` in [permissions.ws.network.limits] of x.toml; "
        "did you mean `connect_timeout`?",
        id="limits",
    ),
    pytest.param(
        net("ws", "[permissions.ws.network.mitm]\nenabeld = true"),
        "unknown key `enabeld` in [permissions.ws.network.mitm] of x.toml; did you mean `enabled`?",
        id="mitm",
    ),
    pytest.param(
        net("ws", "[permissions.ws.network.mitm.hooks.h]\nhost = 'a'\nmethod = ['GET']"),
        "unknown key `method` in [permissions.ws.network.mitm.hooks.h] of x.toml; "
        "did you mean `methods`?",
        id="hook",
    ),
    pytest.param(
        net("ws", "[permissions.ws.network.otel]\nendpiont = 'x'"),
        "unknown key `endpiont` in [permissions.ws.network.otel] of x.toml; "
        "did you mean `endpoint`?",
        id="otel",
    ),
    pytest.param(
        net("my-ws", "modee = 'full'"),
        "unknown key `modee` in [permissions.my-ws.network] of x.toml; did you mean `mode`?",
        id="dashed-profile-name",
    ),
]


@pytest.mark.parametrize(("text", "message"), UNKNOWN_KEYS)
def test_unknown_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, source="x.toml")
    assert str(info.value) == message
    assert info.value.file == "x.toml"
    assert info.value.key is not None and info.value.key in message


def test_unknown_key_in_a_file_names_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, "x.toml", net("ws", "allow_local_bindings = true"))
    with pytest.raises(ConfigError, match=re.escape(f"of {path}; did you mean")) as info:
        load_config([path])
    assert info.value.file == path


def test_unrelated_top_level_keys_are_ignored() -> None:
    text = 'model = "x"\n[permissions.ws]\nsandbox = "strict"\n' + net("ws", "enabled = true")
    assert load_config_text(text, "ws").enabled is True


WRONG = [
    pytest.param(
        "enabled = 'yes'",
        "`enabled` in [permissions.ws.network] of x.toml must be true or false, not a string",
        id="bool-as-string",
    ),
    pytest.param("enable_socks5 = 1", "must be true or false, not a number", id="bool-as-number"),
    pytest.param("proxy_url = 3128", "`proxy_url`", id="url-as-number"),
    pytest.param(
        "mode = 'readonly'",
        "`mode` in [permissions.ws.network] of x.toml must be "
        '"full" or "limited", not \'readonly\'',
        id="bad-mode",
    ),
    pytest.param("mode = 1", "`mode`", id="mode-as-number"),
    pytest.param(
        "domains = 'a.example'",
        "`domains` in [permissions.ws.network] of x.toml must be a table, not a string",
        id="domains-not-a-table",
    ),
    pytest.param(
        "[permissions.ws.network.domains]\n'a.example' = 'maybe'",
        '`a.example` in [permissions.ws.network.domains] of x.toml must be "allow", '
        '"deny" or "none"',
        id="bad-access",
    ),
    pytest.param(
        "[permissions.ws.network.domains]\n'a.example' = true", "`a.example`", id="access-as-bool"
    ),
    pytest.param(
        "[permissions.ws.network.domains]\n'a b.example' = 'allow'",
        "invalid domain pattern 'a b.example'",
        id="bad-pattern",
    ),
    pytest.param(
        "[permissions.ws.network.domains]\n'api[12].com' = 'deny'",
        "invalid domain pattern 'api[12].com'",
        id="row47-bracket-pattern",
    ),
    pytest.param(
        "[permissions.ws.network.unix_sockets]\n'/a.sock' = 'yes'",
        "`/a.sock`",
        id="bad-socket-access",
    ),
    pytest.param(
        "[permissions.ws.network.unix_sockets]\n'relative.sock' = 'allow'",
        "must be an absolute path",
        id="row112-relative-socket",
    ),
    pytest.param(
        "[permissions.ws.network.unix_sockets]\n'~/example.sock' = 'allow'",
        "must be an absolute path",
        id="row112-tilde-socket",
    ),
    pytest.param("upstream_ca_files = [1]", "must be a list of strings", id="ca-files"),
    pytest.param(
        "[permissions.ws.network.limits]\nconnect_timeout = 0",
        "`connect_timeout` in [permissions.ws.network.limits] of x.toml must be a "
        "positive number of seconds",
        id="zero-timeout",
    ),
    pytest.param(
        "[permissions.ws.network.limits]\ndns_timeout = -1",
        "positive number",
        id="negative-timeout",
    ),
    pytest.param(
        "[permissions.ws.network.limits]\nidle_timeout = true", "positive number", id="bool-timeout"
    ),
    pytest.param(
        "[permissions.ws.network.limits]\nmax_connections = 1.5",
        "must be a positive whole number",
        id="fractional-count",
    ),
    pytest.param("limits = 3", "`limits`", id="limits-not-a-table"),
    pytest.param(
        "[permissions.ws.network.hosts]\n'a.example' = ['1.2.3.4', 'nope']",
        "`a.example` in [permissions.ws.network.hosts] of x.toml has 'nope', which is "
        "not an IP address",
        id="hosts-bad-ip",
    ),
    pytest.param(
        "[permissions.ws.network.hosts]\n'a.example' = 5",
        "must be a list of strings",
        id="hosts-not-a-list",
    ),
    pytest.param(
        "[permissions.ws.network.hosts]\n'a b' = ['1.2.3.4']",
        "is not a valid host",
        id="hosts-bad-name",
    ),
    pytest.param(
        "[permissions.ws.network.routes]\n'a.test' = '127.0.0.1'",
        "`a.test` in [permissions.ws.network.routes] of x.toml must map to an IP:port",
        id="route-without-port",
    ),
    pytest.param(
        "[permissions.ws.network.routes]\n'a.test' = 'name.test:80'",
        "must map to an IP:port",
        id="route-to-a-name",
    ),
    pytest.param(
        "[permissions.ws.network.routes]\n'a b' = '127.0.0.1:80'",
        "is not a valid host[:port]",
        id="route-bad-target",
    ),
    pytest.param(
        "[permissions.ws.network.mitm.hooks.h]\nhost = 'a.example'",
        "`methods` in [permissions.ws.network.mitm.hooks.h] of x.toml is required",
        id="hook-missing-methods",
    ),
    pytest.param(
        "[permissions.ws.network.mitm.hooks.h]\nhost = '*.a'\nmethods = ['GET']\n"
        "path_prefixes = ['/']\naction = ['x']",
        "must be an exact host",
        id="hook-wildcard-host",
    ),
    pytest.param(
        "[permissions.ws.network.mitm.hooks.h]\nhost = 'a'\nmethods = ['GET']\n"
        "path_prefixes = ['/']\naction = ['missing']",
        "names 'missing', which is not defined under mitm.actions",
        id="hook-bad-action",
    ),
    pytest.param(
        "[permissions.ws.network.mitm.ca]\ncertificate_file = '/a.pem'",
        "`private_key_file` in [permissions.ws.network.mitm.ca] of x.toml is required",
        id="ca-half",
    ),
    pytest.param(
        "[permissions.ws.network.mitm.actions.a]\ninject_request_headers = "
        "[{name = 'x', secret_file = 'rel'}]",
        "must be an absolute path",
        id="inject-relative-file",
    ),
    pytest.param(
        "[permissions.ws.network.mitm.actions.a]\ninject_request_headers = [{name = 'x'}]",
        "exactly one must be given",
        id="inject-no-source",
    ),
    pytest.param(
        "[permissions.ws.network.credential_providers.p]\nenv = []\nhosts = ['a']",
        "must list at least one entry",
        id="provider-empty-env",
    ),
    pytest.param(
        "[permissions.ws.network.credential_providers.p]\nenv = ['A']\nhosts = ['a']\n"
        "scheme = 'digest'",
        "must be one of bearer, token, basic, raw",
        id="provider-bad-scheme",
    ),
    pytest.param(
        "[permissions.ws.network.otel]\nenabled = 'yes'", "must be true or false", id="otel-enabled"
    ),
]


@pytest.mark.parametrize(("body", "message"), WRONG)
def test_wrong_types_and_bad_values(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(net("ws", body), "ws", source="x.toml")
    assert message in str(info.value)
    assert info.value.file == "x.toml"
    assert "x.toml" in str(info.value), "the message names the file"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("x = [", "x.toml is not valid TOML", id="bad-toml"),
        pytest.param(
            "default_permissions = 3",
            "`default_permissions` in x.toml must be a string",
            id="default-not-string",
        ),
        pytest.param(
            "permissions = 3", "`permissions` in x.toml must be a table", id="permissions-not-table"
        ),
        pytest.param(
            "[permissions]\nws = 3",
            "`ws` in [permissions] of x.toml must be a table",
            id="profile-not-table",
        ),
        pytest.param("[permissions.ws]\nnetwork = 3", "`network`", id="network-not-table"),
    ],
)
def test_document_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config_text(text, source="x.toml")


def test_file_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config([missing])
    assert info.value.file == missing
    with pytest.raises(ConfigError, match="is a directory"):
        load_config([tmp_path])
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe = 1")
    with pytest.raises(ConfigError, match=r"bin\.toml"):
        load_config([binary])


# --- cross-key rules ---------------------------------------------------------------------------

CROSS = [
    pytest.param(
        '[permissions.ws.network.domains]\n"*" = "deny"',
        "`*` in [permissions.ws.network.domains] of x.toml is a global wildcard, which "
        "cannot be a deny entry",
        id="row41-deny-star",
    ),
    pytest.param(
        '[permissions.ws.network.domains]\n"[*]" = "deny"',
        "global wildcard",
        id="row41-deny-bracketed-star",
    ),
    pytest.param(
        '[permissions.ws.network.domains]\n"**.*" = "deny"',
        "global wildcard",
        id="row41-deny-apex-star",
    ),
    pytest.param(
        '[permissions.ws.network.domains]\n"**.[*]" = "deny"',
        "global wildcard",
        id="row41-deny-apex-bracketed-star",
    ),
    pytest.param(
        '[permissions.ws.network.domains]\n"*:443" = "deny"', "global wildcard", id="deny-star-port"
    ),
    pytest.param(
        '[permissions.ws.network.domains]\n"example.com" = "allow"\n"*" = "deny"',
        "global wildcard",
        id="row43-deny-star-with-allow",
    ),
    pytest.param(
        '[permissions.ws.network.domains]\n"*" = "allow"',
        "`*` in [permissions.ws.network.domains] of x.toml allows every host; set "
        "`dangerously_allow_all_domains = true` to mean it",
        id="allow-star-needs-flag",
    ),
    pytest.param(
        '[permissions.ws.network.domains]\n"[*]:443" = "allow"',
        "dangerously_allow_all_domains",
        id="allow-bracketed-star-needs-flag",
    ),
    pytest.param(
        '[permissions.ws.network.domains]\n"*:443" = "allow"',
        "dangerously_allow_all_domains",
        id="allow-star-port-needs-flag",
    ),
    pytest.param(
        '[permissions.ws.network.domains]\n"**.*." = "allow"',
        "dangerously_allow_all_domains",
        id="allow-apex-star-dot-needs-flag",
    ),
    pytest.param(
        "credential_broker = true\nmitm.enabled = false",
        "`credential_broker` in [permissions.ws.network] of x.toml needs MITM, but "
        "`mitm.enabled = false`",
        id="broker-without-mitm",
    ),
    pytest.param("mitm = false\ncredential_broker = true", "needs MITM", id="broker-mitm-bool"),
    pytest.param(
        "[permissions.ws.network.mitm]\nenabled = false\n"
        "ca = {certificate_file = '/a.pem', private_key_file = '/a.key'}",
        "`mitm.ca` in [permissions.ws.network] of x.toml is set, but `mitm.enabled = false`",
        id="ca-without-mitm",
    ),
]


@pytest.mark.parametrize(("body", "message"), CROSS)
def test_cross_key_errors(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(net("ws", body), "ws", source="x.toml")
    assert message in str(info.value)


def test_allow_star_with_flag_is_accepted() -> None:
    config = load_config_text(
        net(
            "ws",
            "dangerously_allow_all_domains = true\n[permissions.ws.network.domains]\n"
            '"*" = "allow"\n"evil.example" = "deny"',
        ),
        "ws",
    )
    assert config.allowed_patterns == ("*",)
    assert config.denied_patterns == ("evil.example",)


def test_broker_with_auto_mitm_is_fine() -> None:
    assert load_config_text(net("ws", "credential_broker = true"), "ws").credential_broker


# --- hosts, routes, misc values -------------------------------------------------------------------


def test_static_hosts_and_routes_are_canonical(caplog: pytest.LogCaptureFixture) -> None:
    body = """
[permissions.ws.network.hosts]
"API.Example.test." = ["10.0.0.1", "0x7f.1", "[::1]"]
"single.test" = "1.2.3.4"
"localhost" = ["10.9.9.9"]
[permissions.ws.network.routes]
"API.Example.test:443" = "127.0.0.1:8443"
"bücher.test" = "[::1]:80"
"""
    with caplog.at_level(logging.WARNING, logger="netproxy.config"):
        config = load_config_text(net("ws", body), "ws")
    assert config.hosts == (
        ("api.example.test", ("10.0.0.1", "127.0.0.1", "::1")),
        ("single.test", ("1.2.3.4",)),
    )
    assert "localhost" in caplog.text, "the ignored localhost entry is warned about"
    assert config.routes == (
        ("api.example.test:443", "127.0.0.1:8443"),
        ("xn--bcher-kva.test", "[::1]:80"),
    )


def test_limits_and_otel() -> None:
    body = (
        "[permissions.ws.network.limits]\nconnect_timeout = 1\nmax_connections = 8\n"
        "[permissions.ws.network.otel]\nenabled = true\nendpoint = 'http://127.0.0.1:4318'"
    )
    config = load_config_text(net("ws", body), "ws")
    assert config.limits.connect_timeout == 1.0
    assert isinstance(config.limits.connect_timeout, float)
    assert config.limits.max_connections == 8
    assert config.otel.enabled is True
    assert config.otel.endpoint == "http://127.0.0.1:4318"


def test_hooks_and_actions_are_normalised() -> None:
    body = """
[permissions.ws.network.mitm.hooks.gh]
host = "api.github.com"
methods = ["get", "Post"]
path_prefixes = "/repos/"
action = "strip"
headers = { "X-Thing" = "a" }
[permissions.ws.network.mitm.actions.strip]
strip_request_headers = ["Authorization"]
inject_request_headers = [{ name = "authorization", secret_env_var = "TOKEN", prefix = "Bearer " }]
"""
    config = load_config_text(net("ws", body), "ws")
    (hook,) = config.mitm.hooks
    assert hook.methods == ("GET", "POST")
    assert hook.path_prefixes == ("/repos/",)
    assert hook.action == ("strip",)
    assert hook.headers == (("x-thing", ("a",)),)
    action = config.mitm.action("strip")
    assert action is not None
    assert action.strip_request_headers == ("authorization",)
    assert action.inject_request_headers[0].secret_env_var == "TOKEN"


def test_secrets_are_redacted() -> None:
    config = load_config_text(
        net("ws", "admin_token = 's3cret'\nproxy_auth_token = 'hunter2'"), "ws"
    )
    assert config.admin_token == "s3cret"
    assert "s3cret" not in repr(config) and "hunter2" not in repr(config)
    data = config.redacted()
    assert data["admin_token"] == "***" and data["proxy_auth_token"] == "***"
    assert "s3cret" not in str(data)


# --- listener addresses (rows 101-109 adapted) ----------------------------------------------------

ADDRESSES = [
    pytest.param("127.0.0.1:8080", ("127.0.0.1", 8080), id="row102-host-port"),
    pytest.param("http://127.0.0.1:9000", ("127.0.0.1", 9000), id="url"),
    pytest.param("http://127.0.0.1:9000/some/path", ("127.0.0.1", 9000), id="url-with-path"),
    pytest.param("http://user:pass@127.0.0.1:5555", ("127.0.0.1", 5555), id="row104-userinfo"),
    pytest.param("socks5h://127.0.0.1:1080", ("127.0.0.1", 1080), id="socks-scheme"),
    pytest.param("http://[::1]:9999", ("::1", 9999), id="row105-bracketed-url"),
    pytest.param("[::1]:9999", ("::1", 9999), id="bracketed"),
    pytest.param("2001:db8::1", ("2001:db8::1", 3128), id="row106-bare-v6"),
    pytest.param("::1", ("::1", 3128), id="bare-v6-loopback"),
    pytest.param("localhost", ("127.0.0.1", 3128), id="row109-localhost"),
    pytest.param("localhost:9000", ("127.0.0.1", 9000), id="localhost-port"),
    pytest.param("http://LOCALHOST.:9000", ("127.0.0.1", 9000), id="localhost-noise"),
    pytest.param("1.2.3.4", ("1.2.3.4", 3128), id="row109-ip-default-port"),
    pytest.param("0.0.0.0:3128", ("0.0.0.0", 3128), id="row110-any"),
    pytest.param("127.0.0.1:0", ("127.0.0.1", 0), id="ephemeral"),
    pytest.param("  127.0.0.1:1  ", ("127.0.0.1", 1), id="trimmed"),
]


@pytest.mark.parametrize(("value", "expected"), ADDRESSES)
def test_parse_listen_addr(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen_addr(value, 3128) == expected


BAD_ADDRESSES = [
    pytest.param("", "empty", id="row101-empty"),
    pytest.param("   ", "empty", id="row101-blank"),
    pytest.param("example.com:8080", "names host 'example.com'", id="hostname"),
    pytest.param("http://example.com:5555", "names host 'example.com'", id="row109-url-hostname"),
    pytest.param("http://user:pass@host.example:5555", "names host", id="row104-hostname"),
    pytest.param("example.com:notaport", "invalid port", id="row107-bad-port"),
    pytest.param("127.0.0.1:99999", "invalid port", id="port-out-of-range"),
    pytest.param("http://:8080", "has no host", id="no-host"),
    pytest.param("[::1", "missing ']'", id="unclosed-bracket"),
]


@pytest.mark.parametrize(("value", "message"), BAD_ADDRESSES)
def test_parse_listen_addr_rejects(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_listen_addr(value, 3128)


@pytest.mark.parametrize("key", ["proxy_url", "socks_url", "admin_url"])
def test_listener_keys_are_validated(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(net("ws", f'{key} = "example.com:1"'), "ws", source="x.toml")
    assert str(info.value).startswith(f"`{key}` in [permissions.ws.network] of x.toml")
    assert info.value.key == key


# --- with_changes, direct construction, pickling --------------------------------------------------


def test_with_changes_applies_and_revalidates() -> None:
    config = load_config_text(SPEC_EXAMPLE)
    changed = config.with_changes(mode=Mode.LIMITED, allow_local_binding=True)
    assert (changed.mode, changed.allow_local_binding) == (Mode.LIMITED, True)
    assert config.mode is Mode.FULL, "the original is not mutated"
    assert changed.domains == config.domains
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = Mode.LIMITED  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"domains": (("*", Access.DENY),)}, "cannot be a deny entry", id="deny-star"),
        pytest.param(
            {"domains": (("*", Access.ALLOW),)}, "dangerously_allow_all_domains", id="allow-star"
        ),
        pytest.param(
            {"domains": (("a b", Access.ALLOW),)}, "invalid domain pattern", id="bad-pattern"
        ),
        pytest.param(
            {"domains": (("a.example", "maybe"),)}, 'must be "allow" or "deny"', id="bad-access"
        ),
        pytest.param(
            {
                "credential_broker": True,
                "mitm": dataclasses.replace(ProxyConfig().mitm, enabled=False),
            },
            "needs MITM",
            id="broker-mitm-off",
        ),
        pytest.param({"proxy_url": "example.com:1"}, "`proxy_url`", id="listener-hostname"),
        pytest.param({"admin_url": "example.com:1"}, "`admin_url`", id="admin-hostname"),
        pytest.param({"mode": "readonly"}, "`mode`", id="bad-mode"),
        pytest.param(
            {"unix_sockets": (("rel.sock", Access.ALLOW),)}, "absolute path", id="relative-socket"
        ),
    ],
)
def test_with_changes_rejects(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config_text(SPEC_EXAMPLE).with_changes(**changes)


def test_with_changes_dangerous_flag_allows_star() -> None:
    config = ProxyConfig().with_changes(
        domains=(("*", Access.ALLOW),), dangerously_allow_all_domains=True
    )
    assert config.allowed_patterns == ("*",)


def test_plain_string_access_is_not_dropped() -> None:
    config = ProxyConfig(domains=(("evil.example", "deny"), ("good.example", "allow")))  # type: ignore[arg-type]
    assert config.denied_patterns == ("evil.example",)
    assert config.allowed_patterns == ("good.example",)


def test_row118_only_enabled_given() -> None:
    assert load_config_text(net("ws", "enabled = true"), "ws") == ProxyConfig(
        profile="ws", sources=("<string>",)
    )


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ConfigError("bad key", key="k", file="f.toml"), id="with-data"),
        pytest.param(ConfigError("bad"), id="plain"),
    ],
)
def test_config_error_pickles(error: ConfigError) -> None:
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is ConfigError
    assert (clone.args, clone.key, clone.file) == (error.args, error.key, error.file)


def test_loaded_error_pickles() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(net("ws", "allow_local_bindings = true"), source="x.toml")
    clone = pickle.loads(pickle.dumps(info.value))
    assert (str(clone), clone.key, clone.file) == (
        str(info.value),
        "allow_local_bindings",
        "x.toml",
    )


def test_network_key_at_top_level_is_an_error_naming_the_right_table(tmp_path: Path) -> None:
    config = tmp_path / "top.toml"
    config.write_text("[limits]\nidle_timeout = 1.5\n")
    with pytest.raises(ConfigError, match=r"`limits` at the top level of .*top\.toml") as info:
        load_config([config])
    assert "[permissions.<profile>.network]" in str(info.value)


def test_unrelated_top_level_keys_in_a_file_are_ignored(tmp_path: Path) -> None:
    config = tmp_path / "shared.toml"
    config.write_text('model = "x"\n[permissions.ws.network.domains]\n"a.example" = "allow"\n')
    assert load_config([config], profile="ws").allowed_patterns == ("a.example",)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        pytest.param({"hosts": (("a.test", ("not-an-ip",)),)}, "a.test", id="hosts-value-not-ip"),
        pytest.param({"routes": (("a.test", "host1:80"),)}, "a.test", id="route-to-a-name"),
        pytest.param({"routes": (("a.test", "127.0.0.1"),)}, "a.test", id="route-without-port"),
    ],
)
def test_hosts_and_routes_are_checked_in_code_built_configs(
    changes: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        ProxyConfig().with_changes(**changes)
    assert info.value.key == key
