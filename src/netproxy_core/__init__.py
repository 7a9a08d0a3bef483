"""netproxy_core: put every network request a program makes under a policy (SPEC §13).

The public names load on first use (PEP 562), so ``python -m netproxy_core serve`` pays only
for the modules it needs before its listeners are bound.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from .lazy import lazy_names

if TYPE_CHECKING:
    from .audit import BlockedRecord, PolicyDecisionEvent
    from .background import BackgroundProxy
    from .broker import CredentialBroker, brokered_dummy_env_keys
    from .certs import CertificateAuthority
    from .child_env import child_env, strip_managed_env
    from .config.loader import load_config
    from .config.model import Mode, ProxyConfig
    from .errors import ClientProtocolError, ConfigError, InvalidHost, NetproxyError, UpstreamError
    from .hosts import canonicalize_host
    from .policy.model import (
        Decision,
        NetworkDecision,
        NetworkPolicyRequest,
        Protocol,
        Reason,
        Source,
    )
    from .proxy import NetworkProxy, ProxyHandle

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY: dict[str, str] = {
    "BlockedRecord": "audit",
    "PolicyDecisionEvent": "audit",
    "BackgroundProxy": "background",
    "CredentialBroker": "broker",
    "brokered_dummy_env_keys": "broker",
    "CertificateAuthority": "certs",
    "child_env": "child_env",
    "strip_managed_env": "child_env",
    "load_config": "config.loader",
    "Mode": "config.model",
    "ProxyConfig": "config.model",
    "ClientProtocolError": "errors",
    "ConfigError": "errors",
    "InvalidHost": "errors",
    "NetproxyError": "errors",
    "UpstreamError": "errors",
    "canonicalize_host": "hosts",
    "Decision": "policy.model",
    "NetworkDecision": "policy.model",
    "NetworkPolicyRequest": "policy.model",
    "Protocol": "policy.model",
    "Reason": "policy.model",
    "Source": "policy.model",
    "NetworkProxy": "proxy",
    "ProxyHandle": "proxy",
}

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


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)


class _Package(types.ModuleType):
    """Keeps ``netproxy_core.child_env`` the function, as the eager imports always had it.

    Loading the submodule of the same name makes the import system set it as this package's
    attribute; the function takes its place (``netproxy_core.child_env`` stays in `sys.modules`).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "child_env" and isinstance(value, types.ModuleType):
            value = value.child_env
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
