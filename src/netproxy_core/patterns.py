"""Domain pattern grammar → compiled matchers (SPEC §3.2). Pure: no I/O.

Grammar: ``example.com`` exact; ``*.example.com`` strict subdomains; ``**.example.com`` apex
plus subdomains; ``*`` / ``?`` anywhere else glob over the whole name (``*`` may cross dots);
IP literals and ``[v6]`` forms; CIDR ``10.0.0.0/8``; the global wildcard ``*`` (``[*]``,
``**.*``). Patterns are canonicalised with the same function as hosts.

Matching is linear in the host length: a glob is split at ``*`` into segments found left to
right (greedy leftmost is exact for ``*``/``?`` globs), never by a backtracking regex.

Not here: what a match means for a decision (`policy/engine.py`).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from .errors import ConfigError, InvalidHost
from .hosts import IPAddress, canonicalize_host, parse_ip, strip_zone, to_unicode

__all__ = ["Pattern", "PatternKind", "PatternSet", "compile_pattern", "is_global_wildcard"]


class PatternKind(enum.Enum):
    EXACT = "exact"  # a name or IP literal, no wildcard
    SUBDOMAINS = "subdomains"  # *.example.com
    APEX_AND_SUBDOMAINS = "apex_and_subdomains"  # **.example.com
    GLOB = "glob"  # * or ? inside the name
    CIDR = "cidr"
    GLOBAL = "global"  # *


_GLOBAL_FORMS: Final = frozenset({"*", "[*]", "[*.]", "[*].", "**.*", "**.[*]"})
_REJECT = re.compile(r"[\s{}\\]")
_GLOB_BODY = re.compile(r"[^\x00-\x20\x7f@/\\%\[\]{}:]+")


def is_global_wildcard(text: str) -> bool:
    """True for every spelling of "all hosts": ``*``, ``[*]``, ``**.*``, ``[*]:443`` …"""
    body = text.strip().lower()
    if body.startswith("[*]:") and body[4:].isdigit():
        return True
    return body in _GLOBAL_FORMS


@dataclass(frozen=True, slots=True)
class Pattern:
    """One compiled domain pattern.

    Attributes:
        text: the entry as written (for messages).
        kind: the pattern's form.
        value: canonical name / address / suffix / glob body (CIDR: the network text).
        zone: IPv6 zone for a scoped IP pattern, else None.
        unicode: the glob body is in U-labels and is matched against U-label hosts.
    """

    text: str
    kind: PatternKind
    value: str
    zone: str | None = None
    unicode: bool = False
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = field(
        default=None, compare=False
    )
    _globs: tuple[tuple[str, ...], ...] = field(default=(), compare=False, repr=False)

    @property
    def canonical(self) -> str:
        """The pattern's canonical spelling, e.g. ``**.example.com`` or ``fe80::1%eth0``."""
        match self.kind:
            case PatternKind.SUBDOMAINS:
                return f"*.{self.value}"
            case PatternKind.APEX_AND_SUBDOMAINS:
                return f"**.{self.value}"
            case PatternKind.GLOBAL:
                return "*"
            case _:
                return f"{self.value}%{self.zone}" if self.zone else self.value

    def matches(self, host: str) -> bool:
        """Whether this pattern matches a canonical host."""
        match self.kind:
            case PatternKind.EXACT:
                if self.zone is None and "%" in host:
                    return strip_zone(host) == self.value
                return host == self.canonical
            case PatternKind.SUBDOMAINS | PatternKind.APEX_AND_SUBDOMAINS | PatternKind.GLOB if (
                ":" in host
            ):
                # An IPv6 literal is never a name: without this, the zone of
                # `::ffff:1.2.3.4%x.allowed.com` would match `*.allowed.com`.
                return False
            case PatternKind.SUBDOMAINS:
                return host.endswith("." + self.value)
            case PatternKind.APEX_AND_SUBDOMAINS:
                return host == self.value or host.endswith("." + self.value)
            case PatternKind.GLOB:
                if self.unicode:
                    return self._glob_matches(to_unicode(host))
                return self._glob_matches(host) or (
                    "xn--" in host and self._glob_matches(to_unicode(host))
                )
            case PatternKind.CIDR:
                ip = parse_ip(host)
                return ip is not None and self.covers(ip)
            case PatternKind.GLOBAL:
                return True

    def _glob_matches(self, host: str) -> bool:
        return any(_glob_match(segments, host) for segments in self._globs)

    def covers(self, ip: IPAddress) -> bool:
        """Whether a CIDR pattern contains the address (False for other kinds)."""
        net = self.network
        return net is not None and ip.version == net.version and ip in net

    @property
    def names_exactly(self) -> bool:
        """An exact host/IP entry or a CIDR: counts as explicit allowlisting (SPEC §4.2 step 3)."""
        return self.kind in (PatternKind.EXACT, PatternKind.CIDR)


