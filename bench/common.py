"""Pieces the single-figure benchmark scripts share: starting `netproxy-core serve` in its
own process, and draining a download."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def start_netproxy(home: Path, *flags: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`serve` on an ephemeral HTTP port with `flags`; returns the process and its ready line."""
    cmd = [
        sys.executable,
        "-m",
        "netproxy_core",
        "serve",
        "--http-addr",
        "127.0.0.1:0",
        "--home",
        str(home),
        "--log-level",
        "warning",
        *flags,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def split_addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def receive(s: socket.socket, n: int) -> int:
    """Read up to `n` bytes into one reused buffer; returns how many arrived."""
    view = memoryview(bytearray(1 << 20))
    got = 0
    while got < n:
        k = s.recv_into(view)
        if not k:
            break
        got += k
    return got
