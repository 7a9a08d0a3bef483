"""THE host canonicaliser (SPEC §3.1) and public-address classification (SPEC §4.3).

Every surface — HTTP targets, Host headers, CONNECT, SOCKS, SNI, config patterns — passes
hosts through `canonicalize_host`, so two spellings of one destination can never be judged
differently. Pure: no I/O.

Not here: pattern grammar (`patterns.py`), policy order (`policy/engine.py`).
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Final

import idna

from .errors import InvalidHost

__all__ = [
    "IPAddress",
    "canonicalize_host",
    "embedded_ipv4",
    "format_host_port",
    "is_local_literal",
    "is_public_ip",
    "parse_ip",
    "split_host_port",
    "strip_zone",
    "to_unicode",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAX_NAME: Final = 253
_MAX_LABEL: Final = 63
_ASCII_LABEL = re.compile(r"[a-z0-9_-]+")
# A label that inet_aton would read as a number: decimal, octal (leading 0) or hex.
_NUMERIC_PART = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)")
_ZONE = re.compile(r"[A-Za-z0-9_.\-]+")
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f@/\\%]")


def split_host_port(text: str) -> tuple[str, int | None]:
    """Split ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address.

    Returns the host part (brackets removed, not yet canonical) and the port or None.

    Raises:
        InvalidHost: unbalanced brackets, junk after ``]`` or a port that is not 0–65535.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidHost(f"invalid host {text!r}: missing ']'", host=text)
        host, rest = text[1:end], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise InvalidHost(f"invalid host {text!r}: unexpected text after ']'", host=text)
        return host, _parse_port(rest[1:], text)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, _parse_port(port, text)
    return text, None


def _parse_port(port: str, text: str) -> int:
    if not port.isascii() or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise InvalidHost(f"invalid port in {text!r}", host=text)
    return int(port)


@lru_cache(maxsize=4096)
def canonicalize_host(text: str) -> str:
    """Return the one canonical spelling of a host, or raise `InvalidHost`.

    Accepted forms: a name (any case, IDNA U-labels or A-labels, full-width dots, one
    trailing dot), ``host:port`` (the port is dropped), ``[v6]``/``[v6]:port``, a bare IPv6
    address with an optional ``%zone`` (URL-escaped ``%25`` accepted), and IPv4 in every
    form libc's ``inet_aton`` accepts (``2130706433``, ``0x7f000001``, ``0177.0.0.1``,
    ``127.1``).

    Returns:
        Dotted-quad IPv4, compressed lower-case IPv6 (``%zone`` kept) or a lower-case
        A-label name without a trailing dot.
    """
    host, _ = split_host_port(text)
    if not host:
        raise InvalidHost(f"invalid host {text!r}: empty", host=text)
    if ":" in host:
        return _canonical_ipv6(host, text)
    if text.lstrip().startswith("["):
        raise InvalidHost(f"invalid host {text!r}: brackets hold only an IPv6 address", host=text)
    # Map before the trailing-dot rule so a full-width trailing dot ("a.com。") is one too.
    if not host.isascii():
        host = _map_unicode(host, text)
    if host.endswith("."):
        host = host[:-1]
        if not host or host.endswith("."):
            raise InvalidHost(f"invalid host {text!r}: empty label", host=text)
    if _FORBIDDEN.search(host):
        raise InvalidHost(f"invalid host {text!r}: forbidden character", host=text)
    labels = host.split(".")
    if _NUMERIC_PART.fullmatch(labels[-1]):
        return _canonical_ipv4(labels, text)
    return _canonical_name(labels, text)


def _map_unicode(host: str, text: str) -> str:
    try:
        return idna.uts46_remap(host, std3_rules=False, transitional=False)
    except idna.IDNAError as exc:
        raise InvalidHost(f"invalid host {text!r}: {exc}", host=text) from None


def _canonical_name(labels: list[str], text: str) -> str:
    out: list[str] = []
    for label in labels:
        if not label:
            raise InvalidHost(f"invalid host {text!r}: empty label", host=text)
        if label.isascii():
            label = label.lower()
            if not _ASCII_LABEL.fullmatch(label):
                raise InvalidHost(f"invalid host {text!r}: bad character in {label!r}", host=text)
            if label.startswith("xn--"):
                _check_alabel(label, text)
        else:
            try:
                label = idna.alabel(label).decode("ascii")
            except (idna.IDNAError, UnicodeError) as exc:
                raise InvalidHost(f"invalid host {text!r}: {exc}", host=text) from None
        if len(label) > _MAX_LABEL:
            raise InvalidHost(f"invalid host {text!r}: label longer than 63 octets", host=text)
        out.append(label)
    name = ".".join(out)
    if len(name) > _MAX_NAME:
        raise InvalidHost(f"invalid host {text!r}: name longer than 253 octets", host=text)
    return name


