"""The admin API through a real `netproxy-core serve` process, httpx as the client (SPEC §11)."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from helpers.origins import Origin
from helpers.serve import Server, serving

A = "a.example.test"
B = "b.example.test"
TOKEN = "ConfiguredAdminToken9x8y7z"


@dataclass
class Served:
    server: Server
    home: Path

    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.server.proc

    @property
    def ready(self) -> dict[str, Any]:
        return self.server.ready

    @property
    def admin(self) -> str:
        return f"http://{self.ready['admin']}"

    def client(self, token: str | None = None) -> httpx.Client:
        token = self.ready["admin_token"] if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.admin, headers=headers, trust_env=False, timeout=10)

    def via_proxy(self, method: str, url: str) -> httpx.Response:
        with httpx.Client(proxy=f"http://{self.ready['http']}", trust_env=False, timeout=10) as c:
            return c.request(method, url)

    def wait_stderr(self, *needles: str) -> str:
        """The next stderr line containing one of `needles` (bounded)."""
        return self.server.wait_stderr(*needles, timeout=30)


@contextmanager
def serve(tmp_path: Path, *args: str, admin: str | None = "127.0.0.1:0") -> Iterator[Served]:
    extra = ("--admin-addr", admin) if admin is not None else ()
    with serving(tmp_path, *args, *extra) as server:
        yield Served(server, tmp_path / "home")


def _config(path: Path, allow: list[str], extra: str = "") -> Path:
    domains = "".join(f'"{p}" = "allow"\n' for p in allow)
    path.write_text(
        f'default_permissions = "w"\n[permissions.w.network]\n{extra}'
        f"[permissions.w.network.domains]\n{domains}"
    )
    return path


def _assert_json_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == status and isinstance(body["error"], str) and body["error"]
    return body


# --- routes ---------------------------------------------------------------------------------


def test_every_route(tmp_path: Path, origin: Origin) -> None:
    with (
        serve(
            tmp_path,
            "--allow",
            A,
            "--route",
            f"{A}:80={origin.addr}",
            "--route",
            f"{B}:80={origin.addr}",
        ) as s,
        s.client() as admin,
    ):
        health = admin.get("/health")
        assert health.status_code == 200 and health.headers["content-type"] == "application/json"
        assert health.json()["status"] == "ok" and health.json()["mode"] == "full"

        config = admin.get("/config").json()
        assert config["domains"] == {A: "allow"} and config["mode"] == "full"
        assert s.ready["admin_token"] not in admin.get("/config").text

        assert admin.get("/patterns").json() == {"allowed": [A], "denied": []}
        assert s.via_proxy("GET", f"http://{B}/").status_code == 403

        # POST /domains takes effect for requests at once
        changed = admin.post("/domains", json={"allow": [B], "deny": ["evil.example.test"]})
        assert changed.status_code == 200
        assert changed.json() == {"allowed": [A, B], "denied": ["evil.example.test"]}
        assert admin.get("/patterns").json() == changed.json()
        assert s.via_proxy("GET", f"http://{B}/").status_code == 200

        # POST /mode limited → POST refused by the mode guard
        assert admin.post("/mode", json={"mode": "limited"}).json() == {"mode": "limited"}
        refused = s.via_proxy("POST", f"http://{A}/")
        assert refused.status_code == 403
        assert refused.headers["x-proxy-error"] == "blocked-by-method-policy"
        assert admin.post("/mode", json={"mode": "full"}).json() == {"mode": "full"}

        # /events and ?since=
        all_events = admin.get("/events").json()
        assert all_events["next"] == 3 and len(all_events["events"]) == 3
        assert [e["server.address"] for e in all_events["events"]] == [B, B, A]
        tail = admin.get("/events", params={"since": 2}).json()
        assert tail == {"events": all_events["events"][2:], "next": 3}
        assert admin.get("/events", params={"since": 3}).json() == {"events": [], "next": 3}
        s.via_proxy("GET", f"http://{A}/")
        newer = admin.get("/events", params={"since": 3}).json()
        assert newer["next"] == 4 and [e["server.address"] for e in newer["events"]] == [A]

        # /blocked snapshot, ?drain=1 empties the ring, total never resets
        blocked = admin.get("/blocked").json()
        assert blocked["total"] == 2
        assert [(r["host"], r["reason"], r["mode"]) for r in blocked["blocked"]] == [
            (B, "not_allowed", "full"),
            (A, "method_not_allowed", "limited"),
        ]
        assert set(blocked["blocked"][0]) == {
            "host",
            "reason",
            "client",
            "method",
            "mode",
            "protocol",
            "decision",
            "source",
            "port",
            "timestamp",
        }
        assert admin.get("/blocked").json() == blocked  # snapshot is not destructive
        assert admin.get("/blocked", params={"drain": "1"}).json() == blocked
        assert admin.get("/blocked").json() == {"blocked": [], "total": 2}
        assert admin.get("/health").json()["blocked_total"] == 2


def test_admin_is_off_without_admin_addr(tmp_path: Path) -> None:
    with serve(tmp_path, "--allow", A, admin=None) as s:
        assert s.ready["admin"] is None and s.ready["admin_token"] is None
        assert not (s.home / "proxy" / "admin-token").exists()


# --- auth, errors, limits --------------------------------------------------------------------


def test_missing_or_wrong_token_is_401_on_every_route(tmp_path: Path) -> None:
    with (
        serve(tmp_path, "--allow", A) as s,
        httpx.Client(base_url=s.admin, trust_env=False, timeout=10) as c,
    ):
        token = s.ready["admin_token"]
        for authorization in [
            None,
            "Bearer wrong-token",
            f"Bearer {token[:-1]}",
            f"Bearer {token}x",
            f"Basic {token}",
            f"Token {token}",
            "Bearer",
        ]:
            headers = {"Authorization": authorization} if authorization else {}
            for method, path in [
                ("GET", "/health"),
                ("GET", "/config"),
                ("GET", "/events"),
                ("GET", "/blocked?drain=1"),
                ("POST", "/mode"),
                ("POST", "/domains"),
                ("POST", "/reload"),
                ("GET", "/nope"),
            ]:
                response = c.request(method, path, headers=headers, json={"mode": "limited"})
                _assert_json_error(response, 401)
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert token not in response.text
        with s.client() as admin:  # nothing changed
            assert admin.get("/health").json()["mode"] == "full"
            assert (
                admin.get("/health", headers={"Authorization": f"bearer {token}"}).status_code
                == 200
            )


def test_errors_are_json(tmp_path: Path) -> None:
    with serve(tmp_path, "--allow", A) as s, s.client() as admin:
        assert "no admin route" in _assert_json_error(admin.get("/nope"), 404)["error"]
        _assert_json_error(admin.get("/health/extra"), 404)
        wrong = _assert_json_error(admin.post("/health"), 405)
        assert "GET" in wrong["error"]
        _assert_json_error(admin.get("/mode"), 405)
        _assert_json_error(admin.post("/mode", content=b"{not json"), 400)
        _assert_json_error(admin.post("/mode", json=["limited"]), 400)
        _assert_json_error(admin.post("/mode", json={"mode": "readonly"}), 400)
        _assert_json_error(admin.post("/mode", json={"mode": "full", "x": 1}), 400)
        _assert_json_error(admin.post("/domains", json={"allow": "a.example.test"}), 400)
        _assert_json_error(admin.get("/events", params={"since": "-1"}), 400)
        _assert_json_error(admin.get("/events", params={"since": "abc"}), 400)
        _assert_json_error(admin.get("/blocked", params={"drain": "maybe"}), 400)
        # a bad entry rejects the whole request: the valid allow is not applied either
        bad = _assert_json_error(admin.post("/domains", json={"allow": [B], "deny": ["**"]}), 400)
        assert "**" in bad["error"]
        bad = _assert_json_error(admin.post("/domains", json={"allow": [B, "*"]}), 400)
        assert admin.get("/patterns").json() == {"allowed": [A], "denied": []}
        assert admin.get("/health").status_code == 200  # connection still usable


def test_body_limit_is_413(tmp_path: Path) -> None:
    with serve(tmp_path, "--allow", A) as s, s.client() as admin:
        big = {"allow": ["x.example.test"] * 5000}  # ~85 KB
        assert len(json.dumps(big)) > 64 * 1024
        _assert_json_error(admin.post("/domains", json=big), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: chunked upload
            for _ in range(80):
                yield b" " * 1024

        _assert_json_error(admin.post("/domains", content=chunks()), 413)
        just_fits = b'{"allow": ["c.example.test"]}' + b" " * (64 * 1024 - 40)
        assert admin.post("/domains", content=just_fits).status_code == 200
        assert admin.get("/patterns").json()["allowed"] == [A, "c.example.test"]


# --- reload ----------------------------------------------------------------------------------


def test_post_reload_and_bad_file_keeps_old_config(tmp_path: Path) -> None:
    path = _config(tmp_path / "netproxy.toml", [A])
    with serve(tmp_path, "--config", str(path)) as s, s.client() as admin:
        assert admin.get("/patterns").json()["allowed"] == [A]
        _config(path, [B])
        reloaded = admin.post("/reload")
        assert reloaded.status_code == 200 and reloaded.json()["allowed"] == [B]
        assert admin.get("/patterns").json() == {"allowed": [B], "denied": []}
        assert s.via_proxy("GET", f"http://{A}/").status_code == 403

        path.write_text("this is [not toml\n")
        bad = _assert_json_error(admin.post("/reload"), 400)
        assert str(path) in bad["error"] and "previous configuration kept" in bad["error"]
        assert admin.get("/patterns").json() == {"allowed": [B], "denied": []}

        _config(path, [A], extra="allow_local_bindings = true\n")
        bad = _assert_json_error(admin.post("/reload"), 400)
        assert "allow_local_bindings" in bad["error"]
        path.unlink()
        _assert_json_error(admin.post("/reload"), 400)
        assert admin.get("/patterns").json() == {"allowed": [B], "denied": []}
        assert s.proc.poll() is None


def test_sighup_reloads_and_bad_file_keeps_old_config(tmp_path: Path) -> None:
    path = _config(tmp_path / "netproxy.toml", [A])
    with serve(tmp_path, "--config", str(path)) as s, s.client() as admin:
        _config(path, [A, B])
        s.proc.send_signal(signal.SIGHUP)
        assert "reloaded configuration" in s.wait_stderr("reloaded configuration", "reload failed")
        assert admin.get("/patterns").json()["allowed"] == [A, B]

        path.write_text("[permissions.w.network]\nmode = 7\n")
        s.proc.send_signal(signal.SIGHUP)
        assert "reload failed" in s.wait_stderr("reloaded configuration", "reload failed")
        assert admin.get("/patterns").json()["allowed"] == [A, B]
        assert s.proc.poll() is None


# --- token and address ------------------------------------------------------------------------


def test_random_token_file_is_0600_and_matches_ready_line(tmp_path: Path) -> None:
    with serve(tmp_path, "--allow", A) as s:
        token = s.ready["admin_token"]
        assert isinstance(token, str) and len(token) >= 32
        token_file = s.home / "proxy" / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token_file.read_text().strip() == token
        with s.client() as admin:
            assert admin.get("/health").status_code == 200
    with serve(tmp_path, "--allow", A) as again:  # a new process gets a new token
        assert again.ready["admin_token"] != token


def test_configured_token_is_used_printed_and_redacted(tmp_path: Path) -> None:
    path = _config(tmp_path / "netproxy.toml", [A], extra=f'admin_token = "{TOKEN}"\n')
    with serve(tmp_path, "--config", str(path)) as s:
        assert s.ready["admin_token"] == TOKEN
        assert (s.home / "proxy" / "admin-token").read_text().strip() == TOKEN
        with s.client(TOKEN) as admin:
            config = admin.get("/config")
            assert config.json()["admin_token"] == "***"
            assert TOKEN not in config.text
        with s.client("not-" + TOKEN) as wrong:
            _assert_json_error(wrong.get("/health"), 401)
    stderr = s.server.drain_stderr()
    assert TOKEN not in stderr


def test_non_loopback_admin_address_is_clamped(tmp_path: Path) -> None:
    with serve(tmp_path, "--allow", A, admin="0.0.0.0:0") as s:
        host, _, port = s.ready["admin"].rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        assert "dangerously_allow_non_loopback_admin" in s.wait_stderr("admin API address")
        with s.client() as admin:
            assert admin.get("/health").status_code == 200


def test_non_loopback_admin_kept_with_the_dangerous_flag(tmp_path: Path) -> None:
    path = _config(
        tmp_path / "netproxy.toml", [A], extra="dangerously_allow_non_loopback_admin = true\n"
    )
    with serve(tmp_path, "--config", str(path), admin="0.0.0.0:0") as s:
        host, _, port = s.ready["admin"].rpartition(":")
        assert host == "0.0.0.0"
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            trust_env=False,
            timeout=10,
            headers={"Authorization": f"Bearer {s.ready['admin_token']}"},
        ) as c:
            assert c.get("/health").status_code == 200
