"""Tests for `netproxy_core.certs` (SPEC §7.1, §7.2): fields, real handshakes, files, leaks."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import ipaddress
import os
import pickle
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import certifi
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from netproxy_core.certs import CertificateAuthority, LeafCache
from netproxy_core.errors import ConfigError, InvalidHost

DAY = dt.timedelta(days=1)
SLACK = dt.timedelta(minutes=5)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


def leaf_of(ca: CertificateAuthority, host: str) -> x509.Certificate:
    return ca.leaves.issue(host)


# --- certificate fields -----------------------------------------------------------------------


def test_ca_fields(ca: CertificateAuthority) -> None:
    cert = ca.certificate
    assert cert.subject.rfc4514_string() == "CN=netproxy MITM CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    now = dt.datetime.now(dt.UTC)
    assert abs(cert.not_valid_before_utc - (now - DAY)) < SLACK
    assert abs(cert.not_valid_after_utc - (now + dt.timedelta(days=3650))) < SLACK
    assert ca.cert_pem == cert.public_bytes(serialization.Encoding.PEM)
    assert ca.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert ca.short_id == ca.fingerprint[:16]


@pytest.mark.parametrize(
    ("host", "san"),
    [
        pytest.param("api.example.test", x509.DNSName("api.example.test"), id="dns"),
        pytest.param("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1")), id="ipv4"),
        pytest.param("2001:db8::1", x509.IPAddress(ipaddress.ip_address("2001:db8::1")), id="v6"),
        pytest.param("fe80::1%eth0", x509.IPAddress(ipaddress.ip_address("fe80::1")), id="zone"),
        pytest.param("xn--bcher-kva.example", x509.DNSName("xn--bcher-kva.example"), id="idna"),
    ],
)
def test_leaf_fields(ca: CertificateAuthority, host: str, san: x509.GeneralName) -> None:
    leaf = leaf_of(ca, host)
    leaf.verify_directly_issued_by(ca.certificate)
    assert leaf.issuer == ca.certificate.subject
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [san]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    now = dt.datetime.now(dt.UTC)
    assert abs(leaf.not_valid_before_utc - (now - DAY)) < SLACK
    assert abs(leaf.not_valid_after_utc - (now + dt.timedelta(days=90))) < SLACK


def test_long_name_gets_empty_subject_and_critical_san(ca: CertificateAuthority) -> None:
    host = "a" * 63 + "." + "b" * 63 + ".example"
    leaf = leaf_of(ca, host)
    assert len(leaf.subject) == 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [host]


def test_leaves_share_one_key_but_not_serials(ca: CertificateAuthority) -> None:
    a, b = leaf_of(ca, "a.example"), leaf_of(ca, "b.example")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert a.public_key().public_bytes(*spki) == b.public_key().public_bytes(*spki)
    assert a.serial_number != b.serial_number
    other = CertificateAuthority.generate()
    assert leaf_of(other, "a.example").public_key().public_bytes(*spki) != (
        a.public_key().public_bytes(*spki)
    )


@pytest.mark.parametrize("host", ["", "*.example.com", "*"])
def test_no_wildcard_or_empty_leaves(ca: CertificateAuthority, host: str) -> None:
    with pytest.raises(InvalidHost):
        ca.server_context(host)


def test_server_context_settings(ca: CertificateAuthority) -> None:
    ctx = ca.server_context("settings.example")
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.protocol is ssl.PROTOCOL_TLS_SERVER


# --- real handshakes --------------------------------------------------------------------------


@contextmanager
def tls_server(ctx: ssl.SSLContext) -> Iterator[int]:
    """Serve one TLS connection on 127.0.0.1:0 in a thread; yield the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the negative controls abort the handshake on purpose

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(10)


def connect(port: int, server_hostname: str, cadata: str | None) -> tuple[bytes, str | None]:
    client = ssl.create_default_context(cadata=cadata)
    client.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        return tls.recv(2), tls.selected_alpn_protocol()


@pytest.mark.parametrize("host", ["api.example.test", "127.0.0.1"], ids=["dns", "ip"])
def test_handshake_verifies_with_only_the_ca(ca: CertificateAuthority, host: str) -> None:
    with tls_server(ca.server_context(host)) as port:
        assert connect(port, host, ca.cert_pem.decode()) == (b"ok", "http/1.1")


@pytest.mark.parametrize("host", ["api.example.test", "127.0.0.1"], ids=["dns", "ip"])
def test_handshake_fails_for_another_hostname(ca: CertificateAuthority, host: str) -> None:
    with (
        tls_server(ca.server_context(host)) as port,
        pytest.raises(ssl.SSLCertVerificationError, match="mismatch"),
    ):
        connect(port, "other.example.test", ca.cert_pem.decode())


