"""netproxy against its peers, side by side in ONE run on 127.0.0.1 (SPEC §16).

    python bench/run_all.py [--quick] [--seconds S] [--skip-install] [--only NAME,...]

Installs its peers itself (proxy.py + mitmproxy into bench/.venv-peers; tinyproxy, nginx, wrk
through apt-get), starts nginx as the origin, then measures direct→origin and each proxy in the
same run. Proxies are pinned to core 0, origin and load generator to core 1. A peer that cannot
be installed or started is reported "n/a" with the reason. Writes bench/results/latest.md and
bench/results/latest.json. Everything it starts dies with it (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import multiprocessing
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import peers
from peers import HOST, Launch, Proxy

PEERS = ("netproxy", "proxy.py", "mitmproxy", "tinyproxy")
COLUMNS = ("direct", *PEERS)
BIG = 64 << 20
SMALL = 512


class Results:
    """figure → column → value (float) or "n/a: reason"; plus the figure's unit and direction."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.meta: dict[str, tuple[str, bool]] = {}

    def put(self, figure: str, unit: str, higher_better: bool, column: str, value: Any) -> None:
        self.rows.setdefault(figure, {})[column] = value
        self.meta[figure] = (unit, higher_better)
        shown = f"{value:.2f}" if isinstance(value, float) else value
        print(f"  {figure} [{column}] = {shown}", flush=True)

    def measure(
        self, figure: str, unit: str, hb: bool, column: str, fn: Callable[[], float]
    ) -> None:
        try:
            self.put(figure, unit, hb, column, float(fn()))
        except Exception as exc:
            self.put(figure, unit, hb, column, f"n/a: {type(exc).__name__}: {exc}"[:120])


def fmt(v: float) -> str:
    if v >= 10000:
        return f"{v / 1000:.1f}k"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(res: Results, na: dict[str, str]) -> str:
    lines = [
        "| figure | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for figure, cols in res.rows.items():
        unit, _ = res.meta[figure]
        base = cols.get("direct")
        cells = []
        for col in COLUMNS:
            v = cols.get(col)
            if col in na and v is None:
                cells.append("n/a")
            elif v is None:
                cells.append("—")
            elif isinstance(v, str):
                cells.append("n/a")
            elif col != "direct" and isinstance(base, float) and base > 0:
                cells.append(f"{fmt(v)} ({v / base:.2f}×)")
            else:
                cells.append(fmt(v))
        lines.append(f"| {figure} ({unit}) | " + " | ".join(cells) + " |")
    notes = [f"- {k}: {v}" for k, v in na.items()]
    for figure, cols in res.rows.items():
        for col, v in cols.items():
            if isinstance(v, str) and col not in na:
                notes.append(f"- {figure} / {col}: {v}")
    return "\n".join([*lines, *(["", *notes] if notes else [])])


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "kernel": platform.release(),
    }


# --- setup -----------------------------------------------------------------------------------


def install(skip: bool) -> dict[str, str]:
    """peer or tool → reason it is unavailable."""
    na: dict[str, str] = {}
    if not skip:
        print("installing peers (apt-get: tinyproxy nginx wrk; pip venv: proxy.py mitmproxy)")
        na.update(peers.install_apt({"tinyproxy": "tinyproxy", "nginx": "nginx", "wrk": "wrk"}))
        reason = peers.install_venv()
        if reason:
            na["proxy.py"] = na["mitmproxy"] = reason
    for binary in ("tinyproxy", "nginx", "wrk"):
        if binary not in na and not peers._which(binary):
            na[binary] = "not installed"
    for name, binary in (("proxy.py", "proxy"), ("mitmproxy", "mitmdump")):
        if name not in na and peers.peer_binary(binary) is None:
            na[name] = f"{binary} not in bench/.venv-peers"
    if not peers._which("openssl") and "proxy.py" not in na:
        na["proxy.py MITM"] = "openssl CLI missing (proxy.py mints leaves with it)"
    return na


