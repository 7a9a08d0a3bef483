"""Classify a tunnel's first bytes and read SNI/ALPN from a TLS ClientHello (SPEC §7.3); no I/O.

Not here: waiting for the bytes (the tunnel driver owns the 250 ms first-byte deadline),
canonicalising the SNI (``hosts``), deciding what to do with it (``plan_tunnel``).

Both functions are pure and accept the bytes peeked so far; feed them again with more bytes
when they ask for more. How TCP split the bytes never changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

__all__ = [
    "MAX_CLIENT_HELLO_BYTES",
    "MAX_PEEK_BYTES",
    "ClientHello",
    "FirstBytes",
    "classify_first_bytes",
    "parse_client_hello",
]

#: Largest ClientHello handshake message accepted. Real ones are 200 B to 2 KiB (browsers with
#: post-quantum key shares send about 1.8 KiB), so 64 KiB leaves ample headroom.
MAX_CLIENT_HELLO_BYTES: Final = 65_536

#: `parse_client_hello` never asks for more than this many bytes: past it, an unfinished
#: ClientHello is refused (even one split into tiny records), so a peek buffer is bounded.
MAX_PEEK_BYTES: Final = 2 * MAX_CLIENT_HELLO_BYTES

_CONTENT_HANDSHAKE: Final = 0x16
_HANDSHAKE_CLIENT_HELLO: Final = 0x01
_RECORD_HEADER: Final = 5
_MAX_RECORD_FRAGMENT: Final = 2**14  # RFC 8446 §5.1: plaintext records carry at most 2^14 bytes
_EXT_SERVER_NAME: Final = 0x0000
_EXT_ALPN: Final = 0x0010
_SNI_HOST_NAME: Final = 0x00


class FirstBytes(Enum):
    """What the first bytes of a tunnel look like."""

    TLS = "tls"
    OTHER = "other"
    NEED_MORE = "need_more"


@dataclass(frozen=True, slots=True)
class ClientHello:
    """The parts of a ClientHello the proxy acts on.

    Attributes:
        sni: the ``host_name`` server name exactly as sent (ASCII, not canonicalised), or
            ``None`` when the client sent no SNI (as clients connecting to an IP literal do).
        alpn: the offered ALPN protocol ids in client order; non-ASCII bytes are shown as
            ``\\xNN`` escapes.
    """

    sni: str | None
    alpn: tuple[str, ...]


def classify_first_bytes(data: bytes) -> FirstBytes:
    """Tell a TLS record header (``0x16 0x03 0x00..0x04``) from anything else.

    Args:
        data: the bytes peeked so far (possibly empty).

    Returns:
        ``TLS`` once three bytes form a handshake record header; ``OTHER`` as soon as a byte
        rules TLS out; ``NEED_MORE`` while every byte seen is consistent with TLS (including
        no bytes at all).
    """
    if not data:
        return FirstBytes.NEED_MORE
    if data[0] != _CONTENT_HANDSHAKE:
        return FirstBytes.OTHER
    if len(data) < 2:
        return FirstBytes.NEED_MORE
    if data[1] != 0x03:
        return FirstBytes.OTHER
    if len(data) < 3:
        return FirstBytes.NEED_MORE
    return FirstBytes.TLS if data[2] <= 0x04 else FirstBytes.OTHER


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Read SNI and ALPN from the ClientHello at the start of `data`.

    The ClientHello may be spread over several handshake records (fragments are reassembled);
    bytes after it are ignored.

    Args:
        data: every byte the client has sent so far, from the first one.

    Returns:
        The `ClientHello`, or ``None`` when more bytes are needed (never once `data` holds
        `MAX_PEEK_BYTES` or more).

    Raises:
        ValueError: the bytes are not a well-formed TLS ClientHello, or it is larger than
            `MAX_CLIENT_HELLO_BYTES`.
    """
    message = _reassemble_handshake(data)
    if message is None:
        if len(data) >= MAX_PEEK_BYTES:
            raise ValueError(f"no complete ClientHello within {MAX_PEEK_BYTES} bytes")
        return None
    return _parse_client_hello_body(message)


