"""Credential broker (SPEC §8): real tokens stay in proxy memory, children get shaped dummies.

`CredentialBroker.virtualize(env)` replaces each supported credential in a copy of `env` by a
random dummy of the same shape and remembers (key, dummy, real, bound hosts). At request time
the interceptor calls `swap(headers, host)`: when the request presents exactly one registered
dummy in the form its credential expects and the host is bound to that credential, the dummy
is replaced by the real value; otherwise the headers come back unchanged.

Real values are wrapped in `Secret` (redacted ``repr``/``str``, not picklable) and never
logged, audited, rendered or written anywhere.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import secrets
import string
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, NoReturn

from .config.model import CredentialProvider, ProxyConfig
from .errors import InvalidHost
from .hosts import canonicalize_host
from .patterns import PatternSet, compile_pattern

__all__ = [
    "BROKERED_CREDENTIALS_KEY",
    "BROKER_ACTIVE_KEY",
    "DUMMY_PREFIXES",
    "CredentialBroker",
    "Secret",
    "brokered_dummy_env_keys",
    "is_github_cloud",
    "make_dummy",
    "normalize_gh_host",
]

log = logging.getLogger("netproxy.broker")

BROKER_ACTIVE_KEY: Final = "NETPROXY_CREDENTIAL_BROKER_ACTIVE"
BROKERED_CREDENTIALS_KEY: Final = "NETPROXY_BROKERED_CREDENTIALS"
DUMMY_PREFIXES: Final = (
    "github_pat_",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "sk-proj-",
    "sk-svcacct-",
    "sk-admin-",
    "sk-",
)
GITHUB_KEYS: Final = ("GH_TOKEN", "GITHUB_TOKEN")
GITHUB_ENTERPRISE_KEYS: Final = ("GH_ENTERPRISE_TOKEN", "GITHUB_ENTERPRISE_TOKEN")
OPENAI_KEYS: Final = ("OPENAI_API_KEY",)
GITHUB_CLOUD_HOSTS: Final = ("github.com", "api.github.com", "uploads.github.com", "*.ghe.com")
OPENAI_HOSTS: Final = ("api.openai.com",)
# Builtin credentials accept every Authorization form; configured providers only their scheme.
ANY_SCHEME: Final = ("bearer", "token", "basic")
_ALPHABET: Final = string.ascii_letters + string.digits
_MIN_RANDOM: Final = 16
_ATTEMPTS: Final = 64


class Secret:
    """A real credential value: never shown by ``repr``/``str``, never pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def matches(self, other: str) -> bool:
        return hmac.compare_digest(self._value.encode(), other.encode())

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True, slots=True)
class _Source:
    """Where a family of credentials may be injected."""

    family: str
    keys: tuple[str, ...]
    hosts: PatternSet
    header: bytes = b"authorization"
    schemes: tuple[str, ...] = ANY_SCHEME


@dataclass(frozen=True, slots=True)
class _Credential:
    key: str
    source: _Source
    dummy: str
    real: Secret = field(repr=False)

    def bound(self, host: str) -> bool:
        return self.source.hosts.matches(host)


def make_dummy(real: str, is_taken: Callable[[str], bool] | None = None) -> str | None:
    """A random dummy shaped like `real` (SPEC §8), or None when none can be found.

    Same known prefix, same non-alphanumeric positions, random alphanumerics from `secrets`;
    at least prefix + 16 random characters. Never equal to or containing `real`, and never a
    value `is_taken` rejects (other dummies, other real values).
    """
    prefix = next((p for p in DUMMY_PREFIXES if real.startswith(p)), "")
    # A value shorter than prefix + 16 gets prefix + 16 random alphanumerics (SPEC §8).
    short = len(real) < len(prefix) + _MIN_RANDOM
    length = len(prefix) + _MIN_RANDOM if short else len(real)
    for _ in range(_ATTEMPTS):
        chars = [
            real[i] if not short and not real[i].isalnum() else secrets.choice(_ALPHABET)
            for i in range(len(prefix), length)
        ]
        dummy = prefix + "".join(chars)
        if real in dummy or (is_taken is not None and is_taken(dummy)):
            continue
        return dummy
    return None


