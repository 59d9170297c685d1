"""Resource limits: capped thumbnails, a bounded number of open slides, slow clients that cannot starve workers."""

from __future__ import annotations

import io
import random
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.conftest import FIXTURES, SLIDES
from tests.servers import serve
from tileserver.config import load_settings
from tileserver.server import create_app
from tileserver.server.gunicorn import TileServerApplication
from tileserver.slides import SlideReader, open_slide
from tileserver.tiles import MAX_READ_PIXELS, TileService

from ..server.conftest import make_settings
from .conftest import record

pytestmark = [pytest.mark.shared_data]

CMU_URL = "/CMU-1-Small-Region.svs"


# -- huge requests -----------------------------------------------------------------------------


@pytest.mark.parametrize("thumbnail_max", [1024, 100])
def test_huge_thumbnails_are_capped(thumbnail_max: int) -> None:
    app = create_app(make_settings(SLIDES, thumbnail_max=thumbnail_max))
    c = app.test_client()
    try:
        for size in ("100000", str(10**12), str(2**70), "999999999999999999999999999999"):
            r = c.get(f"{CMU_URL}/thumbnail.jpeg?size={size}")
            assert r.status_code == 200, size
            assert max(Image.open(io.BytesIO(r.data)).size) <= thumbnail_max
        for size in ("-5", "-100000"):
            assert 400 <= c.get(f"{CMU_URL}/thumbnail.jpeg?size={size}").status_code < 500
        for size in ("0", "abc", "1e9", ""):  # not a positive integer: the default size, capped
            r = c.get(f"{CMU_URL}/thumbnail.jpeg?size={size}")
            assert r.status_code == 200 and max(Image.open(io.BytesIO(r.data)).size) <= thumbnail_max
    finally:
        app.extensions["tileserver"].close()


@pytest.mark.parametrize(
    "url",
    [
        f"{CMU_URL}_files/{10**30}/0_0.jpeg",
        f"{CMU_URL}_files/12/{2**64}_0.jpeg",
        f"{CMU_URL}_files/12/0_{2**64}.jpeg",
        f"{CMU_URL}_files/-1/0_0.jpeg",
        f"{CMU_URL}_files/12/0_0.tiff",
        f"{CMU_URL}_files/12/0_0." + "j" * 10000,
    ],
)
def test_out_of_range_tiles_are_404(url: str) -> None:
    app = create_app(make_settings(SLIDES))
    try:
        assert app.test_client().get(url).status_code == 404
    finally:
        app.extensions["tileserver"].close()


class FlatSlide(SlideReader):
    """A 200,000 x 150,000 slide with no pyramid: one level.  Records every region read (returns blanks)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: list[tuple[int, int]] = []

    @classmethod
    def detect_format(cls, filename: object) -> str | None:
        return "flat"

    @property
    def level_count(self) -> int:
        return 1

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return ((200_000, 150_000),)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    @property
    def properties(self) -> Mapping[str, str]:
        return {}

    @property
    def associated_images(self) -> Mapping[str, Image.Image]:
        return {}

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return 0

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        self.reads.append(size)
        if size[0] * size[1] > MAX_READ_PIXELS:
            raise AssertionError(f"read {size} pixels: {size[0] * size[1] * 4 / 2**30:.0f} GiB")
        return Image.new("RGBA", size, (200, 100, 50, 255))

    def close(self) -> None:
        pass


def test_reads_without_a_pyramid_are_capped(tmp_path: Path) -> None:
    # A thumbnail, or a zoomed-out Deep Zoom tile, of a slide with no pyramid would read a whole
    # level (here 120 GiB of RGBA); the service refuses instead of allocating.
    (tmp_path / "flat.svs").write_bytes(b"flat")
    slide = FlatSlide(tmp_path / "flat.svs")
    svc = TileService(make_settings(tmp_path), opener=lambda p: slide, detector=lambda p: "flat")
    app = create_app(svc.settings, service=svc)
    c = app.test_client()
    try:
        top = 18  # ceil(log2(200000))
        assert c.get(f"/flat.svs_files/{top}/10_10.jpeg").status_code == 200  # full resolution: one 256 px read
        assert c.get(f"/flat.svs_files/{top - 4}/3_3.jpeg").status_code == 200  # 4096 px square: allowed
        assert c.get("/flat.svs_files/2/0_0.jpeg").status_code == 404  # the whole slide in one tile
        assert c.get("/flat.svs/thumbnail.jpeg").status_code == 404
        assert c.get("/flat.svs.dzi").status_code == 200
    finally:
        svc.close()
    largest = max(w * h for w, h in slide.reads)
    assert largest <= MAX_READ_PIXELS
    record(
        "unpyramided_reads",
        {"slide_pixels": 200_000 * 150_000, "largest_read_pixels": largest, "limit_pixels": MAX_READ_PIXELS},
    )


# -- open slides -------------------------------------------------------------------------------


class CountingOpener:
    """Opens slides and tracks how many are open at once."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.opens = 0
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> SlideReader:
        slide = open_slide(path)
        close = slide.close

        def counted_close() -> None:
            with self._lock:
                self.live -= 1
            close()

        slide.close = counted_close  # type: ignore[method-assign]
        with self._lock:
            self.live += 1
            self.opens += 1
            self.peak = max(self.peak, self.live)
        return slide


