"""The Flask app over the shared slides and over fake compressed slides."""

from __future__ import annotations

import io
import logging
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
from flask import Flask
from flask.testing import FlaskClient
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from tests.conftest import CMU, DICOM, FIXTURES, NDPI, SHARED_SLIDES, SLIDES
from tileserver import metrics
from tileserver.server import create_app
from tileserver.slides import resolve_slide_file
from tileserver.tiles import TileService

from .conftest import make_settings
from .fakes import GLASS, FakeStoredSlide

pytestmark = pytest.mark.shared_data

NS = "{http://schemas.microsoft.com/deepzoom/2008}"


def _url(path: Path) -> str:
    return "/" + path.relative_to(SLIDES).as_posix()


def _count(name: str, **labels: str) -> float:
    metrics.get()
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_index_lists_every_shared_slide(client: FlaskClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    for path in SHARED_SLIDES:
        assert f'href="/view/{_url(path)[1:].replace(" ", "%20").replace("(", "%28").replace(")", "%29")}"' in (
            r.get_data(as_text=True)
        ) or path.name in r.get_data(as_text=True)


def test_slides_json(client: FlaskClient) -> None:
    slides = {s["path"]: s for s in client.get("/slides.json").get_json()}
    assert set(slides) >= {p.relative_to(SLIDES).as_posix() for p in SHARED_SLIDES}
    cmu = slides["CMU-1-Small-Region.svs"]
    assert cmu["format"] == "aperio"
    assert cmu["codec"] is None
    assert cmu["dimensions"] == [2220, 2967]
    assert cmu["mpp"] == [0.499, 0.499]
    assert cmu["file_bytes"] == CMU.stat().st_size
    assert cmu["dzi"] == "/CMU-1-Small-Region.svs.dzi"
    assert slides["camelyon-dicom"]["format"] == "dicom"  # a DICOM folder is one slide


@pytest.mark.parametrize("path", SHARED_SLIDES, ids=lambda p: p.name[:12])
def test_dzi_and_tiles_match_deepzoomgenerator(client: FlaskClient, path: Path) -> None:
    ref = DeepZoomGenerator(openslide.OpenSlide(resolve_slide_file(path)), 256, 0, limit_bounds=True)
    r = client.get(_url(path) + ".dzi")
    assert r.status_code == 200
    assert r.mimetype == "application/xml"
    root = ET.fromstring(r.data)
    assert root.attrib["TileSize"] == "256" and root.attrib["Overlap"] == "0"
    size = root.find(f"{NS}Size")
    assert size is not None
    assert (int(size.attrib["Width"]), int(size.attrib["Height"])) == ref.level_dimensions[-1]
    top = ref.level_count - 1
    cols, rows = ref.level_tiles[top]
    for level, col, row in [(top, 0, 0), (top, cols - 1, rows - 1), (top - 2, 0, 0), (8, 0, 0), (0, 0, 0)]:
        r = client.get(f"{_url(path)}_files/{level}/{col}_{row}.png")
        assert r.status_code == 200, (level, col, row)
        ours = np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB"), dtype=np.int16)
        theirs = np.asarray(ref.get_tile(level, (col, row)).convert("RGB"), dtype=np.int16)
        assert ours.shape == theirs.shape
        assert np.array_equal(ours, theirs)  # PNG is lossless: identical pixels
        r = client.get(f"{_url(path)}_files/{level}/{col}_{row}.jpeg")
        jpeg = np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB"), dtype=np.int16)
        assert jpeg.shape == theirs.shape
        mse = float(((jpeg - theirs) ** 2).mean())
        assert mse == 0 or 10 * np.log10(255**2 / mse) > 30  # JPEG tolerance: PSNR above 30 dB


def test_other_slide_endpoints(client: FlaskClient) -> None:
    props = client.get("/CMU-1-Small-Region.svs/properties.json").get_json()
    assert props["openslide.vendor"] == "aperio"
    for name in ("label", "macro", "thumbnail"):
        r = client.get(f"/CMU-1-Small-Region.svs/associated/{name}.jpeg")
        assert r.status_code == 200 and r.mimetype == "image/jpeg"
        assert Image.open(io.BytesIO(r.data)).format == "JPEG"
    thumb = Image.open(io.BytesIO(client.get("/CMU-1-Small-Region.svs/thumbnail.jpeg?size=100").data))
    assert max(thumb.size) == 100
    capped = Image.open(io.BytesIO(client.get("/CMU-1-Small-Region.svs/thumbnail.jpeg?size=100000").data))
    assert max(capped.size) <= 1024  # capped at thumbnail_max
    view = client.get("/view/CMU-1-Small-Region.svs").get_data(as_text=True)
    assert "openseadragon" in view and "CMU-1-Small-Region.svs.dzi" in view
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").get_json()["ready"] is True
    assert client.get(f"{_url(NDPI)}_files/5/0_0.webp").mimetype == "image/webp"
    assert client.get(f"{_url(DICOM)}/properties.json").status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "/nope.svs.dzi",
        "/CMU-1-Small-Region.svs_files/13/0_0.jpeg",  # level past the last
        "/CMU-1-Small-Region.svs_files/12/9_0.jpeg",  # col past the grid
        "/CMU-1-Small-Region.svs_files/12/0_12.jpeg",  # row past the grid
        "/CMU-1-Small-Region.svs_files/12/-1_0.jpeg",
        "/CMU-1-Small-Region.svs_files/12/0_0.gif",
        "/CMU-1-Small-Region.svs_files/12/0_0.JPEG",
        "/CMU-1-Small-Region.svs_files/x/0_0.jpeg",
        "/CMU-1-Small-Region.svs/associated/nope.jpeg",
        "/../slides/CMU-1-Small-Region.svs.dzi",
        "/%2e%2e/slides/CMU-1-Small-Region.svs.dzi",
        "/%2E%2E/%2E%2E/etc/passwd/properties.json",
        "/sub/%2e%2e/CMU-1-Small-Region.svs.dzi",
        "//etc/passwd/properties.json",
        "/%2Fetc%2Fpasswd/properties.json",
        "/etc/passwd/properties.json",
        "/camelyon-dicom/multiframe_camelyon_challenge_image.dcm/..%2F..%2Fslides.dzi",
        "/view/../../etc/passwd",
    ],
)
def test_not_found(client: FlaskClient, url: str) -> None:
    assert client.get(url).status_code == 404