def make_certs(tmp: Path, hosts: int) -> str:
    import trustme

    ca = trustme.CA()
    names = [HOST, f"*.{HOST}", *(f"127.0.0.{i}" for i in range(1, hosts + 2))]
    leaf = ca.issue_cert(*names)
    leaf.private_key_pem.write_to_path(str(tmp / "origin.key"))
    (tmp / "origin.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(tmp / "origin-ca.pem"))
    return str(tmp / "origin-ca.pem")


def start_origin(tmp: Path, hosts: int, na: dict[str, str]) -> tuple[int, int, str, str]:
    """Returns (http port, https port, small path, big path)."""
    www = tmp / "www"
    www.mkdir()
    (www / "small").write_bytes(b"x" * SMALL)
    with open(www / "big", "wb") as f:
        f.truncate(BIG)  # sparse zeros: page cache only
    if "nginx" not in na:
        try:
            http, https = peers.start_nginx(tmp, hosts)
            return http, https, "/small", "/big"
        except Exception as exc:
            na["nginx"] = f"did not start ({exc}); Python origin used"
    import bench_http
    import bench_mitm

    ctx = multiprocessing.get_context("fork")
    q: Any = ctx.Queue()
    ctx.Process(target=bench_http._run_origin, args=(q,), daemon=True).start()
    http = q.get(timeout=20)
    stop = ctx.Event()
    ctx.Process(target=bench_mitm._run_origin, args=(str(tmp), q, stop), daemon=True).start()
    return http, q.get(timeout=20), "/small", f"/bytes/{BIG}"


# --- the run ---------------------------------------------------------------------------------


def launch_for(
    name: str,
    tmp: Path,
    ports: tuple[int, int],
    ca: str,
    hosts: int,
    *,
    mitm: bool = False,
    socks: bool = False,
) -> Launch:
    http, https = ports
    if name == "netproxy":
        return peers.netproxy_launch(tmp, http, https, ca, hosts, mitm=mitm)
    if name == "proxy.py":
        return peers.proxypy_launch(tmp, ca if mitm else None)
    if name == "mitmproxy":
        return peers.mitmdump_launch(tmp, ca, socks=socks)
    return peers.tinyproxy_launch(tmp)


def run(args: argparse.Namespace) -> int:
    os.sched_setaffinity(0, {int(peers.LOAD_CORE)} if (os.cpu_count() or 1) >= 2 else {0})
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    t0 = time.monotonic()
    na = install(args.skip_install)
    # Peers run from pip-installed, byte-compiled files; give netproxy's source tree the same
    # (an editable install with PYTHONDONTWRITEBYTECODE would recompile on every launch).
    subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            str(Path(__file__).resolve().parents[1] / "src"),
        ],
        check=False,
        timeout=120,
    )
    wanted = [p for p in PEERS if not args.only or p in args.only.split(",")]
    live = [p for p in wanted if p not in na]
    hosts = args.hosts
    res = Results()
    info = machine()
    print(f"machine: {info}")
    with tempfile.TemporaryDirectory(prefix="netproxy-bench-") as tmpname:
        tmp = Path(tmpname)
        ca = make_certs(tmp, hosts)
        http, https, small, big = start_origin(tmp, hosts, na)
        ports = (http, https)
        origin = ("127.0.0.1", http)
        print(f"origin: http {http}, https {https}; load: {'wrk' if 'wrk' not in na else 'python'}")

        def path_host(p: Proxy | None, path: str) -> tuple[str, str]:
            if p is None:
                return path, HOST
            if p.named:
                return f"http://{HOST}{path}", HOST
            return f"http://127.0.0.1:{http}{path}", f"127.0.0.1:{http}"

        def target(p: Proxy) -> str:
            return f"{HOST}:80" if p.named else f"127.0.0.1:{http}"

        # launch → listening, idle RSS, 1,000 idle tunnels: fresh instances per proxy
        print("== launch, memory, idle tunnels")
        for name in live:
            times, answered = [], []
            for i in range(args.launches):
                try:
                    p, elapsed = peers.start(launch_for(name, tmp, ports, ca, hosts))
                    path, host = path_host(p, small)
                    first = loadgen.first_response(p.http, path, host) - p.started_at
                except Exception as exc:
                    res.put("launch → listening", "ms", False, name, f"n/a: {exc}")
                    break
                times.append(elapsed * 1000)
                answered.append(first * 1000)
                if i < args.launches - 1:
                    peers.stop(p.proc)
                    continue
                memory(res, p, target(p), args.tunnels)
                peers.stop(p.proc)
            if times:
                res.put("launch → listening", "ms", False, name, statistics.median(times))
                res.put("launch → first response", "ms", False, name, statistics.median(answered))

        print("== plain HTTP forwarding, CONNECT")
        running: dict[str, Proxy] = {}
        for name in live:
            try:
                running[name] = peers.start(launch_for(name, tmp, ports, ca, hosts))[0]
                loadgen.download(
                    loadgen.connect_tunnel(running[name].http, target(running[name])),
                    small, HOST, SMALL,
                )  # fmt: skip
            except Exception as exc:
                na[name] = f"did not start: {exc}"
        for c in args.concurrency:
            for close in (False, True):
                kind = "new conn/request" if close else "keep-alive"
                fig = f"HTTP {kind} c={c}"
                # Rounds interleave the columns, so a slow spell of the machine hits them all;
                # each figure is the median of its rounds (`--repeat`).
                loads: dict[str, list[loadgen.Load]] = {}
                cpu_per_request: dict[str, list[float]] = {}  # µs of the proxy's own CPU
                for _ in range(args.repeat):
                    for col in ("direct", *running):
                        p = running.get(col)
                        path, host = path_host(p, small)
                        addr = origin if p is None else p.http
                        cpu_before = 0.0 if p is None else peers.tree_cpu_seconds(p.proc.pid)
                        try:
                            r = loadgen.http_load(addr, path, host, c, args.seconds, close)
                        except Exception as exc:
                            res.put(f"{fig} req/s", "req/s", True, col, f"n/a: {exc}"[:120])
                            continue
                        loads.setdefault(col, []).append(r)
                        if p is not None and r.requests:
                            used = peers.tree_cpu_seconds(p.proc.pid) - cpu_before
                            cpu_per_request.setdefault(col, []).append(used / r.requests * 1e6)
                for col, rounds in loads.items():
                    res.put(f"{fig} req/s", "req/s", True, col, _median(r.rps for r in rounds))
                    if col in cpu_per_request:
                        res.put(
                            f"{fig} proxy CPU per request", "µs", False, col,
                            _median(cpu_per_request[col]),
                        )  # fmt: skip
                    if c in (16,) or args.latency_all:
                        res.put(f"{fig} p50", "ms", False, col, _median(r.p50_ms for r in rounds))
                        res.put(f"{fig} p99", "ms", False, col, _median(r.p99_ms for r in rounds))
                    errors = sum(r.errors for r in rounds)
                    if errors:
                        res.put(f"{fig} errors", "count", False, col, float(errors))
        # Like the load figures, these interleave their rounds across the columns (a 64 MiB
        # download over loopback takes tens of milliseconds: one slow spell would decide it).
        openers: dict[str, Callable[[], socket.socket]] = {
            "direct": functools.partial(socket.create_connection, origin)
        }
        setups: dict[str, tuple[tuple[str, int] | None, str]] = {"direct": (None, f"x:{http}")}
        for name, p in running.items():
            openers[name] = functools.partial(loadgen.connect_tunnel, p.http, target(p))
            setups[name] = (p.http, target(p))
        interleaved(
            res,
            f"CONNECT {BIG >> 20} MiB download",
            "MB/s",
            max,
            args.download_rounds,
            {col: functools.partial(_download, o, big) for col, o in openers.items()},
        )
        interleaved(
            res,
            f"{args.setups} sequential CONNECT set-ups",
            "ms",
            statistics.median,
            args.rounds,
            {
                col: functools.partial(loadgen.connect_setups, addr, where, args.setups)
                for col, (addr, where) in setups.items()
            },
        )
        for p in running.values():
            peers.stop(p.proc)

        print("== SOCKS5")
        fig = f"SOCKS5 {BIG >> 20} MiB download"
        socks_openers: dict[str, Callable[[], socket.socket]] = {
            "direct": functools.partial(socket.create_connection, origin)
        }
        socks_proxies: list[Proxy] = []
        for name in live:
            if name in ("proxy.py", "tinyproxy"):
                res.put(fig, "MB/s", True, name, "n/a: no SOCKS5 server")
                continue
            try:
                p = peers.start(launch_for(name, tmp, ports, ca, hosts, socks=True))[0]
            except Exception as exc:
                res.put(fig, "MB/s", True, name, f"n/a: {exc}")
                continue
            assert p.socks is not None
            socks_proxies.append(p)
            host, port = (HOST, 80) if p.named else ("127.0.0.1", http)
            socks_openers[name] = functools.partial(loadgen.socks_tunnel, p.socks, host, port)
        interleaved(
            res,
            fig,
            "MB/s",
            max,
            args.download_rounds,
            {col: functools.partial(_download, o, big) for col, o in socks_openers.items()},
        )
        for p in socks_proxies:
            peers.stop(p.proc)

        print("== MITM HTTPS")
        mitm(res, args, live, tmp, ports, ca, hosts)

        print("== netproxy fixture")
        if "netproxy" in wanted:
            fixture(res, args.fixture_tests)
    peers.stop_all()
    info["elapsed_s"] = f"{time.monotonic() - t0:.0f}"
    report(res, na, info, args)
    return 0


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def _download(open_socket: Callable[[], socket.socket], path: str) -> float:
    return loadgen.download(open_socket(), path, HOST, BIG)