def brokered_dummy_env_keys(env: Mapping[str, str]) -> list[str]:
    """Keys whose current value still equals the dummy recorded in the marker. Pure.

    The marker is untrusted input: a malformed one yields ``[]``; entries that are not
    ``[key, dummy]`` string pairs are ignored. A value the user replaced is not listed.
    """
    try:
        entries = json.loads(env.get(BROKERED_CREDENTIALS_KEY, "[]"))
    except ValueError:
        return []
    if not isinstance(entries, list):
        return []
    keys: set[str] = set()
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2):
            continue
        key, dummy = entry
        if isinstance(key, str) and isinstance(dummy, str) and dummy and env.get(key) == dummy:
            keys.add(key)
    return sorted(keys)


def _valid_header_value(value: str) -> bool:
    return all(" " <= c <= "~" for c in value)


def normalize_gh_host(value: str | None) -> str | None:
    """The canonical `GH_HOST`, or None when unset or not a valid host (port discarded)."""
    if value is None:
        return None
    text = value.strip()
    if not text or any(c in text for c in "/\\@?#*"):
        return None
    try:
        return canonicalize_host(text)
    except InvalidHost:
        return None


def is_github_cloud(host: str) -> bool:
    return host in ("github.com", "ghe.com") or host.endswith((".github.com", ".ghe.com"))