def test_symlinks_and_hidden_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "outside.svs").symlink_to(CMU)  # points outside the root
    (root / "sub").mkdir()
    shutil.copy(FIXTURES / "small.svs", root / "sub" / "inside.svs")
    (root / "alias.svs").symlink_to(root / "sub" / "inside.svs")  # stays inside: served
    shutil.copy(FIXTURES / "small.svs", root / ".hidden.svs")
    shutil.copy(FIXTURES / "small.svs", root / "partial.svs.tmp")
    app = create_app(make_settings(root))
    c = app.test_client()
    try:
        assert c.get("/outside.svs.dzi").status_code == 404
        assert c.get("/.hidden.svs.dzi").status_code == 404
        assert c.get("/partial.svs.tmp.dzi").status_code == 404
        assert c.get("/sub/inside.svs.dzi").status_code == 200
        assert c.get("/alias.svs.dzi").status_code == 200
        listed = [s["path"] for s in c.get("/slides.json").get_json()]
        assert listed == ["alias.svs", "sub/inside.svs"]
        index = c.get("/").get_data(as_text=True)
        assert "sub" in index and "outside" not in index
    finally:
        app.extensions["tileserver"].close()


def test_etag_304_and_cache_hit(client: FlaskClient) -> None:
    url = "/CMU-1-Small-Region.svs_files/11/1_2.jpeg"
    hits = _count("tileserver_cache_hits_total")
    cached = _count("tileserver_tile_requests_total", source="cache", format="jpeg")
    first = client.get(url)
    assert first.status_code == 200
    assert first.headers["X-Tile-Source"] == "openslide"
    assert "max-age" in first.headers["Cache-Control"]
    etag = first.headers["ETag"]
    second = client.get(url)
    assert second.headers["X-Tile-Source"] == "cache"
    assert second.data == first.data and second.headers["ETag"] == etag
    assert _count("tileserver_cache_hits_total") == hits + 1
    assert _count("tileserver_tile_requests_total", source="cache", format="jpeg") == cached + 1
    r = client.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.data == b""
    assert r.headers["ETag"] == etag
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    assert client.get(url.replace(".jpeg", ".png")).headers["ETag"] != etag


