"""`netproxy-core serve` as a real subprocess, shared by the CLI, admin, audit and load tests.

`Server` starts it with stdout and stderr pumped into queues (``None`` marks the end of a
stream); `serving()` runs one on ephemeral ports for a `with` block and stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXE = shutil.which("netproxy-core")
CLI = [EXE] if EXE else [sys.executable, "-m", "netproxy_core"]
EPHEMERAL = ("--http-addr", "127.0.0.1:0", "--socks-addr", "127.0.0.1:0")


def clean_env(home: Path) -> dict[str, str]:
    """This process's environment without proxy variables, with `home` as NETPROXY_HOME."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NETPROXY_HOME"] = str(home)
    return env


class Server:
    """`netproxy-core serve …` with the ready line parsed and stderr collected line by line."""

    def __init__(self, args: list[str], home: Path) -> None:
        self.home = home
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--home", str(home), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(home),
            start_new_session=True,
        )
        self.stdout: queue.Queue[str | None] = queue.Queue()
        self.stderr: queue.Queue[str | None] = queue.Queue()
        self.stderr_lines: list[str] = []
        for stream, q in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()
        self.ready_raw = ""
        self.ready: dict[str, Any] = {}

    @staticmethod
    def _pump(stream: Any, q: queue.Queue[str | None]) -> None:
        for line in stream:
            q.put(line)
        q.put(None)

    def wait_ready(self, timeout: float = 20) -> dict[str, Any]:
        line = self.stdout.get(timeout=timeout)
        assert line is not None, f"serve exited: {self.drain_stderr()}"
        self.ready_raw = line
        self.ready = json.loads(line)
        return self.ready

    def wait_stderr(self, *needles: str, timeout: float = 20) -> str:
        """The next stderr line containing one of `needles` (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.stderr.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"serve exited before logging {needles!r}: {self.stderr_lines}"
            self.stderr_lines.append(line)
            if any(n in line for n in needles):
                return line

    def drain_stderr(self) -> str:
        try:
            while (line := self.stderr.get(timeout=2)) is not None:
                self.stderr_lines.append(line)
        except queue.Empty:
            pass
        return "".join(self.stderr_lines)

    @property
    def http(self) -> tuple[str, int]:
        host, _, port = self.ready["http"].rpartition(":")
        return host, int(port)

    def terminate(self, timeout: float = 20) -> None:
        """SIGTERM (graceful), then kill if it does not exit within `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            assert stream is not None
            stream.close()


@contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[Server]:
    """A ready `serve` on ephemeral ports for the block; SIGTERM on the way out."""
    server = Server([*EPHEMERAL, *args], tmp_path / "home")
    try:
        server.wait_ready(timeout=30)
        yield server
    finally:
        server.terminate()