@pytest.mark.skipif(not os.path.exists("/dev/fd"), reason="the pipe fallback reads /dev/fd/N")
def test_pipe_fallback_without_memfd(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "memfd_create", raising=False)
    ctx = LeafCache(ca, max_size=1).context_for("pipe.example")
    with tls_server(ctx) as port:
        assert connect(port, "pipe.example", ca.cert_pem.decode()) == (b"ok", "http/1.1")


def test_handshake_fails_without_trusting_the_ca(ca: CertificateAuthority) -> None:
    stranger = CertificateAuthority.generate()
    with (
        tls_server(ca.server_context("api.example.test")) as port,
        pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"),
    ):
        connect(port, "api.example.test", stranger.cert_pem.decode())


def test_handshake_fails_with_system_roots_only(ca: CertificateAuthority) -> None:
    with (
        tls_server(ca.server_context("api.example.test")) as port,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        connect(port, "api.example.test", Path(certifi.where()).read_text())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_openssl_verifies_leaf_as_tls_server(ca: CertificateAuthority, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "leaf.pem").write_bytes(
        leaf_of(ca, "api.example.test").public_bytes(serialization.Encoding.PEM)
    )

    def verify(hostname: str) -> subprocess.CompletedProcess[str]:
        args = ["openssl", "verify", "-x509_strict", "-purpose", "sslserver"]
        args += ["-verify_hostname", hostname, "-CAfile", "ca.pem", "leaf.pem"]
        return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, check=False)

    assert verify("api.example.test").returncode == 0, verify("api.example.test").stderr
    assert verify("other.example.test").returncode != 0


# --- LRU --------------------------------------------------------------------------------------


def test_same_host_same_context(ca: CertificateAuthority) -> None:
    assert ca.server_context("lru.example") is ca.server_context("lru.example")
    assert ca.leaves.max_size == 1024


def test_lru_evicts_least_recently_used(ca: CertificateAuthority) -> None:
    cache = LeafCache(ca, max_size=3)
    a, b, _ = (cache.context_for(h) for h in ("a.test", "b.test", "c.test"))
    assert cache.context_for("a.test") is a  # a is now the most recent
    cache.context_for("d.test")  # evicts b
    assert len(cache) == 3
    assert cache.context_for("a.test") is a
    assert cache.context_for("b.test") is not b


def test_lru_size_must_be_positive(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="max_size"):
        LeafCache(ca, max_size=0)


# --- persistent CA: write_pair / from_files ---------------------------------------------------


@pytest.fixture
def pair(ca: CertificateAuthority, tmp_path: Path) -> tuple[Path, Path]:
    return ca.write_pair(tmp_path / "ca")


