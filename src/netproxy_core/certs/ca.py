"""The MITM certificate authority and its public files (SPEC §7.1).

The CA private key lives only in process memory: it is never written (except by `write_pair`,
the explicit ``netproxy-core ca init``), logged, pickled or shown in a repr.

Not here: leaf certificates and their contexts (``certs.leaves``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import ssl
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NoReturn, SupportsIndex

import certifi
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from netproxy_core.certs.leaves import DEFAULT_LEAF_CACHE_SIZE, LeafCache
from netproxy_core.errors import ConfigError

__all__ = ["CA_COMMON_NAME", "CA_VALIDITY", "CertificateAuthority"]

CA_COMMON_NAME: Final = "netproxy MITM CA"
CA_VALIDITY: Final = dt.timedelta(days=3650)
_BACKDATE: Final = dt.timedelta(days=1)
_PEM_CERT_MARKER: Final = b"-----BEGIN CERTIFICATE-----"
_CERT_KEY: Final = "mitm.ca.certificate_file"
_KEY_KEY: Final = "mitm.ca.private_key_file"

_SigningKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


class CertificateAuthority:
    """A CA that signs leaf certificates for intercepted hosts.

    Make one with `generate` (in memory, per proxy or per test session) or `from_files` (a
    persistent ``mitm.ca``). Not picklable or copyable: that would serialise the key.
    """

    __slots__ = ("_aki", "_cert", "_cert_pem", "_key", "_leaves")

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: _SigningKey,
        *,
        leaf_cache_size: int = DEFAULT_LEAF_CACHE_SIZE,
    ) -> None:
        """Wrap a CA certificate and its key; prefer `generate` or `from_files`."""
        self._cert = certificate
        self._key = private_key
        self._cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
        try:
            ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(private_key.public_key())
        self._leaves = LeafCache(self, max_size=leaf_cache_size)

    @classmethod
    def generate(cls, *, leaf_cache_size: int = DEFAULT_LEAF_CACHE_SIZE) -> CertificateAuthority:
        """Make a fresh in-memory CA: ECDSA P-256, ``CN=netproxy MITM CA``, valid 10 years."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, leaf_cache_size=leaf_cache_size)

    @classmethod
    def from_files(
        cls,
        certificate_file: str | os.PathLike[str],
        private_key_file: str | os.PathLike[str],
        *,
        leaf_cache_size: int = DEFAULT_LEAF_CACHE_SIZE,
    ) -> CertificateAuthority:
        """Load a persistent CA (``mitm.ca``).

        Args:
            certificate_file: PEM CA certificate (basicConstraints ``CA:TRUE``).
            private_key_file: its unencrypted PEM private key (EC, RSA, Ed25519 or Ed448): a
                regular file, not a symlink, mode 0600 or stricter.

        Raises:
            ConfigError: naming the file and what to change.
        """
        cert_file, key_file = os.fspath(certificate_file), os.fspath(private_key_file)
        key_bytes = _read_private_key_file(key_file)

        def cert_err(problem: str) -> ConfigError:
            return _file_error(_CERT_KEY, cert_file, problem)

        def key_err(problem: str) -> ConfigError:
            return _file_error(_KEY_KEY, key_file, problem)

        try:
            cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        except OSError as exc:
            raise cert_err(f"cannot be read ({exc.strerror})") from None
        except ValueError:
            raise cert_err("is not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_bytes, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # The library's message is dropped on purpose: it must not echo key bytes.
            raise key_err("is not an unencrypted PEM private key") from None
        if not isinstance(key, _SigningKey):
            raise key_err(f"holds a {type(key).__name__}; use an EC, RSA or Ed25519 key")
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
            raise key_err(f"does not match the certificate {cert_file}; use the CA's own key")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = constraints.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise cert_err("is not a CA certificate (needs basicConstraints CA:TRUE)")
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.key_cert_sign:
            raise cert_err("has keyUsage without keyCertSign, so it cannot sign certificates")
        return cls(cert, key, leaf_cache_size=leaf_cache_size)

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self.common_name!r} sha256:{self.short_id}>"

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("a CertificateAuthority holds a private key; it cannot be pickled/copied")

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM-encoded."""
        return self._cert_pem

    @property
    def common_name(self) -> str:
        names = self._cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else self._cert.subject.rfc4514_string()

    @property
    def fingerprint(self) -> str:
        """Lower-case hex SHA-256 of the certificate's DER bytes."""
        return self._cert.fingerprint(hashes.SHA256()).hex()

    @property
    def short_id(self) -> str:
        """The first 16 hex digits of `fingerprint`, for logs and reprs."""
        return self.fingerprint[:16]

    @property
    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """The AKI extension value for certificates this CA issues."""
        return self._aki

    @property
    def leaves(self) -> LeafCache:
        return self._leaves

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign `builder` with the CA key (SHA-256, or none for EdDSA keys)."""
        algorithm = (
            None
            if isinstance(self._key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
            else hashes.SHA256()
        )
        return builder.sign(self._key, algorithm)

    def server_context(self, host: str) -> ssl.SSLContext:
        """The cached server context for canonical `host` (see `LeafCache.context_for`)."""
        return self._leaves.context_for(host)

    def write_public_files(
        self, home: Path, upstream_ca_files: Sequence[str | os.PathLike[str]] = ()
    ) -> tuple[Path, Path]:
        """Write ``ca-<h>.pem`` and ``ca-bundle-<h>.pem`` under ``home/proxy`` (SPEC §7.1, §9).

        ``<h>`` is the first 16 hex digits of the SHA-256 of the file's bytes, so a name always
        means the same bytes: an existing file is reused, never rewritten. Files are written
        atomically (temporary file + ``os.replace``) with mode 0644; the directory is made 0700
        when missing. The bundle is certifi's roots, then `upstream_ca_files`, then the CA.

        Returns:
            ``(ca_path, bundle_path)``.

        Raises:
            ConfigError: a target is a symlink or holds other bytes, an upstream CA file is
                unreadable or holds no PEM certificate, or the directory is not writable.
        """
        directory = _ensure_directory(Path(home) / "proxy")
        parts = [Path(certifi.where()).read_bytes()]
        for upstream in upstream_ca_files:
            name = os.fspath(upstream)
            try:
                data = Path(name).read_bytes()
            except OSError as exc:
                problem = f"cannot be read ({exc.strerror})"
                raise _file_error("upstream_ca_files", name, problem) from None
            if _PEM_CERT_MARKER not in data:
                raise _file_error("upstream_ca_files", name, "contains no PEM certificate")
            parts.append(data)
        parts.append(self._cert_pem)
        bundle = b"".join(p if p.endswith(b"\n") else p + b"\n" for p in parts)
        return (
            _write_content_addressed(directory, "ca", self._cert_pem),
            _write_content_addressed(directory, "ca-bundle", bundle),
        )

    def write_pair(self, directory: Path) -> tuple[Path, Path]:
        """Write ``DIR/ca.pem`` (0644) and ``DIR/ca.key`` (0600) for ``mitm.ca``.

        This is the one place a CA key is written, on explicit request
        (``netproxy-core ca init DIR``). Neither file is ever overwritten.

        Returns:
            ``(cert_path, key_path)``.

        Raises:
            ConfigError: either file already exists or cannot be created.
        """
        directory = Path(directory)
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise ConfigError(
                    f"{path} already exists; ca init never overwrites, pick an empty directory",
                    file=str(path),
                )
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            problem = f"cannot create {directory}: {exc.strerror}"
            raise ConfigError(problem, file=str(directory)) from None
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _create_exclusive(key_path, key_pem, 0o600)
        try:
            _create_exclusive(cert_path, self._cert_pem, 0o644)
        except BaseException:
            key_path.unlink()
            raise
        return cert_path, key_path


def _file_error(key: str, file: str, problem: str) -> ConfigError:
    """A `ConfigError` whose message starts with the config key and the file."""
    return ConfigError(f"{key} {file}: {problem}", key=key, file=file)


def _read_private_key_file(path: str) -> bytes:
    """Read a CA key file, insisting on a regular, non-symlink file readable only by us."""

    def err(problem: str) -> ConfigError:
        return _file_error(_KEY_KEY, path, problem)

    try:
        st = os.lstat(path)
    except OSError as exc:
        raise err(f"cannot be read ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise err("is a symlink; point private_key_file at the real file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise err(f"cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # re-checked on the open file: no race with a swap
        if not stat.S_ISREG(st.st_mode):
            raise err("is not a regular file")
        if st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise err(f"has mode {mode:04o}, readable by others; run `chmod 600 {path}`")
        return f.read()


def _ensure_directory(directory: Path) -> Path:
    try:
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except OSError as exc:
        raise ConfigError(
            f"cannot create {directory}: {exc.strerror}; set --home to a writable directory",
            file=str(directory),
        ) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"{directory} is a symlink or not a directory; remove it", file=str(directory)
        )
    return directory


def _write_content_addressed(directory: Path, stem: str, data: bytes) -> Path:
    path = directory / f"{stem}-{hashlib.sha256(data).hexdigest()[:16]}.pem"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        _write_atomic(path, data)
        return path
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is a symlink or not a regular file; remove it", file=str(path))
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if f.read() != data:
            raise ConfigError(
                f"{path} holds other bytes than its name promises; remove it", file=str(path)
            )
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, then ``os.replace``.

    A concurrent writer of the same name writes the same bytes (the name is their hash), so
    the replace can only swap identical content; ``os.replace`` never follows a symlink.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise ConfigError(
            f"{path} already exists; ca init never overwrites", file=str(path)
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}", file=str(path)) from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have removed bits; never added any
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