def _fake_app(tmp_path: Path, slides: dict[str, FakeStoredSlide], **settings: object) -> tuple[Flask, FlaskClient]:
    for name in slides:
        (tmp_path / name).write_bytes(b"fake")

    def opener(path: Path) -> FakeStoredSlide:
        return slides[path.name]

    svc = TileService(make_settings(tmp_path, **settings), opener=opener, detector=lambda p: "fake")
    app = create_app(svc.settings, service=svc)
    return app, app.test_client()


def test_glass_tile_never_decodes(tmp_path: Path) -> None:
    glass = np.zeros((3, 4), bool)
    glass[0, 0] = glass[1, 0] = True
    slide = FakeStoredSlide(tmp_path / "g.fake", 1000, 700, glass=glass, refuse_decode=True)
    _, c = _fake_app(tmp_path, {"g.fake": slide})
    before = _count("tileserver_tile_requests_total", source="glass", format="jpeg")
    top = 10  # 1000 px wide: levels 0..10
    for _ in range(2):  # glass is not cached: it is answered from the index each time
        r = c.get(f"/g.fake_files/{top}/0_1.jpeg")
        assert r.status_code == 200
        assert r.headers["X-Tile-Source"] == "glass"
        img = np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB"), dtype=np.int16)
        assert img.shape == (256, 256, 3)
        assert np.abs(img - np.array(GLASS)).max() <= 2
    assert _count("tileserver_tile_requests_total", source="glass", format="jpeg") == before + 2
    dzi = ET.fromstring(c.get("/g.fake.dzi").data)
    assert dzi.find(f"{NS}DisplayRects") is not None
    info = c.get("/slides.json").get_json()[0]
    assert info["glass_color"] == list(GLASS)
    assert info["compression_ratio"] == round(123456789 / 4, 2)


def test_stored_tile_is_decoded_once_then_cached(tmp_path: Path) -> None:
    slide = FakeStoredSlide(tmp_path / "s.fake", 1000, 700)
    _, c = _fake_app(tmp_path, {"s.fake": slide})
    decode = _count("tileserver_tile_requests_total", source="decode", format="png")
    r = c.get("/s.fake_files/10/3_2.png")
    assert r.headers["X-Tile-Source"] == "decode"
    assert Image.open(io.BytesIO(r.data)).size == (1000 - 768, 700 - 512)
    assert slide.decodes == 1  # exactly one stored tile, no region stitching
    assert c.get("/s.fake_files/10/3_2.png").headers["X-Tile-Source"] == "cache"
    assert slide.decodes == 1
    assert _count("tileserver_tile_requests_total", source="decode", format="png") == decode + 1


def test_corrupt_tile_is_500_for_that_tile_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    slide = FakeStoredSlide(tmp_path / "c.fake", 1000, 700, corrupt=frozenset({(0, 1, 1)}))
    _, c = _fake_app(tmp_path, {"c.fake": slide})
    with caplog.at_level(logging.ERROR, logger="tileserver.server"):
        r = c.get("/c.fake_files/10/1_1.jpeg")
    assert r.status_code == 500
    assert r.get_json()["type"] == "CorruptTile"
    assert any("CorruptTile" in rec.getMessage() for rec in caplog.records)
    assert c.get("/c.fake_files/10/1_0.jpeg").status_code == 200
    assert c.get("/c.fake_files/10/1_1.jpeg").status_code == 500  # still failing, never cached
    assert c.get("/c.fake_files/10/2_1.jpeg").status_code == 200


