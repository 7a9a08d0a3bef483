"""The credential broker keeps a token away from the program that uses it (SPEC §8).

Run:  python examples/broker_demo.py

What happens, all on 127.0.0.1 (no internet needed):
1. A stand-in for https://api.github.com starts locally (certificate from a throwaway CA).
2. A netproxy proxy starts with `credential_broker = true`; `routes` sends api.github.com
   to the stand-in, and its CA is trusted for the proxy's outbound TLS.
3. A child process is started with `child_env(proxy, {"GH_TOKEN": <real token>})`. It sees
   only a dummy of the same shape, and sends `Authorization: Bearer $GH_TOKEN` to
   api.github.com and to another host.
4. The stand-in shows what arrived: the real token at api.github.com (swapped inside the
   intercepted TLS connection), the worthless dummy everywhere else.
"""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme

from netproxy_core import BackgroundProxy, ProxyConfig, child_env
from netproxy_core.config.model import Access

CHILD = """
import os, httpx
token = os.environ["GH_TOKEN"]
print(f"  child sees GH_TOKEN = {token}")
for url in ("https://api.github.com/user", "https://elsewhere.example/user"):
    httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=20)
"""


def main() -> None:
    real = "ghp_" + secrets.token_hex(18)  # stands in for your real token
    arrived: list[tuple[str, str]] = []

    class Origin(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            arrived.append((self.headers["host"], self.headers.get("authorization", "")))
            body = json.dumps({"ok": True}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ca = trustme.CA()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("api.github.com", "elsewhere.example").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"127.0.0.1:{server.server_address[1]}"

    with tempfile.TemporaryDirectory() as tmp:
        ca_file = Path(tmp) / "origin-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        config = ProxyConfig(
            proxy_url="127.0.0.1:0",
            enable_socks5=False,
            credential_broker=True,
            domains=(("api.github.com", Access.ALLOW), ("elsewhere.example", Access.ALLOW)),
            routes=(("api.github.com:443", origin), ("elsewhere.example:443", origin)),
            upstream_ca_files=(str(ca_file),),
        )
        with BackgroundProxy(config, home=Path(tmp) / "home") as proxy:
            env = child_env(proxy, {"PATH": "/usr/bin:/bin", "GH_TOKEN": real})
            print(f"parent holds the real token   {real}")
            subprocess.run([sys.executable, "-c", CHILD], env=env, check=True)
    server.shutdown()

    print("what the servers received:")
    for host, authorization in arrived:
        kind = "REAL token" if authorization == f"Bearer {real}" else "dummy"
        print(f"  {host:20} {authorization}   <- {kind}")
    assert arrived[0][1] == f"Bearer {real}" and real not in arrived[1][1]
    print("the child never saw the real token; only api.github.com received it.")


if __name__ == "__main__":
    main()