def _glob_match(segments: tuple[str, ...], host: str) -> bool:
    """Segments are the glob split at ``*``; ``?`` inside a segment matches one character."""
    if len(segments) == 1:
        return len(host) == len(segments[0]) and _seg_at(segments[0], host, 0)
    first, *middle, last = segments
    if len(host) < len(first) + len(last):
        return False
    if not _seg_at(first, host, 0) or not _seg_at(last, host, len(host) - len(last)):
        return False
    pos, end = len(first), len(host) - len(last)
    for seg in middle:
        found = _seg_find(seg, host, pos, end)
        if found < 0:
            return False
        pos = found + len(seg)
    return True


def _seg_at(seg: str, host: str, pos: int) -> bool:
    if "?" not in seg:
        return host.startswith(seg, pos)
    if pos + len(seg) > len(host):
        return False
    return all(c == "?" or c == host[pos + i] for i, c in enumerate(seg))


def _seg_find(seg: str, host: str, start: int, end: int) -> int:
    """Leftmost start of `seg` inside ``host[start:end]``, or -1 (``?`` = any one character)."""
    if "?" not in seg:
        return host.find(seg, start, end)
    # Shift-and: one pass over the host whatever the pattern; a scan that re-checks each
    # candidate costs O(len(host) * len(seg)) on hosts like "aaaa…" (`*a?a?…a?b*`).
    width = len(seg)
    if end - start < width:
        return -1
    wild, masks = 0, dict[str, int]()
    for i, c in enumerate(seg):
        if c == "?":
            wild |= 1 << i
        else:
            masks[c] = masks.get(c, 0) | 1 << i
    goal, state = 1 << (width - 1), 0
    for pos in range(start, end):
        state = ((state << 1) | 1) & (masks.get(host[pos], 0) | wild)
        if state & goal:
            return pos - width + 1
    return -1


def compile_pattern(text: str) -> Pattern:
    """Compile one domain entry; raises `ConfigError` naming the entry if it is invalid."""
    raw = text
    text = text.strip()
    if not text:
        raise _bad(raw, "empty pattern")
    if is_global_wildcard(text):
        return Pattern(raw, PatternKind.GLOBAL, "*")
    if _REJECT.search(text):
        raise _bad(raw, "whitespace, braces and backslashes are not allowed")
    if "/" in text:
        return _compile_cidr(raw, text)
    if text.startswith("["):
        return _compile_bracketed(raw, text)
    if text.count(":") >= 2:  # bare IPv6, maybe with a zone
        return _exact(raw, text)
    host = _drop_port(raw, text)
    if "[" in host or "]" in host:
        raise _bad(raw, "brackets are only allowed around an IPv6 literal")
    kind = PatternKind.EXACT
    if host.startswith("**."):
        kind, host = PatternKind.APEX_AND_SUBDOMAINS, host[3:]
    elif host.startswith("*."):
        kind, host = PatternKind.SUBDOMAINS, host[2:]
    if not host or host == ".":
        raise _bad(raw, "nothing after the wildcard prefix")
    if "**" in host:
        raise _bad(raw, "'**' is only allowed as the '**.' prefix")
    if "*" in host or "?" in host:
        if kind is not PatternKind.EXACT:
            prefix = "**." if kind is PatternKind.APEX_AND_SUBDOMAINS else "*."
            return _glob(raw, prefix + host)
        return _glob(raw, host)
    try:
        value = canonicalize_host(host)
    except InvalidHost as exc:
        raise _bad(raw, str(exc)) from None
    if kind is PatternKind.EXACT:
        return _exact(raw, value)
    if parse_ip(value) is not None:
        raise _bad(raw, "wildcard prefixes apply to names, not IP addresses")
    return Pattern(raw, kind, value)


def _glob(raw: str, body: str) -> Pattern:
    if body.removesuffix(".") in ("*", "**.*"):  # `*:443`, `**.*.`: the global wildcard with noise
        return Pattern(raw, PatternKind.GLOBAL, "*")
    globs: tuple[tuple[str, ...], ...]
    if body.startswith("**."):  # `**.x?` ≡ `x?` or `*.x?`
        apex, sub = _glob_body(raw, body[3:]), _glob_body(raw, "*." + body[3:])
        value, globs = f"**.{apex[0]}", (apex[1], sub[1])
    else:
        value, segments = _glob_body(raw, body)
        globs = (segments,)
    return Pattern(raw, PatternKind.GLOB, value, unicode=not value.isascii(), _globs=globs)


