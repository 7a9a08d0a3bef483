"""The MITM CA and its leaf certificates (SPEC §7.1, §7.2)."""

from netproxy_core.certs.ca import CertificateAuthority
from netproxy_core.certs.leaves import LeafCache

__all__ = ["CertificateAuthority", "LeafCache"]
