"""I/O edge: DNS, dialling, relaying, stream helpers."""
