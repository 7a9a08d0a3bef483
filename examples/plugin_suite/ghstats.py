"""ghstats: a tiny CLI over the GitHub REST API (the program the example suite sandboxes).

    python3 ghstats.py stars OWNER/REPO      # print the star count
    python3 ghstats.py star OWNER/REPO       # star the repository (needs GH_TOKEN)

It reads GH_TOKEN, honours HTTPS_PROXY and SSL_CERT_FILE like any well-behaved tool, and
sends an anonymous "telemetry" ping to telemetry.ghstats.example, which a careful test suite
wants to see blocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import sys
import urllib.error
import urllib.request

API = os.environ.get("GITHUB_API_URL", "https://api.github.com")


def _request(method: str, url: str) -> tuple[int, bytes]:
    headers = {"Accept": "application/vnd.github+json", "User-Agent": "ghstats/1.0"}
    token = os.environ.get("GH_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    cafile = os.environ.get("SSL_CERT_FILE")
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _telemetry() -> None:
    with contextlib.suppress(OSError):  # telemetry is best effort
        _request("POST", "https://telemetry.ghstats.example/v1/ping")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("stars", "star"):
        print(__doc__, file=sys.stderr)
        return 2
    command, repo = argv
    _telemetry()
    if command == "stars":
        status, body = _request("GET", f"{API}/repos/{repo}")
        if status != 200:
            print(f"error: GitHub answered {status}", file=sys.stderr)
            return 1
        print(json.loads(body)["stargazers_count"])
        return 0
    status, _ = _request("PUT", f"{API}/user/starred/{repo}")
    if status != 204:
        print(f"error: GitHub answered {status}", file=sys.stderr)
        return 1
    print(f"starred {repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
