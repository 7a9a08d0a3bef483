"""pytest_netproxy: the pytest plugin of netproxy (SPEC §14)."""
