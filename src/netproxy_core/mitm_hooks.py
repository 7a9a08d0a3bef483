"""MITM hooks (SPEC §7.5): compile `MitmConfig` hooks and actions; match and apply them. Pure.

Compilation happens once, when a proxy is built or reloaded: matchers are parsed, referenced
actions are concatenated (strip lists, then inject lists, in the hook's `action` order) and
injected secrets are read from the proxy's own environment or an absolute file. Every problem
is a `ConfigError` naming the hook or action. Secrets stay wrapped in `Secret`.

Matcher forms: plain text is literal; ``pattern:<glob>`` is a glob; ``literal:<text>`` is
literal even when the text starts with a reserved prefix. A literal path is a string prefix of
the raw request path; a literal query or header value must be equal. In path globs ``*`` and
``?`` never cross ``/`` while ``**`` does (``/**/`` also matches a single ``/``); in query and
header globs every wildcard crosses everything. ``[...]`` classes and ``\\`` escapes work as in
shells. Globs run as a set-of-states automaton: linear in the input for any pattern.

A path with encoded traversal (a segment with ``\\``, a ``%`` not followed by two hex digits,
``%25``, ``%2f``, ``%5c``, or one that decodes to ``.`` or ``..``) never matches any hook.

Not here: when a host is intercepted (`handlers/tunnel.py`); serving the tunnel
(`handlers/intercept.py`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl, unquote

from .broker import Secret
from .config.model import MitmAction, MitmConfig, MitmHook, MitmInjectHeader
from .errors import ConfigError, InvalidHost
from .hosts import canonicalize_host

__all__ = ["CompiledHook", "Matcher", "MitmHooks", "compile_hooks", "has_encoded_traversal"]

Headers = list[tuple[bytes, bytes]]

_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_PATTERN: Final = "pattern:"
_LITERAL: Final = "literal:"

# --- globs --------------------------------------------------------------------------------

# An automaton state: (char predicate or None for a split, next, alternative next).
_State = tuple[Callable[[str], bool] | None, int, int]


def _any(_: str) -> bool:
    return True


def _not_slash(c: str) -> bool:
    return c != "/"


class _Glob:
    """A compiled glob: Thompson automaton simulated with a set of states (no backtracking)."""

    __slots__ = ("_accept", "_states")

    def __init__(self, text: str, *, path: bool) -> None:
        states: list[_State] = []
        one = _not_slash if path else _any
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if c == "*":
                double = text.startswith("**", i)
                whole_segment = (i == 0 or text[i - 1] == "/") and text.startswith("/", i + 2)
                i += 2 if double else 1
                here = len(states)
                if path and double and whole_segment:
                    # `**/` after a `/`: nothing, or anything ending in `/` (so `/a/**/b`
                    # matches `/a/b` as well as `/a/x/y/b`).
                    states.append((None, here + 1, here + 4))
                    states.append((None, here + 2, here + 3))
                    states.append((_any, here + 1, -1))
                    states.append((_eq("/"), here + 4, -1))
                    i += 1
                    continue
                states.append((None, here + 1, here + 2))
                states.append((_any if double or not path else _not_slash, here, -1))
                continue
            if c == "?":
                states.append((one, len(states) + 1, -1))
                i += 1
                continue
            if c == "[":
                pred, i = _char_class(text, i, path)
                states.append((pred, len(states) + 1, -1))
                continue
            if c == "\\":
                if i + 1 >= n:
                    raise ValueError("ends with a lone backslash")
                c, i = text[i + 1], i + 1
            states.append((_eq(c), len(states) + 1, -1))
            i += 1
        self._states = tuple(states)
        self._accept = len(states)

    def _closure(self, start: Iterable[int]) -> set[int]:
        seen: set[int] = set()
        todo = list(start)
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            if s < self._accept and self._states[s][0] is None:
                todo.extend((self._states[s][1], self._states[s][2]))
        return seen

    def matches(self, value: str) -> bool:
        current = self._closure((0,))
        for c in value:
            step = []
            for s in current:
                if s < self._accept:
                    pred, nxt, _ = self._states[s]
                    if pred is not None and pred(c):
                        step.append(nxt)
            if not step:
                return False
            current = self._closure(step)
        return self._accept in current


def _eq(c: str) -> Callable[[str], bool]:
    return c.__eq__


def _char_class(text: str, start: int, path: bool) -> tuple[Callable[[str], bool], int]:
    i = start + 1
    negate = i < len(text) and text[i] in "!^"
    i += negate
    ranges: list[tuple[str, str]] = []
    first = True
    while i < len(text) and (text[i] != "]" or first):
        lo = text[i]
        if lo == "\\" and i + 1 < len(text):
            i += 1
            lo = text[i]
        hi = lo
        if i + 2 < len(text) and text[i + 1] == "-" and text[i + 2] != "]":
            hi = text[i + 2]
            i += 2
        if hi < lo:
            raise ValueError(f"bad range {lo}-{hi}")
        ranges.append((lo, hi))
        i += 1
        first = False
    if i >= len(text):
        raise ValueError("unclosed [")
    spans = tuple(ranges)

    def pred(c: str) -> bool:
        if path and c == "/":
            return False
        return any(lo <= c <= hi for lo, hi in spans) != negate

    return pred, i + 1


# --- matchers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Matcher:
    """One allowed value: a literal (path: prefix; query/header: equality) or a glob."""

    text: str
    glob: _Glob | None
    prefix: bool

    @classmethod
    def parse(cls, entry: str, *, path: bool) -> Matcher:
        """Raises ValueError (the caller names the config key)."""
        if entry.startswith(_PATTERN):
            body = entry[len(_PATTERN) :]
            if not body:
                raise ValueError("an empty glob after `pattern:`")
            return cls(body, _Glob(body, path=path), prefix=False)
        body = entry[len(_LITERAL) :] if entry.startswith(_LITERAL) else entry
        if path and not body:
            raise ValueError("an empty path prefix")
        return cls(body, None, prefix=path)

    def matches(self, value: str) -> bool:
        if self.glob is not None:
            return self.glob.matches(value)
        return value.startswith(self.text) if self.prefix else value == self.text


def has_encoded_traversal(path: str) -> bool:
    """True when a segment hides traversal or separators behind encoding (SPEC §7.5)."""
    for segment in path.split("/"):
        if "\\" in segment:
            return True
        i = segment.find("%")
        while i != -1:
            code = segment[i + 1 : i + 3]
            if len(code) != 2 or not set(code) <= _HEX or code.lower() in ("25", "2f", "5c"):
                return True
            i = segment.find("%", i + 3)
        if unquote(segment) in (".", ".."):
            return True
    return False


# --- hooks --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Injection:
    name: bytes
    value: Secret


@dataclass(frozen=True, slots=True)
class CompiledHook:
    """A hook ready to match; `inject` values are `Secret`s (their repr shows ``***``)."""

    name: str
    host: str
    methods: frozenset[str]
    paths: tuple[Matcher, ...]
    query: tuple[tuple[str, tuple[Matcher, ...]], ...]
    headers: tuple[tuple[bytes, tuple[Matcher, ...]], ...]
    strip: frozenset[bytes]
    inject: tuple[_Injection, ...]

    def matches(
        self, method: str, path: str, query: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> bool:
        if method.upper() not in self.methods or not any(m.matches(path) for m in self.paths):
            return False
        if self.query:
            pairs = parse_qsl(query, keep_blank_values=True)
            for name, allowed in self.query:
                if not any(k == name and _any_match(allowed, v) for k, v in pairs):
                    return False
        for hname, allowed in self.headers:
            values = [v for k, v in headers if k.lower() == hname]
            if not values:
                return False
            if allowed and not any(_any_match(allowed, t) for t in _utf8(values)):
                return False
        return True

    def apply(self, headers: Sequence[tuple[bytes, bytes]]) -> Headers:
        """Strip, then inject (replacing any header of the same name)."""
        replaced = self.strip | {i.name for i in self.inject}
        out = [(k, v) for k, v in headers if k.lower() not in replaced]
        out.extend((i.name, i.value.reveal().encode()) for i in self.inject)
        return out


def _any_match(allowed: Sequence[Matcher], value: str) -> bool:
    return any(m.matches(value) for m in allowed)


def _utf8(values: Iterable[bytes]) -> Iterable[str]:
    for value in values:
        try:
            yield value.decode("utf-8")
        except UnicodeDecodeError:
            continue


@dataclass(frozen=True, slots=True)
class MitmHooks:
    """The compiled hooks of one configuration, grouped by canonical host in config order."""

    by_host: Mapping[str, tuple[CompiledHook, ...]]

    def hooked(self, host: str) -> bool:
        return host in self.by_host

    def match(
        self, host: str, method: str, target: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> CompiledHook | None:
        """The first hook for `host` matching this request; None when none does.

        `target` is the request target (origin-form or absolute-form).
        """
        path, _, query = _origin_form(target).partition("?")
        if has_encoded_traversal(path):
            return None
        for hook in self.by_host.get(host, ()):
            if hook.matches(method, path, query, headers):
                return hook
        return None


def _origin_form(target: str) -> str:
    if target.startswith("/"):
        return target.partition("#")[0]
    scheme, sep, rest = target.partition("://")
    if not sep or "/" in scheme:
        return target
    slash = rest.find("/")
    query = rest.find("?")
    cut = min(x for x in (slash, query, len(rest)) if x != -1)
    tail = rest[cut:]
    return ("/" + tail if tail.startswith("?") else tail or "/").partition("#")[0]


def compile_hooks(mitm: MitmConfig, *, environ: Mapping[str, str] | None = None) -> MitmHooks:
    """Compile `mitm.hooks` against `mitm.actions`, reading injected secrets now.

    Args:
        environ: where ``secret_env_var`` is looked up (default: this process's environment).

    Raises:
        ConfigError: a bad matcher, method or header name, an unknown or empty action, a missing
            environment variable or an unreadable/empty secret file; the message names the hook
            or action and never contains a secret.
    """
    env = os.environ if environ is None else environ
    actions = dict(mitm.actions)
    by_host: dict[str, list[CompiledHook]] = {}
    for hook in mitm.hooks:
        compiled = _compile_hook(hook, actions, env)
        by_host.setdefault(compiled.host, []).append(compiled)
    return MitmHooks({h: tuple(hooks) for h, hooks in by_host.items()})


def _compile_hook(
    hook: MitmHook, actions: Mapping[str, MitmAction], env: Mapping[str, str]
) -> CompiledHook:
    key = f"mitm.hooks.{hook.name}"

    def err(sub: str, problem: str) -> ConfigError:
        return ConfigError(f"{key}.{sub}: {problem}", key=f"{key}.{sub}")

    try:
        host = canonicalize_host(hook.host)
    except InvalidHost as exc:
        raise err("host", str(exc)) from None
    if "*" in host or "?" in host:
        raise err("host", "must be an exact host (no wildcard)")
    methods = frozenset(m.strip().upper() for m in hook.methods)
    if not methods or not all(_TOKEN.fullmatch(m) for m in methods):
        raise err("methods", f"must be non-empty HTTP method names, not {list(hook.methods)!r}")
    paths = _matchers(hook.path_prefixes, "path_prefixes", err, path=True)
    if not paths:
        raise err("path_prefixes", "must not be empty")
    query: list[tuple[str, tuple[Matcher, ...]]] = []
    for name, values in hook.query:
        if not name or not values:
            raise err("query", f"{name!r} needs a name and at least one allowed value")
        query.append((name, _matchers(values, f"query.{name}", err, path=False)))
    headers: list[tuple[bytes, tuple[Matcher, ...]]] = []
    for name, values in hook.headers:
        hname = _header_name(name, lambda p: err("headers", p))
        headers.append((hname, _matchers(values, f"headers.{name}", err, path=False)))
    if not hook.action:
        raise err("action", "must name at least one action")
    strip: set[bytes] = set()
    inject: list[_Injection] = []
    for action_name in hook.action:
        action = actions.get(action_name)
        if action is None:
            raise err("action", f"names {action_name!r}, which is not defined under mitm.actions")
        more_strip, more_inject = _compile_action(action_name, action, hook.name, env)
        strip.update(more_strip)
        inject.extend(more_inject)
    return CompiledHook(
        hook.name,
        host,
        methods,
        paths,
        tuple(query),
        tuple(headers),
        frozenset(strip),
        tuple(inject),
    )


def _compile_action(
    name: str, action: MitmAction, hook: str, env: Mapping[str, str]
) -> tuple[list[bytes], list[_Injection]]:
    key = f"mitm.actions.{name}"

    def err(sub: str, problem: str) -> ConfigError:
        return ConfigError(f"{key}.{sub} (used by hook {hook!r}): {problem}", key=f"{key}.{sub}")

    if not action.strip_request_headers and not action.inject_request_headers:
        raise ConfigError(
            f"{key} must define at least one operation (used by hook {hook!r})", key=key
        )
    strip = [
        _header_name(h, lambda p: err("strip_request_headers", p))
        for h in action.strip_request_headers
    ]
    inject = [
        _injection(item, lambda p: err("inject_request_headers", p), env)
        for item in action.inject_request_headers
    ]
    return strip, inject


def _injection(
    item: MitmInjectHeader, err: Callable[[str], ConfigError], env: Mapping[str, str]
) -> _Injection:
    name = _header_name(item.name, err)
    if (item.secret_env_var is None) == (item.secret_file is None):
        raise err(f"{item.name}: exactly one of secret_env_var and secret_file must be given")
    if item.secret_env_var is not None:
        secret = env.get(item.secret_env_var, "").strip()
        if not secret:
            raise err(
                f"{item.name}: environment variable {item.secret_env_var} is not set or empty"
            )
    else:
        path = item.secret_file or ""
        if not os.path.isabs(path):
            raise err(f"{item.name}: secret_file {path!r} must be an absolute path")
        try:
            with open(path, encoding="utf-8") as fh:
                secret = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise err(f"{item.name}: cannot read secret_file {path}: {problem}") from None
        if not secret:
            raise err(f"{item.name}: secret_file {path} is empty")
    value = item.prefix + secret
    if _BAD_VALUE.search(value):
        raise err(f"{item.name}: the prefix or secret contains control characters")
    return _Injection(name, Secret(value))


def _header_name(name: str, err: Callable[[str], ConfigError]) -> bytes:
    if not _TOKEN.fullmatch(name):
        raise err(f"{name!r} is not a valid header name")
    return name.lower().encode("ascii")


def _matchers(
    entries: Iterable[str], sub: str, err: Callable[[str, str], ConfigError], *, path: bool
) -> tuple[Matcher, ...]:
    out = []
    for entry in entries:
        try:
            out.append(Matcher.parse(entry, path=path))
        except ValueError as exc:
            raise err(sub, f"{entry!r} is not a valid matcher: {exc}") from None
    return tuple(out)