def test_open_slides_are_bounded(tmp_path: Path) -> None:
    names = [f"s{i}.svs" for i in range(10)]
    for n in names:
        shutil.copy(FIXTURES / "small.svs", tmp_path / n)
    opener = CountingOpener()
    max_open, clients = 3, 8
    svc = TileService(make_settings(tmp_path, max_open_slides=max_open), opener=opener)
    app = create_app(svc.settings, service=svc)
    c = app.test_client()
    try:
        # one at a time: never more than max_open open
        for n in names * 2:
            assert c.get(f"/{n}.dzi").status_code == 200
            assert len(svc.slides) <= max_open and opener.live <= max_open
        # concurrently: the cache holds max_open; slides still in use by a request close when released
        rng = random.Random(0)
        urls = [
            f"/{rng.choice(names)}" + rng.choice([".dzi", "/properties.json", "_files/0/0_0.jpeg"]) for _ in range(400)
        ]
        over: list[int] = []

        def get(url: str) -> int:
            status = app.test_client().get(url).status_code
            if len(svc.slides) > max_open:
                over.append(len(svc.slides))
            return status

        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(get, urls))
        assert set(statuses) == {200}
        assert not over
        assert opener.peak <= max_open + clients
        assert opener.live <= max_open
        listing = c.get("/slides.json").get_json()  # listing every slide opens each: still bounded
        assert len(listing) == len(names) and opener.live <= max_open
    finally:
        svc.close()
    assert opener.live == 0
    record(
        "open_slides_bound",
        {
            "max_open_slides": max_open,
            "slides": len(names),
            "requests": 2 * len(names) + len(urls) + 1,
            "opens": opener.opens,
            "peak_open_at_once": opener.peak,
            "clients": clients,
        },
    )


# -- slow clients ------------------------------------------------------------------------------


def test_gunicorn_settings_bound_slow_clients() -> None:
    app = TileServerApplication(load_settings(env={}, slides_dir=str(SLIDES)))
    cfg = app.cfg
    assert cfg.worker_class_str == "gthread"
    assert 0 < cfg.timeout <= 300, "a stuck worker is restarted"
    assert 0 < cfg.graceful_timeout <= 300
    assert 0 < cfg.keepalive <= 10, "idle kept-alive connections are closed"
    assert 0 < cfg.limit_request_line <= 8190 and 0 < cfg.limit_request_fields <= 100
    assert 0 < cfg.limit_request_field_size <= 8190


TRICKLE_TIMEOUT = 3  # seconds: the server's ``timeout`` setting for this test
ANSWER_WITHIN = 60  # seconds: a hang guard, not a speed check


@pytest.mark.slow
def test_idle_and_slow_clients_do_not_block_others(tmp_path: Path) -> None:
    # One worker with two threads.  Silent connections must not take a thread at all (plain
    # gunicorn 27 gives each 5 s of one: 40 of them delay others by 100 s); clients that send half
    # their headers and stall may hold a thread for ``timeout`` seconds, not for ever.
    silent, trickling, threads = 40, 4, 2
    conns: list[socket.socket] = []
    timings: dict[str, float] = {}
    env = {"TILESERVER_TIMEOUT": str(TRICKLE_TIMEOUT), "TILESERVER_PRELOAD_MODELS": "false"}
    with serve(SLIDES, tmp_path / "serve.log", workers=1, threads=threads, env=env) as (base, _):
        host, port = base.removeprefix("http://").split(":")
        try:
            for _ in range(silent):  # connect and send nothing
                conns.append(socket.create_connection((host, int(port)), timeout=10))
            time.sleep(0.5)
            t0 = time.monotonic()
            assert requests.get(base + "/healthz", timeout=ANSWER_WITHIN).status_code == 200
            timings["behind_silent"] = round(time.monotonic() - t0, 3)
            for _ in range(trickling):  # start a request and never finish its headers
                s = socket.create_connection((host, int(port)), timeout=10)
                s.sendall(b"GET /slides.json HTTP/1.1\r\nHost: x\r\n")
                conns.append(s)
            time.sleep(0.5)
            t0 = time.monotonic()
            assert requests.get(base + f"{CMU_URL}_files/12/3_4.jpeg", timeout=ANSWER_WITHIN).status_code == 200
            timings["behind_trickling"] = round(time.monotonic() - t0, 3)
            # the stalled clients were dropped without an answer
            for s in conns[silent:]:
                s.settimeout(ANSWER_WITHIN)
                assert s.recv(100) == b""
        finally:
            for s in conns:
                s.close()
    log = (tmp_path / "serve.log").read_text()
    assert "WORKER TIMEOUT" not in log and "Traceback" not in log, log
    record(
        "slow_clients",
        {
            "silent_connections": silent,
            "trickling_connections": trickling,
            "threads": threads,
            "workers": 1,
            "timeout_s": TRICKLE_TIMEOUT,
            "seconds_to_answer": timings,
        },
    )