def _glob_body(raw: str, body: str) -> tuple[str, tuple[str, ...]]:
    if body.endswith("."):
        body = body[:-1]
    if body.isascii():
        body = body.lower()
    else:
        try:
            body = "".join(
                part if part in "*?" else _remap(part, raw) for part in re.split(r"([*?])", body)
            )
        except InvalidHost as exc:
            raise _bad(raw, str(exc)) from None
    if not _GLOB_BODY.fullmatch(body) or ".." in body or body.startswith("."):
        raise _bad(raw, "invalid characters or empty label")
    return body, tuple(body.split("*"))


def _remap(part: str, raw: str) -> str:
    import idna  # local: only unicode globs need it

    try:
        return idna.uts46_remap(part, std3_rules=False, transitional=False)
    except idna.IDNAError as exc:
        raise InvalidHost(str(exc), host=raw) from None


def _drop_port(raw: str, text: str) -> str:
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not (port.isascii() and port.isdigit()):
            raise _bad(raw, "a port must be digits")
        return host
    return text


def _compile_bracketed(raw: str, text: str) -> Pattern:
    end = text.find("]")
    if end < 0:
        raise _bad(raw, "missing ']'")
    inner, rest = text[1:end], text[end + 1 :]
    if rest not in ("", ".") and not (rest.startswith(":") and rest[1:].isdigit()):
        raise _bad(raw, "unexpected text after ']'")
    if inner.endswith("."):
        inner = inner[:-1]
    if "[" in inner or ":" not in inner:
        raise _bad(raw, "brackets are only allowed around an IPv6 literal")
    return _exact(raw, inner)


def _exact(raw: str, host: str) -> Pattern:
    try:
        value = canonicalize_host(host)
    except InvalidHost as exc:
        raise _bad(raw, str(exc)) from None
    address, sep, zone = value.partition("%")
    return Pattern(raw, PatternKind.EXACT, address, zone=zone if sep else None)


def _compile_cidr(raw: str, text: str) -> Pattern:
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _bad(raw, "'/' is only allowed in a CIDR block such as 10.0.0.0/8") from None
    return Pattern(raw, PatternKind.CIDR, str(network), network=network)


def _bad(raw: str, why: str) -> ConfigError:
    return ConfigError(f"invalid domain pattern {raw!r}: {why}", key=raw)


class PatternSet:
    """An ordered set of compiled patterns with a fast path for exact names."""

    __slots__ = ("_exact", "_has_global", "_others", "patterns")

    def __init__(self, patterns: Iterable[Pattern] = ()) -> None:
        self.patterns: tuple[Pattern, ...] = tuple(patterns)
        self._exact = frozenset(p.canonical for p in self.patterns if p.kind is PatternKind.EXACT)
        self._others = tuple(p for p in self.patterns if p.kind is not PatternKind.EXACT)
        self._has_global = any(p.kind is PatternKind.GLOBAL for p in self.patterns)

    def __repr__(self) -> str:
        return f"PatternSet({[p.canonical for p in self.patterns]!r})"

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches(self, host: str) -> bool:
        """Whether any pattern matches the canonical host (or the IPv4 it spells)."""
        if self._has_global:
            return True
        return any(self._matches(h) for h in _spellings(host))

    def _matches(self, host: str) -> bool:
        if host in self._exact:
            return True
        if "%" in host and strip_zone(host) in self._exact:
            return True
        return any(p.matches(host) for p in self._others)

    def names_exactly(self, host: str) -> bool:
        """An exact (non-wildcard) entry names this host, or a CIDR entry covers it."""
        for h in _spellings(host):
            if h in self._exact or ("%" in h and strip_zone(h) in self._exact):
                return True
            if any(p.kind is PatternKind.CIDR and p.matches(h) for p in self._others):
                return True
        return False

    def covers_address(self, ip: IPAddress) -> bool:
        """A CIDR entry contains this resolved address (or the IPv4 it spells)."""
        inner = _direct_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
        return any(p.covers(ip) or (inner is not None and p.covers(inner)) for p in self._others)


_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")


def _direct_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 host an IPv6 address reaches as such: mapped ``::ffff:a.b.c.d``, NAT64."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _spellings(host: str) -> tuple[str, ...]:
    """The host, plus its dotted-quad spelling for a mapped/NAT64 IPv6 literal, so an entry
    for ``10.0.0.1`` (or ``10.0.0.0/8``) also judges ``[::ffff:10.0.0.1]``."""
    if ":" not in host:
        return (host,)
    try:
        inner = _direct_ipv4(ipaddress.IPv6Address(strip_zone(host)))
    except ValueError:
        return (host,)
    return (host,) if inner is None else (host, str(inner))
