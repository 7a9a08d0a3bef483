"""CONNECT set-up cost of two netproxy source trees, judged side by side (SPEC §16).

Run:  python bench/ab_setups.py BEFORE_SRC AFTER_SRC [--pairs 100]
      python bench/ab_setups.py SRC [--repeat 40]

A `src` is a directory holding `netproxy_core` (e.g. `git archive HEAD src | tar -x -C /tmp/a`);
each tree runs in its own `netproxy-core serve`, pinned to the proxy core, with nginx (or the
Python origin) and this client on the load core, as `run_all.py` arranges them.

- With two trees, a **paired A/B**: blocks of `--setups` sequential set-ups alternate between
  the two proxies (the order flipped every pair, a direct block before each pair). The result is
  the median of after/before wall time over the pairs, with its interquartile range. One block
  moves by ±30% with the machine's phase; a pair's ratio resolves about 2%.
- With one tree, the **bench's own figure** (median of 3 interleaved rounds, against direct)
  repeated `--repeat` times: its distribution, and how often it exceeds 5× direct.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import loadgen
import peers
import run_all


def _start(tmp: Path, http: int, https: int, src: str) -> peers.Proxy:
    launch = peers.netproxy_launch(tmp, http, https, "", 1, mitm=False)
    launch.argv[0:0] = ["env", f"PYTHONPATH={Path(src).resolve()}"]
    proxy, _ = peers.start(launch, ready_line=True)
    loadgen.connect_setups(proxy.http, f"{peers.HOST}:80", 200)  # warm-up
    return proxy


def _quartiles(values: list[float]) -> str:
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return f"median {q2:.3f} (IQR {q1:.3f}–{q3:.3f})"


def paired(before: peers.Proxy, after: peers.Proxy, http: int, pairs: int, n: int) -> None:
    ratios: list[float] = []
    to_direct: tuple[list[float], list[float]] = ([], [])
    target = f"{peers.HOST}:80"
    for i in range(pairs):
        direct = loadgen.connect_setups(None, f"x:{http}", n)
        order = (before, after) if i % 2 == 0 else (after, before)
        took = {p.proc.pid: loadgen.connect_setups(p.http, target, n) for p in order}
        b, a = took[before.proc.pid], took[after.proc.pid]
        ratios.append(a / b)
        to_direct[0].append(b / direct)
        to_direct[1].append(a / direct)
    print(f"after / before wall time: {_quartiles(ratios)} over {pairs} pairs of {n}")
    print(f"before / direct: {_quartiles(to_direct[0])}")
    print(f"after / direct:  {_quartiles(to_direct[1])}")


def bench_figure(proxy: peers.Proxy, http: int, repeat: int, n: int) -> None:
    figures = []
    for _ in range(repeat):
        direct, through = [], []
        for _ in range(3):
            direct.append(loadgen.connect_setups(None, f"x:{http}", n))
            through.append(loadgen.connect_setups(proxy.http, f"{peers.HOST}:80", n))
            time.sleep(0.3)  # the bench runs the other proxies in between
        figures.append(statistics.median(through) / statistics.median(direct))
    figures.sort()
    print(" ".join(f"{f:.2f}" for f in figures))
    over = sum(f > 5 for f in figures)
    print(f"{n} set-ups vs direct: median {statistics.median(figures):.2f}×, "
          f"worst {figures[-1]:.2f}×, over 5×: {over} of {repeat}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="+", help="one or two source trees (holding netproxy_core)")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--setups", type=int, default=200, help="set-ups per block")
    args = parser.parse_args()
    if len(args.src) > 2:
        parser.error("one or two source trees")
    for src in args.src:
        if not (Path(src) / "netproxy_core").is_dir():
            parser.error(f"{src} holds no netproxy_core package")
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {int(peers.LOAD_CORE)})
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        run_all.make_certs(tmp, 1)
        http, https, _, _ = run_all.start_origin(tmp, 1, {})
        try:
            proxies = [_start(tmp, http, https, src) for src in args.src]
            if len(proxies) == 2:
                paired(proxies[0], proxies[1], http, args.pairs, args.setups)
            else:
                bench_figure(proxies[0], http, args.repeat, args.setups)
        finally:
            peers.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
