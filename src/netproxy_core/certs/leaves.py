"""Leaf certificates for intercepted hosts: one shared key per CA, an LRU of contexts (SPEC §7.2).

Not here: the CA itself and its public files (``certs.ca``); the TLS handshake (``handlers``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import ssl
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from netproxy_core.errors import InvalidHost

if TYPE_CHECKING:
    from netproxy_core.certs.ca import CertificateAuthority

__all__ = ["DEFAULT_LEAF_CACHE_SIZE", "LEAF_VALIDITY", "LeafCache"]

DEFAULT_LEAF_CACHE_SIZE: Final = 1024
#: Clients that cap certificate lifetimes (Apple: 398 days, soon shorter) accept 90 days.
LEAF_VALIDITY: Final = dt.timedelta(days=90)
_BACKDATE: Final = dt.timedelta(days=1)  # tolerate clients whose clocks run a little slow
_MAX_CN_LENGTH: Final = 64  # RFC 5280 ub-common-name


class LeafCache:
    """Issue and cache server `ssl.SSLContext` objects, one per host, for one CA.

    Every leaf of a cache shares one EC P-256 key, generated when the cache is made and never
    serialised anywhere but into memory (SPEC §7.2: issuing a leaf is then one signature, not a
    key generation). Thread-safe.

    Args:
        ca: the issuing CA.
        max_size: how many per-host contexts to keep; the least recently used goes first.
    """

    __slots__ = ("_ca", "_contexts", "_key", "_key_pem", "_lock", "_max_size", "_ski")

    def __init__(
        self, ca: CertificateAuthority, *, max_size: int = DEFAULT_LEAF_CACHE_SIZE
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, not {max_size}")
        self._ca = ca
        self._max_size = max_size
        self._key = ec.generate_private_key(ec.SECP256R1())
        # Serialised once: re-encoding the key per host would cost as much as signing the leaf.
        self._key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<LeafCache of {self._ca.short_id}: {len(self)}/{self._max_size} hosts>"

    def __len__(self) -> int:
        return len(self._contexts)

    @property
    def max_size(self) -> int:
        return self._max_size

    def context_for(self, host: str) -> ssl.SSLContext:
        """Return the server context presenting a leaf for `host`, issuing it on first use.

        Args:
            host: a canonical host (SPEC §3.1): an IPv4 dotted quad, a compressed IPv6 address
                (an ``%zone`` suffix is ignored), or a lower-case A-label DNS name.

        Returns:
            A server-side context: TLS 1.2+, ALPN ``http/1.1``, the leaf and the shared key.
            The same object is returned for the same host while it stays cached.

        Raises:
            InvalidHost: `host` is empty or contains a wildcard.
        """
        with self._lock:
            context = self._contexts.get(host)
            if context is not None:
                self._contexts.move_to_end(host)
                return context
            context = self._new_context(host)
            self._contexts[host] = context
            while len(self._contexts) > self._max_size:
                self._contexts.popitem(last=False)
            return context

    def issue(self, host: str) -> x509.Certificate:
        """Sign a new leaf certificate for `host` (see `context_for`) with the shared key."""
        if not host or "*" in host:
            raise InvalidHost(f"cannot issue a leaf certificate for {host!r}", host=host)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host.partition("%")[0]))
        except ValueError:
            san = x509.DNSName(host)
        name = (
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
            if len(host) <= _MAX_CN_LENGTH
            else x509.Name([])
        )
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(self._ca.certificate.subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + LEAF_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # RFC 5280 §4.2.1.6: the SAN is critical when the subject is empty.
            .add_extension(x509.SubjectAlternativeName([san]), critical=not name)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_DIGITAL_SIGNATURE_ONLY, critical=True)
            .add_extension(self._ca.authority_key_identifier, critical=False)
            .add_extension(self._ski, critical=False)
        )
        return self._ca.sign(builder)

    def _new_context(self, host: str) -> ssl.SSLContext:
        leaf = self.issue(host).public_bytes(serialization.Encoding.PEM)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        with _memory_file(leaf) as cert_path, _memory_file(self._key_pem) as key_path:
            context.load_cert_chain(cert_path, key_path)
        return context


_DIGITAL_SIGNATURE_ONLY: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """Yield a path that reads back `data` without `data` ever reaching a filesystem.

    Why: `ssl.SSLContext.load_cert_chain` only accepts paths, and the leaf key must never touch
    disk (SPEC §7.1). On Linux the bytes live in an anonymous ``memfd`` opened through
    ``/proc/self/fd/N`` (re-openable, so OpenSSL may read it more than once). Elsewhere they go
    through a pipe read via ``/dev/fd/N``: a PEM key or certificate is well under the smallest
    pipe buffer (4 KiB), so the write cannot block; a pipe can be read once only, hence one
    call per file. The descriptors are closed on exit.
    """
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and sys.platform.startswith("linux"):
        fd: int = memfd_create("netproxy-leaf", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    read_fd, write_fd = os.pipe()
    try:
        try:
            _write_all(write_fd, data)
        finally:
            os.close(write_fd)
        yield f"/dev/fd/{read_fd}"
    finally:
        os.close(read_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