def _reassemble_handshake(data: bytes) -> bytes | None:
    """Return the body of the first handshake message, or ``None`` if it is not complete."""
    fragments = bytearray()
    pos = 0
    while True:
        header = data[pos : pos + _RECORD_HEADER]
        kind = classify_first_bytes(header)
        if kind is FirstBytes.OTHER:
            raise ValueError(f"not a TLS handshake record at offset {pos}: {header[:3].hex()}")
        if len(header) < _RECORD_HEADER:
            return None
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > _MAX_RECORD_FRAGMENT:
            raise ValueError(f"bad TLS record length {length} at offset {pos}")
        fragment = data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        if len(fragment) < length:
            return None
        pos += _RECORD_HEADER + length
        fragments += fragment
        if len(fragments) < 4:
            continue
        if fragments[0] != _HANDSHAKE_CLIENT_HELLO:
            raise ValueError(f"first handshake message is type {fragments[0]}, not ClientHello")
        size = int.from_bytes(fragments[1:4], "big")
        if size > MAX_CLIENT_HELLO_BYTES:
            raise ValueError(f"ClientHello of {size} bytes exceeds {MAX_CLIENT_HELLO_BYTES}")
        if len(fragments) >= 4 + size:
            return bytes(fragments[4 : 4 + size])


class _Reader:
    """Bounds-checked cursor over a byte string; every short read is a `ValueError`."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise ValueError(f"ClientHello truncated in {what}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, length_bytes: int, what: str) -> _Reader:
        return _Reader(self.take(self.uint(length_bytes, what), what))

    def take_rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def expect_end(self, what: str) -> None:
        if not self.at_end():
            raise ValueError(f"{len(self._data) - self._pos} unexpected bytes after {what}")


def _parse_client_hello_body(body: bytes) -> ClientHello:
    r = _Reader(body)
    if r.take(2, "legacy_version")[0] != 0x03:
        raise ValueError("ClientHello legacy_version is not 3.x")
    r.take(32, "random")
    r.vector(1, "legacy_session_id")
    r.vector(2, "cipher_suites")
    r.vector(1, "legacy_compression_methods")
    if r.at_end():  # extensions are optional before TLS 1.3 (RFC 5246 §7.4.1.2)
        return ClientHello(sni=None, alpn=())
    extensions = r.vector(2, "extensions")
    r.expect_end("extensions")

    seen: set[int] = set()
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    while not extensions.at_end():
        ext_type = extensions.uint(2, "extension type")
        ext = extensions.vector(2, f"extension {ext_type}")
        if ext_type in seen:  # RFC 8446 §4.2; two SNIs would let a client front a domain
            raise ValueError(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            sni = _parse_server_name(ext)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(ext)
    return ClientHello(sni=sni, alpn=alpn)


def _parse_server_name(ext: _Reader) -> str | None:
    """RFC 6066 §3: a list of (name_type, HostName); at most one ``host_name``."""
    names = ext.vector(2, "server_name_list")
    ext.expect_end("server_name_list")
    host: str | None = None
    while not names.at_end():
        name_type = names.uint(1, "server name type")
        name = names.vector(2, "server name").take_rest()
        if name_type != _SNI_HOST_NAME:
            continue
        if host is not None:
            raise ValueError("more than one host_name in server_name")
        if not name:
            raise ValueError("empty host_name in server_name")
        try:
            host = name.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"host_name in server_name is not ASCII: {name!r}") from None
    return host


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    """RFC 7301 §3.1: a non-empty list of non-empty protocol names."""
    names = ext.vector(2, "protocol_name_list")
    ext.expect_end("protocol_name_list")
    protocols: list[str] = []
    while not names.at_end():
        name = names.vector(1, "protocol name").take_rest()
        if not name:
            raise ValueError("empty ALPN protocol name")
        protocols.append(name.decode("ascii", "backslashreplace"))
    if not protocols:
        raise ValueError("empty ALPN protocol_name_list")
    return tuple(protocols)
