"""A real Prometheus scrapes a real ``tileserver serve`` (gunicorn, 2 workers); every dashboard query returns data.

No mock: Debian's ``/usr/bin/prometheus`` runs on a free loopback port with a 1 s scrape of
the server, the test browses slides the way OpenSeadragon does (descriptor, then tiles, then
the same tiles again), waits until Prometheus has scraped all of it, and then asks
Prometheus's HTTP API for every expression in docker/grafana/dashboards/tileserver.json.

Browsing happens in two rounds with scrapes in between: ``rate()`` only sees increments that
happen after a series' first scrape, so a series must exist before the traffic it measures.

Everything listens on 127.0.0.1 only, every wait has a deadline, and the subprocesses are
started in their own process groups and killed when the module's tests end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.servers import free_port

from .conftest import CMU

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "tileserver.json"
PROMETHEUS = Path(os.environ.get("TILESERVER_TEST_PROMETHEUS", "/usr/bin/prometheus"))
RATE_WINDOW = "10m"  # stands in for Grafana's $__rate_interval; wide so slow CI runs still see both rounds
START_TIMEOUT = 120.0  # seconds for a process to answer (gunicorn workers import torch)
SCRAPE_TIMEOUT = 60.0  # seconds for Prometheus to show what the server has counted
CONVERT_TIMEOUT = 600.0
DZI_NS = "{http://schemas.microsoft.com/deepzoom/2008}"
CMU_SIZE = (2220, 2967)  # CMU-1-Small-Region.svs level 0; Deep Zoom levels 10 and 11 are browsed
# Decode batch metrics come only from neural decodes (classic codecs decode inline).
NEURAL_ONLY = ("tileserver_decode_seconds", "tileserver_decode_batch_size", "tileserver_decode_queue_seconds")


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def running(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd`` in its own process group, killed with its children (gunicorn workers) on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue


def log_tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def http_get(url: str, timeout: float = 60.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def wait_until(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout:.0f} s:\n{log_tail(log)}")


def serve_command_available() -> str | None:
    """None when ``tileserver serve`` can run, else why not."""
    result = subprocess.run(
        [sys.executable, "-m", "tileserver", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        return f"`tileserver serve` is not available: {(result.stderr or result.stdout).strip()[-300:]}"
    return None


def neural_quality() -> int | None:
    """The lowest installed neural quality (the fastest to encode), or None when no model is installed."""
    try:
        from tileserver.codecs.neural import available_qualities
    except ImportError:
        return None
    qualities = available_qualities()
    return min(qualities) if qualities else None


def convert(src: Path, dst: Path, codec: str, quality: int, log: Path) -> str | None:
    """Convert ``src`` to our compressed format at ``dst`` (glass dropped); None when done, else why not."""
    cmd = [sys.executable, "-m", "tileserver", "convert", str(src), str(dst)]
    cmd += ["--codec", codec, "--quality", str(quality), "--glass", "drop", "--no-progress"]
    with log.open("wb") as out:
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=CONVERT_TIMEOUT, check=False)
    if result.returncode != 0 or not dst.is_file():
        return f"`tileserver convert` failed ({result.returncode}):\n{log_tail(log)}"
    return None


def corrupt_one_tile(src: Path, dst: Path) -> tuple[int, int]:
    """Copy ``src`` to ``dst`` with one stored level-0 tile zeroed; its (col, row).

    An archive with a damaged tile is what makes the server answer 5xx (CorruptTile -> 500).
    """
    import tifffile

    shutil.copy2(src, dst)
    with tifffile.TiffFile(dst) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage) and page.tilewidth
        across = math.ceil(page.imagewidth / page.tilewidth)
        index = next(i for i, n in enumerate(page.databytecounts) if n > 0)  # a tissue tile, not glass
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with dst.open("r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(count))
    return index % across, index // across


# --------------------------------------------------------------------------- browsing


@dataclass
class Browser:
    """Fetches like a viewer and remembers what the server answered."""

    base: str
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    tiles_ok: int = 0

    def get(self, path: str, kind: str) -> tuple[int, bytes]:
        status, body = http_get(self.base + urllib.parse.quote(path))
        self.statuses[kind, status] += 1
        if kind == "tile" and status == 200:
            self.tiles_ok += 1
        return status, body

    def tiles(self, slide: str, level: int) -> list[str]:
        """Every tile URL path of Deep Zoom ``level`` of ``slide`` (from its .dzi)."""
        status, body = self.get(f"/{slide}.dzi", "dzi")
        assert status == 200, f"{slide}.dzi: {status} {body[:200]!r}"
        image = ET.fromstring(body)
        size = image.find(f"{DZI_NS}Size")
        assert size is not None
        width, height = int(size.get("Width", "0")), int(size.get("Height", "0"))
        tile, fmt = int(image.get("TileSize", "0")), image.get("Format", "jpeg")
        top = math.ceil(math.log2(max(width, height)))
        scale = 2 ** (top - level)
        w, h = math.ceil(width / scale), math.ceil(height / scale)
        return [
            f"/{slide}_files/{level}/{col}_{row}.{fmt}"
            for row in range(math.ceil(h / tile))
            for col in range(math.ceil(w / tile))
        ]

    def fetch_all(self, paths: list[str]) -> None:
        # Concurrent, as a viewer fetches: lets a worker's decode batcher form batches.
        with ThreadPoolExecutor(max_workers=8) as pool:
            for status, _ in pool.map(lambda p: self.get(p, "tile"), paths):
                assert status == 200, f"tile answered {status}"


# --------------------------------------------------------------------------- Prometheus


@dataclass
class PromAPI:
    base: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url, timeout=30)
        doc = json.loads(body)
        assert status == 200 and doc["status"] == "success", f"{expr}: {status} {doc.get('error')}"
        assert doc["data"]["resultType"] == "vector"
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def dashboard_expressions() -> list[tuple[str, str]]:
    with DASHBOARD.open(encoding="utf-8") as fh:
        panels = [p for p in json.load(fh)["panels"] if p.get("type") != "row"]
    return [(f"{p['title']}/{t['refId']}", t["expr"]) for p in panels for t in p["targets"]]


def to_promql(expr: str) -> str:
    """Grafana's variables replaced by a window that covers the test's traffic."""
    return re.sub(r"\$\{?__(?:rate_)?interval\}?", RATE_WINDOW, expr)


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    prom: PromAPI
    browser: Browser
    neural: bool


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not PROMETHEUS.is_file():
        pytest.skip(f"{PROMETHEUS} not found: install Debian's prometheus package (make system-deps does)")
    reason = serve_command_available()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("prometheus-it")
    slides = tmp / "slides"
    slides.mkdir()
    # A private slides folder: the test adds a converted and a damaged slide beside the original.
    shutil.copy2(CMU, slides / CMU.name)
    neural_q = neural_quality()
    neural = neural_q is not None
    codec, quality = ("neural", neural_q) if neural_q is not None else ("jpeg", 80)
    compressed = f"CMU-1-Small-Region.{codec}.tiff"
    why = convert(CMU, slides / compressed, codec, quality, tmp / "convert.log")
    if why:
        pytest.skip(why)
    corrupt_col, corrupt_row = corrupt_one_tile(slides / compressed, slides / "corrupt.tiff")

    port, prom_port = free_port(), free_port()
    server_log, prom_log = tmp / "server.log", tmp / "prometheus.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TILESERVER_", "PROMETHEUS_MULTIPROC"))}
    env["TILESERVER_THREADS"] = "4"
    serve = [sys.executable, "-m", "tileserver", "serve", str(slides), "--host", "127.0.0.1"]
    serve += ["--port", str(port), "--workers", "2"]
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: tileserver\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n",
        encoding="utf-8",
    )
    prometheus = [
        str(PROMETHEUS),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]
    base = f"http://127.0.0.1:{port}"
    with running(serve, server_log, env) as server, running(prometheus, prom_log) as prom_proc:
        wait_until(
            "tileserver /healthz", lambda: http_get(base + "/healthz", 5)[0] == 200, server, server_log, START_TIMEOUT
        )
        wait_until(
            "tileserver /readyz", lambda: http_get(base + "/readyz", 5)[0] == 200, server, server_log, START_TIMEOUT
        )
        prom = PromAPI(f"http://127.0.0.1:{prom_port}")
        wait_until(
            "Prometheus scraping tileserver",
            lambda: prom.scalar('up{job="tileserver"}') == 1.0,
            prom_proc,
            prom_log,
            START_TIMEOUT,
        )
        browser = Browser(base)

        def scraped_everything() -> None:
            want = float(browser.tiles_ok)
            wait_until(
                f"Prometheus seeing {want:.0f} tile requests",
                lambda: prom.scalar("sum(tileserver_tile_requests_total)") == want,
                prom_proc,
                prom_log,
                SCRAPE_TIMEOUT,
            )
            time.sleep(2.5)  # two more scrapes: a rate() needs samples on both sides of an increment

        status, body = browser.get("/slides.json", "slides")
        assert status == 200, body[:200]
        names = sorted(s["path"] for s in json.loads(body) if s["path"] != "corrupt.tiff")
        assert names == sorted([CMU.name, compressed]), names
        # Round 1: one Deep Zoom level of each slide creates every series.
        first = {name: browser.tiles(name, level=10) for name in names}
        browser.fetch_all([p for paths in first.values() for p in paths])
        damaged = f"/corrupt.tiff_files/{math.ceil(math.log2(max(CMU_SIZE)))}/{corrupt_col}_{corrupt_row}.jpeg"
        assert browser.get(damaged, "tile")[0] == 500  # in both rounds: rate() misses a series' first count
        scraped_everything()
        # Round 2: a new level (new decodes, new glass), the first level again twice (cache hits:
        # with 2 workers each holding its own cache, a tile's third request finds it cached), a
        # missing tile (404) and a damaged one (500).
        browser.fetch_all([p for name in names for p in browser.tiles(name, level=11)])
        for _ in range(2):
            browser.fetch_all([p for paths in first.values() for p in paths])
        browser.get(f"/{CMU.name}_files/99/0_0.jpeg", "tile")
        assert browser.get(damaged, "tile")[0] == 500
        scraped_everything()
        yield Stack(prom=prom, browser=browser, neural=neural)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("where", "expr"), dashboard_expressions(), ids=[w for w, _ in dashboard_expressions()])
def test_dashboard_expression_returns_data(stack: Stack, where: str, expr: str) -> None:
    if not stack.neural and any(name in expr for name in NEURAL_ONLY):
        pytest.skip("no neural model installed: decode batch metrics come only from neural decodes")
    result = stack.prom.query(to_promql(expr))
    assert result, f"{where}: no series for {to_promql(expr)}"
    values = [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), f"{where}: only {values}"


def test_counts_add_up_across_both_workers(stack: Stack) -> None:
    by_source = {
        r["metric"]["source"]: float(r["value"][1])
        for r in stack.prom.query("sum by (source) (tileserver_tile_requests_total)")
    }
    assert by_source.keys() == {"glass", "cache", "decode", "openslide"}, by_source
    assert all(v > 0 for v in by_source.values()), by_source
    assert sum(by_source.values()) == stack.browser.tiles_ok
    hits = stack.prom.scalar("sum(tileserver_cache_hits_total)")
    assert hits is not None and hits >= by_source["cache"]


def test_error_rate_sees_the_server_error(stack: Stack) -> None:
    errors = sum(n for (_, status), n in stack.browser.statuses.items() if status >= 500)
    assert errors == 2
    (expr,) = {e for _, e in dashboard_expressions() if "5.." in e}
    rate = stack.prom.scalar(to_promql(expr))
    assert rate is not None and 0 < rate < 1


def test_http_requests_are_counted_by_endpoint_and_status(stack: Stack) -> None:
    counted = {
        (r["metric"]["endpoint"], int(r["metric"]["status"])): float(r["value"][1])
        for r in stack.prom.query("sum by (endpoint, status) (tileserver_http_requests_total)")
    }
    # Only the browser asks for these endpoints (health checks and scrapes use others).
    for (endpoint, status), sent in stack.browser.statuses.items():
        assert counted.get((endpoint, status)) == sent, (endpoint, status, counted)


def test_build_info_names_the_version(stack: Stack) -> None:
    from tileserver import __version__

    result = stack.prom.query("tileserver_build_info")
    assert {r["metric"]["version"] for r in result} == {__version__}
