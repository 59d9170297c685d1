"""Serving load: concurrent clients fetching Deep Zoom tiles from ``tileserver serve``.

Two phases per slide: *cold* (every tile of the pyramid once, in random order:
reads and decodes) and *warm* (the same tiles again: mostly the tile cache).
Prints a table and writes JSON (tiles/s, p50/p99 latency, answer sources).

    python bench/serve_load.py                                  # starts a server on the shared slides
    python bench/serve_load.py --url http://127.0.0.1:8080 --slide CMU-1-Small-Region.svs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from _common import dzi_tile_urls, free_port

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLIDES = Path(os.environ.get("TILESERVER_TEST_DATA", ROOT.parent / "shared" / "data")) / "slides"


@contextmanager
def _server(slides: Path, workers: int, threads: int) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    cmd = [sys.executable, "-m", "tileserver", "serve", str(slides), "--port", str(port)]
    cmd += ["--workers", str(workers), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(url + "/readyz", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _run(urls: list[str], clients: int) -> dict[str, Any]:
    local = {}

    def fetch(u: str) -> tuple[float, str, int]:
        import threading

        s = local.setdefault(threading.get_ident(), requests.Session())
        t = time.perf_counter()
        r = s.get(u, timeout=60)
        _ = r.content
        return time.perf_counter() - t, r.headers.get("X-Tile-Source", "?"), r.status_code

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(fetch, urls))
    elapsed = time.perf_counter() - start
    lat = sorted(r[0] for r in results)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {
        "tiles": len(urls),
        "seconds": round(elapsed, 3),
        "tiles_per_s": round(len(urls) / elapsed, 1),
        "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "sources": dict(Counter(r[1] for r in results)),
        "errors": sum(r[2] != 200 for r in results),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start one on --slides)")
    p.add_argument("--slides", type=Path, default=DEFAULT_SLIDES, help="slides folder for the server we start")
    p.add_argument("--slide", action="append", help="slide path(s) to load (default: CMU-1-Small-Region.svs)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--warm-rounds", type=int, default=3, help="times the warm phase repeats the tile list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_load.json")
    args = p.parse_args()
    slides = args.slide or ["CMU-1-Small-Region.svs"]

    @contextmanager
    def target() -> Iterator[str]:
        if args.url:
            yield args.url.rstrip("/")
        else:
            with _server(args.slides, args.workers, args.threads) as url:
                yield url

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "server": {
            "url": args.url,
            "slides_dir": None if args.url else str(args.slides),
            "workers": None if args.url else args.workers,
            "threads": None if args.url else args.threads,
        },
        "clients": args.clients,
        "slides": {},
    }
    with target() as url:
        for slide in slides:
            urls = dzi_tile_urls(url, slide)
            random.Random(args.seed).shuffle(urls)
            cold = _run(urls, args.clients)
            warm = _run(urls * args.warm_rounds, args.clients)
            report["slides"][slide] = {"cold": cold, "warm": warm}

    print(f"{'slide':34} {'phase':5} {'tiles':>6} {'tiles/s':>8} {'p50 ms':>8} {'p99 ms':>8}  sources")
    for slide, phases in report["slides"].items():
        for phase, r in phases.items():
            srcs = ", ".join(f"{k}={v}" for k, v in sorted(r["sources"].items()))
            print(
                f"{slide[:34]:34} {phase:5} {r['tiles']:6d} {r['tiles_per_s']:8.1f} {r['p50_ms']:8.2f} "
                f"{r['p99_ms']:8.2f}  {srcs}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
