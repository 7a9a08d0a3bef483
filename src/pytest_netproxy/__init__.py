"""pytest_netproxy: the pytest plugin of netproxy (SPEC §14).

The names a test annotates with: ``netproxy: NetproxyHandle``, ``FakeHost`` (from
``netproxy.fake_host``) and the ``FakeRequest`` items of ``FakeHost.requests``.
"""

from .fakehost import FakeHost, FakeRequest, Handler
from .handle import NetproxyHandle

__all__ = ["FakeHost", "FakeRequest", "Handler", "NetproxyHandle"]