def interleaved(
    res: Results,
    figure: str,
    unit: str,
    keep: Callable[[list[float]], float],
    rounds: int,
    columns: dict[str, Callable[[], float]],
) -> None:
    """`rounds` rounds of every column in turn; `keep` (max or median) of each column's."""
    hb = keep is max
    got: dict[str, list[float]] = {}
    for _ in range(rounds):
        for col, fn in columns.items():
            if col in got and not got[col]:
                continue  # failed before: reported already
            try:
                got.setdefault(col, []).append(float(fn()))
            except Exception as exc:
                got[col] = []
                res.put(figure, unit, hb, col, f"n/a: {type(exc).__name__}: {exc}"[:120])
    for col, values in got.items():
        if values:
            res.put(figure, unit, hb, col, keep(values))


def memory(res: Results, p: Proxy, target: str, n: int) -> None:
    try:
        loadgen.connect_tunnel(p.http, target).close()
    except Exception as exc:
        res.put("idle RSS", "MiB", False, p.name, f"n/a: warm-up failed: {exc}")
        return
    time.sleep(0.2)  # let the closed tunnel's buffers go
    idle = peers.tree_rss_kib(p.proc.pid)
    res.put("idle RSS", "MiB", False, p.name, idle / 1024)
    held, errors = loadgen.hold_tunnels(p.http, target, n, time.monotonic() + 60)
    try:
        time.sleep(0.3)
        alive = p.proc.poll() is None
        full = peers.tree_rss_kib(p.proc.pid)
        res.put(f"RSS with {n} idle tunnels", "MiB", False, p.name, full / 1024)
        res.put("RSS per idle tunnel", "KiB", False, p.name, (full - idle) / max(1, len(held)))
        res.put(f"errors opening {n} tunnels", "count", False, p.name, float(errors + (not alive)))
    finally:
        for s in held:
            s.close()


