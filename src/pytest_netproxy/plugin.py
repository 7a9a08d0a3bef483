"""pytest11 entry point of netproxy (SPEC §14)."""
