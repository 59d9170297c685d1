"""``tileserver serve`` under gunicorn with two workers: metrics add up across workers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import SLIDES
from tests.servers import serve

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(SLIDES, tmp_path_factory.mktemp("serve") / "serve.log", workers=2, threads=4) as (base, _):
        yield base


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_counts_add_up_across_workers(server: str) -> None:
    def get(url: str) -> requests.Response:
        with requests.Session() as s:  # a new connection each time, so both workers get requests
            return s.get(server + url, timeout=30)

    before = get("/metrics").text  # the fixture's start-up probes are counted too
    pids: set[int] = set()
    health = 0
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            for r in pool.map(get, ["/healthz"] * 16):
                pids.add(r.json()["pid"])
                health += 1
            if len(pids) == 2:
                break
    assert len(pids) == 2, "requests never reached the second worker"

    tiles = [f"/CMU-1-Small-Region.svs_files/11/{c}_{r}.jpeg" for c in range(5) for r in range(6)]
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(get, tiles))
        second = list(pool.map(get, tiles))
    assert all(r.status_code == 200 for r in first + second)
    sources = [r.headers["X-Tile-Source"] for r in first + second]

    text = get("/metrics").text
    assert _metric_sum(text, "tileserver_tile_requests_total") == len(tiles) * 2
    for source in ("openslide", "cache"):
        assert _metric_sum(text, "tileserver_tile_requests_total", source=source) == sources.count(source)
    assert _metric_sum(text, "tileserver_tile_seconds_count") == len(tiles) * 2
    healthz = "tileserver_http_requests_total"
    assert _metric_sum(text, healthz, endpoint="healthz") - _metric_sum(before, healthz, endpoint="healthz") == health
    hits = _metric_sum(text, "tileserver_cache_hits_total")
    misses = _metric_sum(text, "tileserver_cache_misses_total")
    assert hits == sources.count("cache")
    assert hits + misses == len(tiles) * 2
    assert _metric_sum(text, "tileserver_cache_bytes") > 0