def test_write_pair_modes_and_round_trip(ca: CertificateAuthority, pair: tuple[Path, Path]) -> None:
    cert_file, key_file = pair
    assert (cert_file.name, key_file.name) == ("ca.pem", "ca.key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_file.stat().st_mode) == 0o644
    loaded = CertificateAuthority.from_files(str(cert_file), str(key_file))
    assert loaded.fingerprint == ca.fingerprint
    ctx = loaded.server_context("persist.example")
    with tls_server(ctx) as port:
        assert connect(port, "persist.example", ca.cert_pem.decode())[0] == b"ok"


def test_write_pair_never_overwrites(ca: CertificateAuthority, pair: tuple[Path, Path]) -> None:
    cert_file, key_file = pair
    before = key_file.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        CertificateAuthority.generate().write_pair(cert_file.parent)
    assert key_file.read_bytes() == before


def test_write_pair_refuses_when_only_the_cert_exists(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    (tmp_path / "ca.pem").write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"ca\.pem"):
        ca.write_pair(tmp_path)
    assert not (tmp_path / "ca.key").exists()


def test_from_files_rejects_symlinked_key(pair: tuple[Path, Path], tmp_path: Path) -> None:
    link = tmp_path / "link.key"
    link.symlink_to(pair[1])
    with pytest.raises(ConfigError, match="symlink") as info:
        CertificateAuthority.from_files(str(pair[0]), str(link))
    assert str(link) in str(info.value) and info.value.file == str(link)


def test_from_files_rejects_group_readable_key(pair: tuple[Path, Path]) -> None:
    pair[1].chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        CertificateAuthority.from_files(str(pair[0]), str(pair[1]))
    assert str(pair[1]) in str(info.value) and "0644" in str(info.value)


def test_from_files_accepts_stricter_key_mode(pair: tuple[Path, Path]) -> None:
    pair[1].chmod(0o400)
    CertificateAuthority.from_files(str(pair[0]), str(pair[1]))


def test_from_files_rejects_mismatched_key(pair: tuple[Path, Path], tmp_path: Path) -> None:
    _, other_key = CertificateAuthority.generate().write_pair(tmp_path / "other")
    with pytest.raises(ConfigError, match="does not match") as info:
        CertificateAuthority.from_files(str(pair[0]), str(other_key))
    assert str(other_key) in str(info.value)


def test_from_files_rejects_non_ca_certificate(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + DAY)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with pytest.raises(ConfigError, match="not a CA") as info:
        CertificateAuthority.from_files(str(cert_file), str(key_file))
    assert str(cert_file) in str(info.value)


def test_from_files_rejects_garbage_and_missing(pair: tuple[Path, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    fd = os.open(junk, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        CertificateAuthority.from_files(str(pair[0]), str(junk))
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        CertificateAuthority.from_files(str(junk), str(pair[1]))
    with pytest.raises(ConfigError, match="cannot be read"):
        CertificateAuthority.from_files(str(pair[0]), str(tmp_path / "missing"))


# --- public files -----------------------------------------------------------------------------


def content_name(stem: str, data: bytes) -> str:
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:16]}.pem"


def test_write_public_files(ca: CertificateAuthority, tmp_path: Path) -> None:
    upstream = tmp_path / "corp-root.pem"
    upstream.write_bytes(CertificateAuthority.generate().cert_pem)
    home = tmp_path / "home"
    ca_file, bundle_file = ca.write_public_files(home, [str(upstream)])
    assert ca_file.parent == bundle_file.parent == home / "proxy"
    assert stat.S_IMODE((home / "proxy").stat().st_mode) == 0o700
    assert ca_file.read_bytes() == ca.cert_pem
    bundle = bundle_file.read_bytes()
    assert ca_file.name == content_name("ca", ca.cert_pem)
    assert bundle_file.name == content_name("ca-bundle", bundle)
    roots = Path(certifi.where()).read_bytes()
    assert bundle.startswith(roots)
    assert bundle.index(upstream.read_bytes()) > len(roots) - 1
    assert bundle.endswith(ca.cert_pem)
    for path in (ca_file, bundle_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in (home / "proxy").iterdir()) == sorted(
        [ca_file.name, bundle_file.name]
    ), "temporary files left behind"


def test_write_public_files_is_idempotent(ca: CertificateAuthority, tmp_path: Path) -> None:
    first = ca.write_public_files(tmp_path)
    inodes = [p.stat().st_ino for p in first]
    assert ca.write_public_files(tmp_path) == first
    assert [p.stat().st_ino for p in first] == inodes, "an existing file was rewritten"
    other = CertificateAuthority.generate().write_public_files(tmp_path)
    assert set(first).isdisjoint(other)
    assert len(list((tmp_path / "proxy").iterdir())) == 4


def test_write_public_files_refuses_symlinks(ca: CertificateAuthority, tmp_path: Path) -> None:
    proxy = tmp_path / "proxy"
    proxy.mkdir()
    target = tmp_path / "elsewhere.pem"
    target.write_bytes(ca.cert_pem)
    (proxy / content_name("ca", ca.cert_pem)).symlink_to(target)
    with pytest.raises(ConfigError, match="symlink"):
        ca.write_public_files(tmp_path)

    linked_home = tmp_path / "h2"
    linked_home.mkdir()
    (linked_home / "proxy").symlink_to(proxy)
    with pytest.raises(ConfigError, match="symlink"):
        ca.write_public_files(linked_home)


def test_write_public_files_never_overwrites_other_bytes(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    proxy = tmp_path / "proxy"
    proxy.mkdir()
    squatter = proxy / content_name("ca", ca.cert_pem)
    squatter.write_bytes(b"other bytes")
    with pytest.raises(ConfigError, match="other bytes"):
        ca.write_public_files(tmp_path)
    assert squatter.read_bytes() == b"other bytes"


def test_write_public_files_bad_upstream(ca: CertificateAuthority, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for bad in (not_pem, tmp_path / "missing.pem"):
        with pytest.raises(ConfigError, match="upstream_ca_files") as info:
            ca.write_public_files(tmp_path / "home", [str(bad)])
        assert info.value.file == str(bad)


# --- never leak the keys ----------------------------------------------------------------------


def test_no_private_key_reaches_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    fresh = CertificateAuthority.generate()
    fresh.write_public_files(tmp_path / "home")
    for i in range(10):
        fresh.server_context(f"h{i}.example")
    fresh.server_context("10.0.0.1")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_issuing_leaves_leaks_no_descriptors() -> None:
    fresh = CertificateAuthority.generate()
    before = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        fresh.server_context(f"fd{i}.example")
    assert len(os.listdir("/proc/self/fd")) == before


def test_repr_and_pickle_never_reveal_the_key(
    ca: CertificateAuthority, pair: tuple[Path, Path]
) -> None:
    key_lines = [
        line for line in pair[1].read_text().splitlines() if line and not line.startswith("-----")
    ]
    ca.server_context("repr.example")
    for text in (repr(ca), str(ca), repr(ca.leaves), str(ca.leaves)):
        assert "PRIVATE" not in text
        assert not any(line in text for line in key_lines)
        assert ca.short_id in text
    with pytest.raises(TypeError, match="private key"):
        pickle.dumps(ca)
    with pytest.raises(TypeError, match="private key"):
        copy.copy(ca)
