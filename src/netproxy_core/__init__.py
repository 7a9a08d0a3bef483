"""netproxy_core: put every network request a program makes under a policy (SPEC §13)."""

from .audit import BlockedRecord, PolicyDecisionEvent
from .background import BackgroundProxy
from .broker import CredentialBroker, brokered_dummy_env_keys
from .certs import CertificateAuthority
from .child_env import child_env, strip_managed_env
from .config.loader import load_config
from .config.model import Mode, ProxyConfig
from .errors import ClientProtocolError, ConfigError, InvalidHost, NetproxyError, UpstreamError
from .hosts import canonicalize_host
from .policy.model import Decision, NetworkDecision, NetworkPolicyRequest, Protocol, Reason, Source
from .proxy import NetworkProxy, ProxyHandle

__version__ = "0.1.0"

__all__ = [
    "BackgroundProxy",
    "BlockedRecord",
    "CertificateAuthority",
    "ClientProtocolError",
    "ConfigError",
    "CredentialBroker",
    "Decision",
    "InvalidHost",
    "Mode",
    "NetproxyError",
    "NetworkDecision",
    "NetworkPolicyRequest",
    "NetworkProxy",
    "PolicyDecisionEvent",
    "Protocol",
    "ProxyConfig",
    "ProxyHandle",
    "Reason",
    "Source",
    "UpstreamError",
    "__version__",
    "brokered_dummy_env_keys",
    "canonicalize_host",
    "child_env",
    "load_config",
    "strip_managed_env",
]
