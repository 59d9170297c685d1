"""Bounded load and soak of ``tileserver serve`` (gunicorn), with a worker killed mid-load.

Starts ``tileserver serve`` on a loopback port over a temporary folder holding
copies of the shared slides and their conversions (JPEG with glass dropped, and
neural when weights are installed), then runs ``--clients`` concurrent clients
for ``--duration`` seconds.  Each client keeps one HTTP connection and fetches
random Deep Zoom tiles from the finest few levels of every slide, with now and
then a descriptor, properties or a thumbnail.  Meanwhile it samples the
resident memory of all gunicorn workers (psutil), and half-way through it
SIGKILLs one worker and watches gunicorn replace it.

Reports (table on stdout, JSON to ``--out``): requests, errors (split into
those around the kill and the rest), p50/p99 latency, throughput, the peak sum
of worker RSS against the bound ``workers x (cache size + fixed overhead)``
where the overhead is an idle worker's RSS after start-up (models loaded), the
slide-level caches of the slides served (OpenSlide's 32 MiB per open slide, our
reader's 64 decoded tiles per open slide) and a margin for decode buffers, and
whether the killed worker was replaced.  Exit status 1 when a check fails::

    python bench/soak.py                                 # 32 clients, 60 s, writes bench/results/soak.json
    python bench/soak.py --clients 8 --duration 10 --no-neural --out /tmp/soak.json   # CI size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import requests
from _common import dzi_tile_urls, free_port

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TILESERVER_TEST_DATA", ROOT.parent / "shared" / "data"))
SOURCES = [DATA / "slides" / "CMU-1-Small-Region.svs", DATA / "slides" / "test3-TRITC 2 (560).ndpi"]
MB = 1024 * 1024
#: added to an idle worker's RSS to make the fixed per-worker overhead (decode buffers, Python heaps)
OVERHEAD_MARGIN_MB = 256
#: OpenSlide's default cache per open slide, and our container reader's decoded-tile cache per open slide
OPENSLIDE_CACHE = 64 * MB  # one cache shared by all OpenSlide slides of a worker (openslide_reader.py)
REGION_CACHE = 64 * 256 * 256 * 3
#: seconds after the kill in which failed requests are attributed to it
KILL_WINDOW_S = 10.0


def prepare_slides(folder: Path, neural: bool) -> list[str]:
    """Copy the source slides into ``folder`` and convert CMU there; returns the slide paths."""
    from tileserver.convert import convert

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for src in SOURCES:
        shutil.copy(src, folder / src.name)
        names.append(src.name)
    cmu = SOURCES[0]
    convert(cmu, folder / "converted" / "cmu-jpeg.tiff", codec="jpeg", glass="drop", progress=False, quality_samples=8)
    names.append("converted/cmu-jpeg.tiff")
    if neural:
        convert(
            cmu,
            folder / "converted" / "cmu-neural.tiff",
            codec="neural",
            glass="drop",
            progress=False,
            quality_samples=8,
        )
        names.append("converted/cmu-neural.tiff")
    return names


@contextmanager
def server(slides: Path, workers: int, threads: int, cache_bytes: int, log: Path) -> Iterator[tuple[str, int]]:
    """``tileserver serve`` on a free loopback port; yields (base URL, master pid)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TILESERVER_", "PROMETHEUS_"))}
    env["TILESERVER_CACHE_BYTES"] = str(cache_bytes)
    cmd = [sys.executable, "-m", "tileserver", "serve", str(slides), "--port", str(port)]
    cmd += ["--workers", str(workers), "--threads", str(threads)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while len(_workers(proc.pid)) < workers or not _all_ready(url, workers):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _all_ready(url: str, workers: int) -> bool:
    """True once /readyz has answered 200 from ``workers`` different worker pids (new connections)."""
    seen = set()
    for _ in range(workers * 6):
        try:
            with requests.Session() as s:
                r = s.get(url + "/readyz", timeout=5)
                if r.status_code != 200:
                    return False
                seen.add(s.get(url + "/healthz", timeout=5).json()["pid"])
        except requests.RequestException:
            return False
        if len(seen) >= workers:
            return True
    return False


def _answering_pids(url: str, rounds: int, width: int) -> set[int]:
    """Worker pids seen answering /healthz over ``rounds`` bursts of ``width`` concurrent new connections."""
    seen: set[int] = set()

    def ask(_: int) -> int:
        with requests.Session() as s:
            return int(s.get(url + "/healthz", timeout=10).json()["pid"])

    with ThreadPoolExecutor(width) as pool:
        for _ in range(rounds):
            seen.update(pool.map(ask, range(width)))
    return seen


def _workers(master: int) -> list[psutil.Process]:
    try:
        return psutil.Process(master).children()
    except psutil.Error:
        return []


def _rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass  # a worker that just died
    return total


@dataclass
class Sample:
    t: float  # seconds since the start of the load
    seconds: float
    status: int  # 0: connection error
    kind: str
    source: str = ""
    client: int = -1


@dataclass
class Load:
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def run_clients(
    url: str,
    slides: list[str],
    tiles: list[str],
    clients: int,
    duration: float,
    seed: int,
    load: Load,
    t0: float,
    max_requests: int,
) -> None:
    """``clients`` threads, each on its own keep-alive session, until ``duration`` or ``max_requests``."""
    stop = t0 + duration
    count = [0]

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        session = requests.Session()
        while time.monotonic() < stop:
            with load.lock:
                if count[0] >= max_requests:
                    return
                count[0] += 1
            roll = rng.random()
            if roll < 0.92:
                u, kind = rng.choice(tiles), "tile"
            else:
                slide = quote(rng.choice(slides))
                u, kind = rng.choice(
                    [
                        (f"{url}/{slide}.dzi", "dzi"),
                        (f"{url}/{slide}/properties.json", "properties"),
                        (f"{url}/{slide}/thumbnail.jpeg?size=256", "thumbnail"),
                    ]
                )
            start = time.monotonic()
            try:
                r = session.get(u, timeout=60)
                _ = r.content
                source = r.headers.get("X-Tile-Source", "")
                sample = Sample(start - t0, time.monotonic() - start, r.status_code, kind, source, k)
            except requests.RequestException:
                sample = Sample(start - t0, time.monotonic() - start, 0, kind, "", k)
                session.close()
                session = requests.Session()
            with load.lock:
                load.samples.append(sample)
        session.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(duration + 120)


def _quantile(values: list[float], q: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole experiment; returns the report."""
    cache_bytes = args.cache_mb * MB
    with tempfile.TemporaryDirectory(prefix="tileserver-soak-") as tmp:
        folder = Path(tmp) / "slides"
        t_prep = time.monotonic()
        slides = prepare_slides(folder, args.neural)
        prep_s = time.monotonic() - t_prep
        log = Path(tmp) / "serve.log"
        with server(folder, args.workers, args.threads, cache_bytes, log) as (url, master):
            tiles = [u for s in slides for u in dzi_tile_urls(url, s, args.levels)]
            idle_rss = _rss(_workers(master)) / args.workers
            # The caches a worker may fill besides the tile cache, all bounded: one OpenSlide cache
            # shared by its OpenSlide slides, our container reader 64 decoded tiles per open slide.
            n_openslide = sum(not s.endswith(".tiff") for s in slides)
            n_container = len(slides) - n_openslide
            slide_caches = (OPENSLIDE_CACHE if n_openslide else 0) + n_container * REGION_CACHE
            overhead = idle_rss + slide_caches + OVERHEAD_MARGIN_MB * MB
            bound = args.workers * (cache_bytes + overhead)
            load = Load()
            mem: list[tuple[float, int, int]] = []  # (t, rss sum, worker count)
            timeline: list[dict[str, Any]] = []  # every ~2 s: RSS of each worker, MB
            kill: dict[str, Any] = {}
            t0 = time.monotonic()
            runner = threading.Thread(
                target=run_clients,
                args=(url, slides, tiles, args.clients, args.duration, args.seed, load, t0, args.max_requests),
            )
            runner.start()
            while runner.is_alive():
                now = time.monotonic() - t0
                procs = _workers(master)
                mem.append((now, _rss(procs), len(procs)))
                if not timeline or now - timeline[-1]["t"] >= 2.0:
                    timeline.append({"t": round(now, 1), "rss_mb": {p.pid: round(_rss([p]) / MB) for p in procs}})
                if args.kill and not kill and now >= args.duration / 2 and procs:
                    victim = random.Random(args.seed).choice(procs)
                    kill = {"pid": victim.pid, "t": now, "workers_before": sorted(p.pid for p in procs)}
                    os.kill(victim.pid, signal.SIGKILL)
                if kill and "replaced_after_s" not in kill:
                    pids = {p.pid for p in procs}
                    new = pids - set(kill["workers_before"])
                    if len(pids) >= args.workers and new and kill["pid"] not in pids:
                        kill["replaced_after_s"] = round(now - kill["t"], 2)
                        kill["new_pid"] = sorted(new)[0]
                runner.join(0.25)
            elapsed = time.monotonic() - t0
            served_after = None
            if kill:
                # the replacement serves: concurrent fresh connections, so both workers accept some
                # (it may still be starting up: importing torch and loading models takes seconds)
                give_up = time.monotonic() + 120
                while not served_after and time.monotonic() < give_up:
                    served_after = kill.get("new_pid") in _answering_pids(url, rounds=2, width=8)
                    if not served_after:
                        time.sleep(0.5)
                kill["replacement_serves"] = bool(served_after)
                kill["replacement_seen_answering_at_s"] = round(time.monotonic() - t0, 1)  # probed after the load
            server_log = log.read_text()
    samples = load.samples
    ok = [s for s in samples if s.status == 200]
    errors = [s for s in samples if s.status not in (200, 304)]
    # a failure belongs to the kill when the request was in flight then (started before, ended after)
    # or started shortly after it on a connection to the dead worker
    in_window = [s for s in errors if kill and s.t <= kill["t"] + KILL_WINDOW_S and s.t + s.seconds >= kill["t"] - 0.1]
    outside = [s for s in errors if s not in in_window]
    lat = sorted(s.seconds for s in ok)
    tile_lat = sorted(s.seconds for s in ok if s.kind == "tile")
    peak = max((m[1] for m in mem), default=0)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": {
            "clients": args.clients,
            "duration_s": args.duration,
            "workers": args.workers,
            "threads": args.threads,
            "cache_mb": args.cache_mb,
            "levels": args.levels,
            "seed": args.seed,
            "max_requests": args.max_requests,
            "kill_worker": args.kill,
        },
        "slides": slides,
        "tile_urls": len(tiles),
        "prepare_s": round(prep_s, 1),
        "requests": len(samples),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(samples) / elapsed, 1) if elapsed else 0.0,
        "errors": len(errors),
        "errors_outside_kill_window": len(outside),
        "errors_in_kill_window": len(in_window),
        "max_kill_errors_per_client": max(Counter(s.client for s in in_window).values(), default=0),
        "error_statuses": dict(Counter(str(s.status) for s in errors)),
        "latency_ms": {
            "p50": round(_quantile(lat, 50) * 1000, 1),
            "p99": round(_quantile(lat, 99) * 1000, 1),
            "max": round((lat[-1] if lat else 0) * 1000, 1),
        },
        "tile_latency_ms": {
            "p50": round(_quantile(tile_lat, 50) * 1000, 1),
            "p99": round(_quantile(tile_lat, 99) * 1000, 1),
        },
        "sources": dict(Counter(s.source or s.kind for s in ok)),
        "memory": {
            "idle_worker_rss_mb": round(idle_rss / MB, 1),
            "slide_caches_per_worker_mb": round(slide_caches / MB, 1),
            "margin_per_worker_mb": OVERHEAD_MARGIN_MB,
            "overhead_per_worker_mb": round(overhead / MB, 1),
            "bound_mb": round(bound / MB, 1),
            "peak_workers_rss_mb": round(peak / MB, 1),
            "final_workers_rss_mb": round((mem[-1][1] if mem else 0) / MB, 1),
            "samples": len(mem),
            "timeline": timeline,
        },
        "kill": kill,
        "server_log_tracebacks": server_log.count("Traceback"),
    }
    checks = {
        "no_errors_outside_kill": not outside,
        "kill_errors_at_most_clients": len(in_window) <= args.clients,
        "memory_under_bound": peak <= bound,
        "worker_replaced": (not args.kill) or ("replaced_after_s" in kill and bool(served_after)),
        "some_requests": len(ok) > 0,
    }
    report["checks"] = checks
    report["passed"] = all(checks.values())
    return report


def _table(r: dict[str, Any]) -> str:
    m, k = r["memory"], r["kill"]
    rows = [
        (
            "requests",
            f"{r['requests']} in {r['seconds']} s ({r['requests_per_s']}/s), {r['config']['clients']} clients",
        ),
        (
            "errors",
            f"{r['errors']} ({r['errors_in_kill_window']} around the kill, {r['errors_outside_kill_window']} else)",
        ),
        (
            "latency",
            f"p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms, max {r['latency_ms']['max']} ms",
        ),
        ("tiles", f"p50 {r['tile_latency_ms']['p50']} ms, p99 {r['tile_latency_ms']['p99']} ms; {r['sources']}"),
        (
            "memory",
            f"peak {m['peak_workers_rss_mb']} MB of {r['config']['workers']} workers, bound {m['bound_mb']} MB "
            f"(cache {r['config']['cache_mb']} MB + {m['overhead_per_worker_mb']} MB each)",
        ),
        (
            "kill",
            f"pid {k.get('pid')} at {k.get('t', 0):.1f} s, replaced after {k.get('replaced_after_s')} s, "
            f"serves: {k.get('replacement_serves')}"
            if k
            else "not done",
        ),
        ("checks", ", ".join(f"{n}={'ok' if v else 'FAIL'}" for n, v in r["checks"].items())),
    ]
    return "\n".join(f"{a:<9} {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=200_000, help="stop earlier after this many requests")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--cache-mb", type=int, default=32, help="tile cache per worker (TILESERVER_CACHE_BYTES)")
    p.add_argument("--levels", type=int, default=4, help="finest Deep Zoom levels whose tiles are requested")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kill", dest="kill", action="store_false", help="do not kill a worker mid-load")
    p.add_argument("--neural", dest="neural", action="store_true", default=None, help="serve a neural copy too")
    p.add_argument("--no-neural", dest="neural", action="store_false")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = p.parse_args(argv)
    if args.neural is None:
        try:
            from tileserver.codecs.neural import available_qualities

            args.neural = bool(available_qualities())
        except ImportError:
            args.neural = False
    report = soak(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
