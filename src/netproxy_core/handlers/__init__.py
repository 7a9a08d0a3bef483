"""Per-connection I/O drivers and the one decision path."""
