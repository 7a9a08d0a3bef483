"""Sans-IO protocol machines and parsers (SPEC §5-§7): bytes in, events and bytes out, no I/O."""