def _check_alabel(label: str, text: str) -> None:
    try:
        idna.decode(label)
    except (idna.IDNAError, UnicodeError) as exc:
        raise InvalidHost(
            f"invalid host {text!r}: bad A-label {label!r}: {exc}", host=text
        ) from None


def _canonical_ipv4(parts: list[str], text: str) -> str:
    """inet_aton semantics: 1–4 parts, the last one fills the remaining bytes."""
    if len(parts) > 4 or not all(_NUMERIC_PART.fullmatch(p) for p in parts):
        raise InvalidHost(f"invalid host {text!r}: not a valid IPv4 address", host=text)
    values = [_inet_number(p, text) for p in parts]
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        raise InvalidHost(f"invalid host {text!r}: IPv4 part out of range", host=text)
    number = last
    for i, v in enumerate(head):
        number |= v << (24 - 8 * i)
    return str(ipaddress.IPv4Address(number))


def _inet_number(part: str, text: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        if any(c in "89" for c in part):
            raise InvalidHost(f"invalid host {text!r}: bad octal {part!r}", host=text)
        return int(part, 8)
    return int(part)


def _canonical_ipv6(host: str, text: str) -> str:
    address, sep, zone = host.partition("%")
    if sep:
        if zone.startswith("25") and len(zone) > 2:
            zone = zone[2:]
            # Still escaped after one decode ("%2525x"): ambiguous, and its canonical form
            # would decode again, so reject it rather than guess.
            if zone.startswith("25") and len(zone) > 2:
                raise InvalidHost(f"invalid host {text!r}: doubly escaped IPv6 zone", host=text)
        if not _ZONE.fullmatch(zone):
            raise InvalidHost(f"invalid host {text!r}: bad IPv6 zone", host=text)
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        raise InvalidHost(f"invalid host {text!r}: not a valid IPv6 address", host=text) from None
    return f"{ip}%{zone}" if sep else str(ip)


def parse_ip(host: str) -> IPAddress | None:
    """The address of a canonical IP-literal host (zone dropped), or None for a name."""
    if ":" in host:
        return ipaddress.IPv6Address(strip_zone(host))
    if host[-1:].isdigit():
        try:
            return ipaddress.IPv4Address(host)
        except ValueError:
            return None
    return None


def strip_zone(host: str) -> str:
    """``fe80::1%eth0`` → ``fe80::1``; anything else unchanged."""
    return host.partition("%")[0]


def to_unicode(host: str) -> str:
    """The U-label spelling of a canonical name (for glob patterns written in Unicode)."""
    if "xn--" not in host:
        return host
    try:
        return idna.decode(host)
    except (idna.IDNAError, UnicodeError):
        return host


_NOT_PUBLIC_V4: Final = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
_NOT_PUBLIC_V6: Final = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/128",
        "::1/128",
        "100::/64",
        "2001:db8::/32",
        "3fff::/20",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
        "64:ff9b:1::/48",
    )
)
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside a mapped, compatible, NAT64 or 6to4 IPv6 address."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_ip(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (SPEC §4.3).

    IPv6 forms that embed IPv4 (mapped, compatible, NAT64, 6to4) are judged by the
    embedded address, so ``::ffff:127.0.0.1`` is as local as ``127.0.0.1``.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        inner = embedded_ipv4(ip)
        if inner is not None:
            return is_public_ip(inner)
        if any(ip in net for net in _NOT_PUBLIC_V6):
            return False
    elif any(ip in net for net in _NOT_PUBLIC_V4):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_private)


def is_local_literal(host: str) -> bool:
    """``localhost``, ``*.localhost`` or a non-public IP literal (canonical host)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    ip = parse_ip(host)
    return ip is not None and not is_public_ip(ip)


def format_host_port(host: str, port: int) -> str:
    """``example.com:443``; IPv6 in brackets: ``[::1]:443``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