def mitm(
    res: Results,
    args: argparse.Namespace,
    live: list[str],
    tmp: Path,
    ports: tuple[int, int],
    ca: str,
    hosts: int,
) -> None:
    https = ports[1]
    rps_fig, first_fig = "MITM HTTPS keep-alive c=16 req/s", "MITM first request, new host"
    direct = loadgen.TlsTarget(None, https, ca)
    res.measure(
        rps_fig,
        "req/s",
        True,
        "direct",
        lambda: loadgen.mitm_rps(direct, "127.0.0.1", HOST, 16, args.seconds),
    )
    names = [(f"127.0.0.{i + 2}", f"h{i}.{HOST}") for i in range(hosts)]
    res.measure(first_fig, "ms", False, "direct", lambda: loadgen.first_request_ms(direct, names))
    for name in live:
        if name == "tinyproxy":
            res.put(rps_fig, "req/s", True, name, "n/a: no TLS interception")
            res.put(first_fig, "ms", False, name, "n/a: no TLS interception")
            continue
        try:
            p = peers.start(
                launch_for(name, tmp, ports, ca, hosts, mitm=True), ready_line=name == "netproxy"
            )[0]
        except Exception as exc:
            res.put(rps_fig, "req/s", True, name, f"n/a: {exc}")
            continue
        assert p.ca_file is not None
        t = loadgen.TlsTarget(p.http, https, p.ca_file, check_hostname=name != "proxy.py")
        if name == "netproxy":
            main_host, new = (HOST, HOST), [(sni, sni) for _, sni in names]
        elif name == "mitmproxy":
            main_host, new = ("127.0.0.1", HOST), [("127.0.0.1", sni) for _, sni in names]
        else:  # proxy.py mints one leaf per CONNECT host: new addresses, hostname unchecked
            main_host, new = ("127.0.0.1", "127.0.0.1"), [(ip, ip) for ip, _ in names]
        res.measure(
            first_fig, "ms", False, name, lambda t=t, new=new: loadgen.first_request_ms(t, new)
        )
        res.measure(
            rps_fig,
            "req/s",
            True,
            name,
            lambda t=t, m=main_host: loadgen.mitm_rps(t, m[0], m[1], 16, args.seconds),
        )
        peers.stop(p.proc)