def test_replaced_and_removed_file(tmp_path: Path) -> None:
    shutil.copy(CMU, tmp_path / "a.svs")
    app = create_app(make_settings(tmp_path))
    c = app.test_client()
    svc = app.extensions["tileserver"]
    try:
        top = c.get("/a.svs_files/12/0_0.png")
        assert top.status_code == 200
        dzi_before = c.get("/a.svs.dzi").data
        # replace in place, as an editor or rsync would: new file renamed over the old one
        shutil.copy(FIXTURES / "small.svs", tmp_path / "new.tmp")
        os.replace(tmp_path / "new.tmp", tmp_path / "a.svs")
        assert c.get("/a.svs.dzi").data != dzi_before
        again = c.get("/a.svs_files/4/0_0.png")
        assert again.status_code == 200 and again.headers["X-Tile-Source"] != "cache"
        small = DeepZoomGenerator(openslide.OpenSlide(FIXTURES / "small.svs"), 256, 0, limit_bounds=True)
        assert Image.open(io.BytesIO(again.data)).size == small.get_tile_dimensions(4, (0, 0))
        assert c.get("/slides.json").get_json()[0]["dimensions"] == list(small.level_dimensions[-1])
        (tmp_path / "a.svs").unlink()
        assert c.get("/a.svs_files/4/0_0.png").status_code == 404
        assert c.get("/a.svs.dzi").status_code == 404
        assert c.get("/slides.json").get_json() == []
        assert len(svc.slides) == 0  # the vanished slide was let go
    finally:
        svc.close()


def test_unreadable_slides_dir_is_not_ready(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "missing"))
    r = app.test_client().get("/readyz")
    assert r.status_code == 503 and r.get_json()["ready"] is False


def test_metrics_endpoint(client: FlaskClient, shared_app: Flask) -> None:
    client.get("/CMU-1-Small-Region.svs_files/10/0_0.jpeg")
    text = client.get("/metrics").get_data(as_text=True)
    for name in (
        "tileserver_tile_requests_total",
        "tileserver_tile_seconds_bucket",
        "tileserver_cache_bytes",
        "tileserver_cache_hits_total",
        "tileserver_cache_misses_total",
        "tileserver_http_requests_total",
        "tileserver_build_info",
    ):
        assert name in text
    assert 'le="0.0005"' in text and 'le="5.0"' in text
    off = create_app(make_settings(SLIDES, metrics=False))
    assert off.test_client().get("/metrics").status_code == 404
    off.extensions["tileserver"].close()


def test_json_access_log(caplog: pytest.LogCaptureFixture) -> None:
    import json

    app = create_app(make_settings(SLIDES, access_log_json=True))
    with caplog.at_level(logging.INFO, logger="tileserver.access"):
        app.test_client().get("/CMU-1-Small-Region.svs_files/9/0_0.jpeg")
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tileserver.access"]
    assert records[-1]["status"] == 200
    assert records[-1]["endpoint"] == "tile"
    assert records[-1]["source"] in ("openslide", "cache")
    assert "tile_ms" in records[-1]
    app.extensions["tileserver"].close()


def test_reserved_top_level_folders_are_not_served(tmp_path: Path) -> None:
    """/view/... and /static/... belong to the viewer: slides under such top-level folders are skipped."""

    from tileserver.config import load_settings
    from tileserver.server import create_app

    for folder in ("view", "static", "lab"):
        (tmp_path / folder).mkdir()
        shutil.copy(FIXTURES / "small.svs", tmp_path / folder / "a.svs")
    app = create_app(load_settings(slides_dir=str(tmp_path), preload_models=False))
    client = app.test_client()
    listed = {s["path"] for s in client.get("/slides.json").get_json()}
    assert listed == {"lab/a.svs"}
    assert client.get("/lab/a.svs.dzi").status_code == 200
    assert client.get("/view/a.svs.dzi").status_code == 404
