"""Serving benchmark: replayed browsing sessions against tileserver and an OpenSlide baseline, in one run.

    .venv/bin/python bench/serve.py               # writes bench/results/serve.json and serve.png

Servers (each started fresh by this script on a loopback port, same gunicorn
settings: gthread, ``--workers`` x ``--threads``; always stopped at the end):

(a) ``tileserver serve`` on the CMU slide converted with the neural codec (glass drop),
(b) ``tileserver serve`` on the CMU slide converted with JPEG q80 4:2:0 (glass drop),
(c) the OpenSlide ``DeepZoomGenerator`` baseline (``bench/baseline_app.py``, modelled on
    openslide-python's ``deepzoom_multiserver`` example) serving the original SVS.

Each browsing session (one per viewer, each with its own start point) does what
a person in OpenSeadragon does: fetch the ``.dzi``; zoom in at the start point from
two levels below the "whole slide fits the screen" level up to full resolution, one
level at a time; pan at full resolution by half a screen in a random walk; zoom back
out.  A screen is 1024 x 768 pixels; each screen's tiles are fetched over up to
``--connections`` parallel keep-alive connections per viewer (browsers use ~6), and a
viewer never refetches a tile it already has (the browser's cache).  ``--viewers``
sessions run at once, with no think time (a closed loop: the measure is capacity).

Each server gets a **cold** pass (just started: empty tile cache, no slide open,
models not loaded) and then a **warm** pass (the same sessions again).  Reported per
pass: tiles/s (tiles answered 200 over the pass's wall time), p50/p95/p99 tile
latency, errors, and the ratio of tiles/s to the baseline's in the same pass.  For
tileserver the pass's ``/metrics`` deltas are kept as a profile (tiles by source:
cache / decode / glass, decode batch sizes and seconds).

Client and servers share this machine's cores; the load is identical for all three
servers, so the ratios are fair, but absolute numbers are lower than on a separate
client.  Only the standard library is used for HTTP (``http.client``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from _common import free_port, machine, neural_model_info

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
DATA = Path(os.environ.get("TILESERVER_TEST_DATA", BENCH.parents[1] / "shared" / "data"))
CMU = DATA / "slides" / "CMU-1-Small-Region.svs"
SCREEN = (1024, 768)
HOST = "127.0.0.1"

Tile = tuple[int, int, int]  # (dz level, col, row)


# ---------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dzi:
    width: int
    height: int
    tile_size: int
    overlap: int
    fmt: str

    @classmethod
    def parse(cls, xml: bytes) -> Dzi:
        root = ET.fromstring(xml)
        ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
        size = root.find(f"{ns}Size")
        if size is None:
            raise ValueError("DZI without <Size>")
        return cls(
            int(size.attrib["Width"]),
            int(size.attrib["Height"]),
            int(root.attrib["TileSize"]),
            int(root.attrib["Overlap"]),
            root.attrib["Format"],
        )

    def level_dims(self) -> list[tuple[int, int]]:
        """Deep Zoom level sizes, level 0 (1 x 1) first."""
        dims = [(self.width, self.height)]
        while dims[-1] != (1, 1):
            w, h = dims[-1]
            dims.append((max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2))))
        return dims[::-1]


def _screen_tiles(dzi: Dzi, dims: tuple[int, int], level: int, cx: float, cy: float) -> list[Tile]:
    """Tiles a 1024 x 768 screen centred at (cx, cy) (level pixels) shows at ``level``."""
    w, h = dims
    ts = dzi.tile_size
    x0, y0 = max(0.0, cx - SCREEN[0] / 2), max(0.0, cy - SCREEN[1] / 2)
    x1, y1 = min(float(w), cx + SCREEN[0] / 2), min(float(h), cy + SCREEN[1] / 2)
    if x1 <= x0 or y1 <= y0:
        return []
    cols = range(int(x0 // ts), int((x1 - 1) // ts) + 1)
    rows = range(int(y0 // ts), int((y1 - 1) // ts) + 1)
    return [(level, c, r) for r in rows for c in cols]


def plan_session(dzi: Dzi, fx: float, fy: float, pan_steps: int, seed: int) -> list[list[Tile]]:
    """The screens (lists of tiles to fetch, already-fetched tiles removed) of one browsing session.

    ``fx``, ``fy``: start point as a fraction of the slide's width and height.
    """
    dims = dzi.level_dims()
    top = len(dims) - 1
    home = max(i for i, (w, h) in enumerate(dims) if (w <= SCREEN[0] and h <= SCREEN[1]) or i == 0)
    rng = random.Random(seed)
    seen: set[Tile] = set()
    screens: list[list[Tile]] = []

    def show(level: int, ufx: float, ufy: float) -> None:
        w, h = dims[level]
        tiles = [t for t in _screen_tiles(dzi, (w, h), level, ufx * w, ufy * h) if t not in seen]
        seen.update(tiles)
        if tiles:
            screens.append(tiles)

    for level in range(max(0, home - 2), top + 1):  # zoom in
        show(level, fx, fy)
    w, h = dims[top]
    step_x, step_y = SCREEN[0] / 2 / w, SCREEN[1] / 2 / h
    for _ in range(pan_steps):  # pan at full resolution, reflecting at the slide's edges
        dx, dy = rng.choice(((1, 0), (-1, 0), (0, 1), (0, -1)))
        nx, ny = fx + dx * step_x, fy + dy * step_y
        fx = nx if 0 <= nx <= 1 else fx - dx * step_x
        fy = ny if 0 <= ny <= 1 else fy - dy * step_y
        fx, fy = min(max(fx, 0.0), 1.0), min(max(fy, 0.0), 1.0)
        show(top, fx, fy)
    for level in range(top - 1, home - 1, -1):  # zoom out
        show(level, fx, fy)
    return screens


def start_points(n: int) -> list[tuple[float, float]]:
    """``n`` different start points spread over the middle of the slide (low-discrepancy)."""
    g = (math.sqrt(5) - 1) / 2
    return [(0.2 + 0.6 * ((0.5 + i * g) % 1), 0.2 + 0.6 * ((0.5 + i * g * g) % 1)) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Load generation
# ---------------------------------------------------------------------------------------------
class _Client:
    """One keep-alive HTTP connection per pool thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def get(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        conn: http.client.HTTPConnection | None = getattr(self.local, "conn", None)
        for attempt in range(2):
            if conn is None:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
                self.local.conn = conn
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
                return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
                self.local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def run_pass(
    port: int, slide_url: str, plans: list[list[list[Tile]]], fmt: str, connections: int, max_seconds: float
) -> dict[str, Any]:
    """Replay every viewer's session at once; returns throughput and latency statistics."""
    client = _Client(port)
    lock = threading.Lock()
    lat: list[float] = []
    dzi_lat: list[float] = []
    errors: dict[str, int] = {}
    sources: dict[str, int] = {}
    nbytes = [0]
    deadline = time.perf_counter() + max_seconds
    truncated = [False]
    pool = ThreadPoolExecutor(max_workers=len(plans) * connections, thread_name_prefix="bench-conn")

    def fetch(path: str, is_tile: bool) -> None:
        t0 = time.perf_counter()
        try:
            status, body, headers = client.get(path)
        except Exception as exc:
            with lock:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        dt = time.perf_counter() - t0
        with lock:
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
                return
            nbytes[0] += len(body)
            if is_tile:
                lat.append(dt)
                src = headers.get("x-tile-source", "-")
                sources[src] = sources.get(src, 0) + 1
            else:
                dzi_lat.append(dt)

    def viewer(screens: list[list[Tile]]) -> None:
        fetch(f"/{slide_url}.dzi", False)
        for screen in screens:
            if time.perf_counter() > deadline:
                truncated[0] = True
                return
            futures = [pool.submit(fetch, f"/{slide_url}_files/{lv}/{c}_{r}.{fmt}", True) for lv, c, r in screen]
            for f in futures:
                f.result()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=viewer, args=(p,), name=f"viewer-{i}") for i, p in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    pool.shutdown(wait=True)
    planned = sum(len(s) for p in plans for s in p)
    return {
        "tiles": len(lat),
        "planned_tiles": planned,
        "truncated_by_time": truncated[0],
        "wall_s": round(wall, 3),
        "tiles_per_s": len(lat) / wall if wall > 0 else None,
        "p50_ms": _pct(lat, 50),
        "p95_ms": _pct(lat, 95),
        "p99_ms": _pct(lat, 99),
        "mean_ms": 1000 * sum(lat) / len(lat) if lat else None,
        "max_ms": 1000 * max(lat) if lat else None,
        "dzi_p50_ms": _pct(dzi_lat, 50),
        "errors": errors,
        "tile_sources": sources,
        "mbytes": round(nbytes[0] / 1e6, 3),
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return 1000 * (s[lo] + (s[hi] - s[lo]) * (k - lo))


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------
_RUNNING: list[subprocess.Popen[bytes]] = []


def _clean_env() -> dict[str, str]:
    # defaults only: no TILESERVER_* settings or metrics directory leaking in from the caller
    return {k: v for k, v in os.environ.items() if not k.startswith("TILESERVER_") and k != "PROMETHEUS_MULTIPROC_DIR"}


def start_server(
    kind: str, slides_dir: Path, workers: int, threads: int, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server in its own process group; returns (process, port)."""
    port = free_port(HOST)
    env = _clean_env()
    if kind == "tileserver":
        cmd = [sys.executable, "-m", "tileserver", "serve", str(slides_dir), "--host", HOST, "--port", str(port)]
        cmd += ["--workers", str(workers), "--threads", str(threads)]
    else:
        env["BASELINE_SLIDE_DIR"] = str(slides_dir)
        cmd = [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", str(workers), "--threads", str(threads)]
        cmd += ["-b", f"{HOST}:{port}", "--chdir", str(BENCH), "--log-level", "warning", "baseline_app:create_app()"]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _RUNNING.append(proc)
    return proc, port


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's whole process group (gunicorn master and workers): TERM, then KILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # workers left behind by a dead master are still in the group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc in _RUNNING:
        _RUNNING.remove(proc)


def _stop_all() -> None:
    for proc in list(_RUNNING):
        stop_server(proc)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _stop_all()
    raise SystemExit(128 + signum)


def wait_ready(proc: subprocess.Popen[bytes], port: int, path: str, log: Path, timeout: float = 120) -> float:
    """Poll ``path`` until it answers 200; returns seconds waited.  Raises with the log's tail on failure."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status == 200:
                return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


_METRIC = re.compile(r"^(tileserver_[a-z_]+?)(_total|_sum|_count)?(\{[^}]*\})? ([-+0-9.eE]+|NaN)$")
_PROFILE_FAMILIES = (
    "tileserver_tile_requests",
    "tileserver_tile_seconds",
    "tileserver_decode_seconds",
    "tileserver_decode_batch_size",
    "tileserver_decode_queue_seconds",
    "tileserver_cache_hits",
    "tileserver_cache_misses",
)


def scrape(port: int) -> dict[str, float]:
    """Counters and histogram sums/counts of the families the profile uses (empty when unavailable)."""
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
    except OSError:
        return {}
    if resp.status != 200:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m or m.group(1) not in _PROFILE_FAMILIES or (m.group(2) is None and "_bucket" in line):
            continue
        key = m.group(1) + (m.group(2) or "") + (m.group(3) or "")
        out[key] = out.get(key, 0.0) + float(m.group(4))
    return out


def profile(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the pass cost the server, from /metrics deltas."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
    by_source: dict[str, dict[str, float]] = {}
    for k, v in delta.items():
        m = re.search(r'source="([^"]+)"', k)
        if not m:
            continue
        src = by_source.setdefault(m.group(1), {})
        if k.startswith("tileserver_tile_requests_total"):
            src["requests"] = src.get("requests", 0) + v
        elif k.startswith("tileserver_tile_seconds_sum"):
            src["seconds"] = src.get("seconds", 0) + v
    for src in by_source.values():
        if src.get("requests"):
            src["mean_ms"] = 1000 * src.get("seconds", 0.0) / src["requests"]

    def total(prefix: str) -> float:
        return sum(v for k, v in delta.items() if k.startswith(prefix))

    batches = total("tileserver_decode_batch_size_count")
    return {
        "tiles_by_source": by_source,
        "decode_batches": batches,
        "decode_mean_batch_size": total("tileserver_decode_batch_size_sum") / batches if batches else None,
        "decode_seconds": total("tileserver_decode_seconds_sum"),
        "decode_ms_per_batch": 1000 * total("tileserver_decode_seconds_sum") / batches if batches else None,
        "decode_queue_ms_mean": 1000
        * total("tileserver_decode_queue_seconds_sum")
        / max(1.0, total("tileserver_decode_queue_seconds_count")),
        "cache_hits": total("tileserver_cache_hits_total"),
        "cache_misses": total("tileserver_cache_misses_total"),
        "raw": delta,
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def bench_target(
    name: str, kind: str, slides_dir: Path, rel: str, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    log = log_dir / f"{name}.log"
    proc, port = start_server(kind, slides_dir, args.workers, args.threads, log)
    try:
        # ready when /healthz answers: the slide is still unopened and no model loaded for the cold pass
        startup = wait_ready(proc, port, "/healthz", log)
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        conn.request("GET", f"/{rel}.dzi")
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"{name}: GET /{rel}.dzi answered {resp.status}: {body[:200]!r}")
        dzi = Dzi.parse(body)
        plans = [
            plan_session(dzi, fx, fy, args.pan_steps, seed=i) for i, (fx, fy) in enumerate(start_points(args.viewers))
        ]
        out: dict[str, Any] = {"kind": kind, "slide": rel, "startup_s": round(startup, 2), "dzi": dzi.__dict__}
        for phase in ("cold", "warm"):
            before = scrape(port) if kind == "tileserver" else {}
            out[phase] = run_pass(port, rel, plans, dzi.fmt, args.connections, args.max_seconds)
            if kind == "tileserver":
                out[phase]["profile"] = profile(before, scrape(port))
            r = out[phase]
            print(
                f"  {name} {phase}: {r['tiles']} tiles in {r['wall_s']:.1f} s = {r['tiles_per_s'] or 0:.1f} tiles/s, "
                f"p50 {r['p50_ms'] or 0:.1f} ms, p99 {r['p99_ms'] or 0:.1f} ms, errors {r['errors'] or 0}",
                flush=True,
            )
        return out
    finally:
        stop_server(proc)


def convert_slides(tmp: Path, neural_quality: int | None, notes: list[str]) -> dict[str, Path]:
    """The converted CMU slides, each alone in its own folder (as served)."""
    from tileserver.codecs import get as get_codec
    from tileserver.convert import convert

    out: dict[str, Path] = {}
    specs: list[tuple[str, str, dict[str, Any]]] = []
    if neural_quality is not None:
        specs.append(("neural", "neural", {"quality": neural_quality}))
    specs.append(("jpeg", "jpeg", {"quality": 80, "subsampling": "420"}))
    for name, codec, params in specs:
        folder = tmp / name
        folder.mkdir()
        dst = folder / "CMU-1-Small-Region.tiff"
        t0 = time.time()
        try:
            convert(CMU, dst, codec=get_codec(codec, **params), glass="drop", progress=False, workers=2)
        except Exception as exc:
            notes.append(f"{name}: conversion failed, target skipped: {exc}")
            continue
        print(f"  converted {name} {params} in {time.time() - t0:.0f} s ({dst.stat().st_size:,} bytes)", flush=True)
        out[name] = folder
    return out


def _neural_quality(requested: int | None, notes: list[str]) -> int | None:
    try:
        from tileserver.codecs import neural

        qs = neural.available_qualities()
    except ImportError as exc:
        notes.append(f"neural target skipped: {exc}")
        return None
    if not qs:
        notes.append("neural target skipped: no neural weights installed")
        return None
    if requested is not None and requested not in qs:
        notes.append(f"neural target skipped: quality {requested} not installed (have {qs})")
        return None
    return requested if requested is not None else qs[len(qs) // 2]


def print_table(res: dict[str, Any]) -> None:
    print("\n| server | slide | pass | tiles | tiles/s | × baseline | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")

    def f(v: Any, spec: str = ".1f") -> str:
        return "–" if v is None else format(v, spec)

    for name, t in res["targets"].items():
        for phase in ("cold", "warm"):
            r = t.get(phase)
            if not r:
                continue
            ratio = res["ratios"].get(name, {}).get(phase)
            print(
                f"| {name} | {t['slide']} | {phase} | {r['tiles']} | {f(r['tiles_per_s'])} | {f(ratio, '.2f')} "
                f"| {f(r['p50_ms'])} | {f(r['p95_ms'])} | {f(r['p99_ms'])} | {sum(r['errors'].values())} |"
            )


def plot(res: dict[str, Any], path: Path) -> None:
    """Tiles/s per server and pass, and tile latency percentiles (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["targets"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.38
    for i, phase in enumerate(("cold", "warm")):
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        tps = [res["targets"][n][phase]["tiles_per_s"] or 0 for n in names]
        axes[0].bar(xs, tps, width, label=phase)
    axes[0].set_xticks(range(len(names)), names, fontsize=8)
    axes[0].set(ylabel="tiles / s", title="browsing throughput (higher is better)")
    axes[0].legend()
    labels, p50, p95, p99 = [], [], [], []
    for n in names:
        for phase in ("cold", "warm"):
            r = res["targets"][n][phase]
            labels.append(f"{n.replace('tileserver-', '').replace('openslide-', '')}\n{phase}")
            p50.append(r["p50_ms"] or 0)
            p95.append(r["p95_ms"] or 0)
            p99.append(r["p99_ms"] or 0)
    xs2 = list(range(len(labels)))
    for k, (vals, lab) in enumerate(((p50, "p50"), (p95, "p95"), (p99, "p99"))):
        axes[1].bar([x + (k - 1) * 0.27 for x in xs2], vals, 0.27, label=lab)
    axes[1].set_yscale("log")
    axes[1].set_xticks(xs2, labels, fontsize=7)
    axes[1].set(ylabel="tile latency (ms)", title="tile latency (lower is better)")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    ap.add_argument("--viewers", type=int, default=8, help="concurrent browsing sessions (default 8)")
    ap.add_argument("--connections", type=int, default=4, help="parallel connections per viewer (default 4)")
    ap.add_argument("--pan-steps", type=int, default=12, help="half-screen pans at full resolution (default 12)")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers, every server (default 2)")
    ap.add_argument("--threads", type=int, default=8, help="gunicorn threads per worker, every server (default 8)")
    ap.add_argument("--max-seconds", type=float, default=150, help="time cap per pass (default 150)")
    ap.add_argument("--neural-quality", type=int, default=None, help="default: the middle shipped quality")
    ap.add_argument("--no-neural", action="store_true")
    args = ap.parse_args(argv)
    if not CMU.exists():
        print(f"{CMU}: not found (set TILESERVER_TEST_DATA)", file=sys.stderr)
        return 2

    atexit.register(_stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    t0 = time.time()
    notes: list[str] = []
    nq = None if args.no_neural else _neural_quality(args.neural_quality, notes)
    res: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "workers": args.workers,
            "threads": args.threads,
            "viewers": args.viewers,
            "connections_per_viewer": args.connections,
            "pan_steps": args.pan_steps,
            "screen": list(SCREEN),
            "max_seconds_per_pass": args.max_seconds,
            "neural_quality": nq,
            "neural_model": neural_model_info(nq),
            "jpeg": {"quality": 80, "subsampling": "420"},
            "glass": "drop",
        },
        "targets": {},
        "ratios": {},
        "notes": notes,
    }
    tmp = Path(tempfile.mkdtemp(prefix="tileserver-bench-serve-"))
    try:
        print("converting the CMU slide ...", flush=True)
        folders = convert_slides(tmp, nq, notes)
        targets: list[tuple[str, str, Path, str]] = [
            (f"tileserver-{name}", "tileserver", folder, "CMU-1-Small-Region.tiff") for name, folder in folders.items()
        ]
        targets.append(("openslide-baseline", "baseline", CMU.parent, CMU.name))
        for name, kind, folder, rel in targets:
            print(f"{name}: serving {folder / rel}", flush=True)
            try:
                res["targets"][name] = bench_target(name, kind, folder, rel, args, tmp)
            except RuntimeError as exc:
                notes.append(f"{name}: {exc}")
                print(f"  {name}: failed: {exc}", file=sys.stderr)
    finally:
        _stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    base = res["targets"].get("openslide-baseline")
    for name, t in res["targets"].items():
        res["ratios"][name] = {
            phase: (t[phase]["tiles_per_s"] / base[phase]["tiles_per_s"])
            if base and t[phase]["tiles_per_s"] and base[phase]["tiles_per_s"]
            else None
            for phase in ("cold", "warm")
        }
    res["wall_s"] = round(time.time() - t0, 1)
    print_table(res)
    summary = {
        name: {
            ph: {k: t[ph][k] for k in ("tiles", "tiles_per_s", "p50_ms", "p95_ms", "p99_ms")} for ph in ("cold", "warm")
        }
        for name, t in res["targets"].items()
    }
    print(json.dumps({"summary": summary, "ratios": res["ratios"], "notes": notes, "wall_s": res["wall_s"]}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    if res["targets"]:
        plot(res, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {res['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