class CredentialBroker:
    """Registered credentials of one proxy; safe to use from several threads."""

    def __init__(self, providers: Iterable[CredentialProvider] = ()) -> None:
        self._github = _Source("github", GITHUB_KEYS, _patterns(GITHUB_CLOUD_HOSTS))
        self._openai = _Source("openai", OPENAI_KEYS, _patterns(OPENAI_HOSTS))
        self._providers: list[_Source] = []
        claimed = set(GITHUB_KEYS + GITHUB_ENTERPRISE_KEYS + OPENAI_KEYS)
        for provider in providers:
            keys = tuple(k for k in provider.env if k not in claimed)
            if len(keys) != len(provider.env):
                log.warning(
                    "credential provider %s: ignoring variables already brokered: %s",
                    provider.id,
                    ", ".join(k for k in provider.env if k in claimed),
                )
            claimed.update(keys)
            if keys:
                self._providers.append(
                    _Source(
                        f"provider:{provider.id}",
                        keys,
                        _patterns(provider.hosts),
                        provider.header.lower().encode("ascii"),
                        (provider.scheme,),
                    )
                )
        self._lock = threading.Lock()
        self._credentials: tuple[_Credential, ...] = ()

    @classmethod
    def from_config(cls, config: ProxyConfig) -> CredentialBroker:
        return cls(config.credential_providers)

    def __repr__(self) -> str:
        return f"<CredentialBroker {len(self._credentials)} credential(s)>"

    @property
    def supported_keys(self) -> tuple[str, ...]:
        """Every variable this broker would virtualise."""
        keys = GITHUB_KEYS + GITHUB_ENTERPRISE_KEYS + OPENAI_KEYS
        return keys + tuple(k for s in self._providers for k in s.keys)

    def dummies(self) -> dict[str, str]:
        """Registered ``{dummy: env key}`` (dummies are worthless; safe to show)."""
        return {c.dummy: c.key for c in self._credentials}

    # --- virtualising ---------------------------------------------------------------------

    def virtualize(self, env: Mapping[str, str]) -> dict[str, str]:
        """A copy of `env` with each supported credential replaced by its dummy, plus markers."""
        out = dict(env)
        out[BROKER_ACTIVE_KEY] = "1"
        sources = [self._github, self._openai, *self._providers]
        gh_host = normalize_gh_host(env.get("GH_HOST"))
        if gh_host is not None and not is_github_cloud(gh_host):
            sources.insert(
                1, _Source("github_enterprise", GITHUB_ENTERPRISE_KEYS, _patterns([gh_host]))
            )
        marker: list[list[str]] = []
        with self._lock:
            for source in sources:
                for key in source.keys:
                    value = out.get(key)
                    if value is None:
                        continue
                    dummy = self._register(key, source, value.strip())
                    if dummy is not None:
                        out[key] = dummy
                        marker.append([key, dummy])
        out[BROKERED_CREDENTIALS_KEY] = json.dumps(marker)
        return out

    def _register(self, key: str, source: _Source, real: str) -> str | None:
        """Dummy for (key, source, real); must hold the lock."""
        if not real:
            return None
        known = {c.dummy: c for c in self._credentials}
        if real in known:
            return real if known[real].key == key else None
        for cred in self._credentials:
            if cred.key == key and cred.source == source and cred.real.matches(real):
                return cred.dummy
        if not _valid_header_value(real):
            log.warning("%s is not a valid header value; it is not brokered", key)
            return None

        def taken(candidate: str) -> bool:
            return any(
                candidate in c.dummy or c.dummy in candidate or c.real.reveal() in candidate
                for c in self._credentials
            )

        dummy = make_dummy(real, taken)
        if dummy is None:
            log.warning("no usable dummy for %s; it is not brokered", key)
            return None
        self._credentials = (*self._credentials, _Credential(key, source, dummy, Secret(real)))
        return dummy

    # --- request time ---------------------------------------------------------------------

    def is_bound(self, host: str) -> bool:
        """Some registered credential may be injected for this (canonical) host."""
        return any(c.bound(host) for c in self._credentials)

    def swap(self, headers: list[tuple[bytes, bytes]], host: str) -> list[tuple[bytes, bytes]]:
        """The headers with a presented dummy replaced by its real value (SPEC §8).

        Only credentials bound to `host` are considered; exactly one must match, else the
        headers come back unchanged. The input list is not mutated.
        """
        candidates = [c for c in self._credentials if c.bound(host)]
        if not candidates:
            return headers
        changes: dict[int, bytes] = {}
        matched: set[str] = set()
        for index, (name, value) in enumerate(headers):
            for cred in candidates:
                if name.lower() != cred.source.header:
                    continue
                new = _translate(value, cred)
                if new is not None:
                    changes[index] = new
                    matched.add(cred.dummy)
        if len(matched) != 1:
            return headers
        log.debug("brokered credential injected for %s", host)
        return [(n, changes.get(i, v)) for i, (n, v) in enumerate(headers)]


def _patterns(texts: Iterable[str]) -> PatternSet:
    return PatternSet(compile_pattern(t) for t in texts)


def _translate(value: bytes, cred: _Credential) -> bytes | None:
    """The header value with `cred`'s dummy replaced, or None when it does not present it."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    schemes = cred.source.schemes
    dummy, real = cred.dummy, cred.real
    if "raw" in schemes:
        return real.reveal().encode() if text.strip() == dummy else None
    word, _, rest = text.strip().partition(" ")
    rest = rest.strip()
    scheme = word.lower()
    if scheme not in schemes:
        return None
    if scheme in ("bearer", "token"):
        return f"{word} {real.reveal()}".encode() if rest == dummy else None
    return _translate_basic(word, rest, dummy, real)


def _translate_basic(word: str, payload: str, dummy: str, real: Secret) -> bytes | None:
    try:
        decoded = base64.b64decode(payload, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if decoded == dummy:
        plain = real.reveal()
    else:
        user, sep, password = decoded.partition(":")
        if not sep or dummy not in (user, password):
            return None
        user = real.reveal() if user == dummy else user
        password = real.reveal() if password == dummy else password
        plain = f"{user}:{password}"
    return f"{word} {base64.b64encode(plain.encode()).decode('ascii')}".encode()