def fixture(res: Results, tests: int) -> None:
    script = Path(__file__).resolve().parent / "bench_fixture.py"
    fig = f"`netproxy` fixture cost per test ({tests} with vs {tests} without)"
    try:
        out = subprocess.run(
            [sys.executable, str(script), "--tests", str(tests)],
            capture_output=True, text=True, timeout=300,
        ).stdout  # fmt: skip
        m = re.search(r"added by the fixture:\s+([\d.]+) ms", out)
        if not m:
            raise RuntimeError(out[-200:])
        res.put(fig, "ms", False, "netproxy", float(m.group(1)))
    except Exception as exc:
        res.put(fig, "ms", False, "netproxy", f"n/a: {exc}"[:120])


def report(
    res: Results, na: dict[str, str], info: dict[str, str], args: argparse.Namespace
) -> None:
    md = table(res, na)
    shared = (os.cpu_count() or 1) <= 2
    head = (
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"Linux {info['kernel']}, {info['date']}, load average at start {info['loadavg']}, "
        f"run took {info['elapsed_s']} s ({'--quick' if args.quick else 'defaults'}; "
        f"{args.seconds:g} s per load figure). "
        + ("Proxies on core 0, origin + load generator on core 1. " if shared else "")
        + "Ratios are against `direct` (client→origin, same run)."
    )
    text = head + "\n\n" + md + "\n"
    print("\n" + text)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.md").write_text(text)
    (out / "latest.json").write_text(
        json.dumps({"machine": info, "unavailable": na, "figures": res.rows}, indent=1) + "\n"
    )
    print(f"written: {out / 'latest.md'}, {out / 'latest.json'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under 2 minutes)")
    parser.add_argument("--seconds", type=float, help="per load figure (default 3; quick 1)")
    parser.add_argument("--skip-install", action="store_true", help="use what is installed")
    parser.add_argument("--only", help="comma list of proxies (default: all)")
    parser.add_argument("--latency-all", action="store_true", help="p50/p99 at every c")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds per load figure, interleaved; median kept"
    )
    parser.add_argument(
        "--concurrency", help="comma list of client counts for the load figures (default 1,16,128)"
    )
    args = parser.parse_args()
    q = args.quick
    args.seconds = args.seconds or (1.0 if q else 3.0)
    if args.concurrency:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    else:
        args.concurrency = [16] if q else [1, 16, 128]
    args.repeat = max(1, args.repeat)
    args.rounds = 1 if q else max(3, args.repeat)
    # A 64 MiB download over loopback takes ~30 ms: one slow spell of the machine can halve
    # it, so each download figure keeps the best of more rounds (direct's too).
    args.download_rounds = 1 if q else max(5, args.repeat)
    args.launches = 1 if q else 3
    args.tunnels = 1000
    args.setups = 50 if q else 200
    args.hosts = 3 if q else 15
    args.fixture_tests = 40 if q else 200
    args.latency_all = args.latency_all or not q

    def on_signal(signum: int, _frame: object) -> None:
        peers.stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    # A hard bound on the whole run; extra rounds of the load figures extend it.
    extra_rounds = (args.repeat - 1) * len(args.concurrency) * 2 * (len(PEERS) + 1)
    signal.alarm((150 if q else 590) + int(extra_rounds * (args.seconds + 2)))
    try:
        return run(args)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        peers.stop_all()


if __name__ == "__main__":
    sys.exit(main())
