"""The server over a real compressed slide (CMU converted to JPEG with dropped glass)."""

from __future__ import annotations

import io
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import openslide
import pytest
import tifffile
from flask import Flask
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image
from prometheus_client import REGISTRY

import tileserver
from tests.conftest import CMU
from tileserver.deepzoom import DeepZoom, GlassTile, StoredTile
from tileserver.server import create_app
from tileserver.slides.base import SlideReader
from tileserver.tiles import Decoder, TileService

from .conftest import make_settings

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

convert_mod = pytest.importorskip("tileserver.convert", reason="tileserver.convert not available")
NS = "{http://schemas.microsoft.com/deepzoom/2008}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compressed") / "cmu.tiff"
    convert_mod.convert(CMU, out, codec="jpeg", glass="drop", progress=False)
    return out


class _Decoders:
    """A decoder seam that counts decodes, or refuses them."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls = 0

    def __call__(self, slide: SlideReader) -> Decoder | None:
        codec = slide.tile_codec  # type: ignore[attr-defined]

        def decode(data: bytes) -> npt.NDArray[np.uint8]:
            if self.refuse:
                raise AssertionError("decoder called")
            self.calls += 1
            out: npt.NDArray[np.uint8] = codec.decode(data)
            return out

        return decode

    def preload(self) -> None:
        pass

    def close(self) -> None:
        pass

    def loading(self) -> bool:
        return False


def _app(root: Path, decoders: _Decoders | None = None, **kw: Any) -> Flask:
    svc = TileService(make_settings(root, **kw), decoders=decoders)
    return create_app(svc.settings, service=svc)


@pytest.fixture
def app_factory(converted: Path) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def make(decoders: _Decoders | None = None, **kw: Any) -> Flask:
        apps.append(_app(converted.parent, decoders, **kw))
        return apps[-1]

    yield make
    for a in apps:
        a.extensions["tileserver"].close()


def _count(source: str) -> float:
    return REGISTRY.get_sample_value("tileserver_tile_requests_total", {"source": source, "format": "jpeg"}) or 0.0


def _glass_and_tissue(path: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    with tileserver.open_slide(path) as slide:
        stored = slide.stored_tiles()
        assert stored is not None
        cols, rows = stored.grid(0)
        cells = [(c, r) for r in range(rows) for c in range(cols)]
        glass = next(cr for cr in cells if stored.is_glass(0, *cr))
        tissue = next(cr for cr in cells if not stored.is_glass(0, *cr))
    return glass, tissue


@pytest.mark.parametrize(("tile_size", "overlap"), [(256, 0), (254, 1)])
def test_geometry_and_pixels_match_deepzoomgenerator(converted: Path, tile_size: int, overlap: int) -> None:
    with tileserver.open_slide(converted) as slide:
        dz = DeepZoom(slide, tile_size, overlap, limit_bounds=True)
        ref = DeepZoomGenerator(slide, tile_size, overlap, limit_bounds=True)
        osr = DeepZoomGenerator(openslide.OpenSlide(converted), tile_size, overlap, limit_bounds=True)
        assert dz.level_count == ref.level_count == osr.level_count
        assert dz.level_tiles == ref.level_tiles == osr.level_tiles
        top = dz.level_count - 1
        for level in (top, top - 1, top - 3, 2):
            cols, rows = dz.level_tiles[level]
            for col in range(cols):
                for row in range(rows):
                    ours = np.asarray(dz.tile_image(level, col, row))
                    theirs = np.asarray(ref.get_tile(level, (col, row)))
                    np.testing.assert_array_equal(ours, theirs, err_msg=f"{level}/{col}_{row}")
        if (tile_size, overlap) == (256, 0):
            assert set(dz.direct_levels) == set(range(top - slide.level_count + 1, top + 1))


def test_glass_tile_never_touches_the_codec(converted: Path, app_factory: Callable[..., Flask]) -> None:
    (g_col, g_row), _ = _glass_and_tissue(converted)
    decoders = _Decoders(refuse=True)
    c = app_factory(decoders).test_client()
    with tileserver.open_slide(converted) as slide:
        top = DeepZoom(slide, 256, 0, True).level_count - 1
    before = _count("glass")
    r = c.get(f"/cmu.tiff_files/{top}/{g_col}_{g_row}.jpeg")
    assert r.status_code == 200, r.data
    assert r.headers["X-Tile-Source"] == "glass"
    assert _count("glass") == before + 1
    with tileserver.open_slide(converted) as slide:
        color = slide.stored_tiles().glass_color  # type: ignore[union-attr]
    img = np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB"), dtype=np.int16)
    assert np.abs(img - np.array(color)).max() <= 2
    # and a tissue tile with the refusing decoder fails: the seam really is in the path
    _, (t_col, t_row) = _glass_and_tissue(converted)
    assert c.get(f"/cmu.tiff_files/{top}/{t_col}_{t_row}.jpeg").status_code == 500


def test_aligned_tile_is_one_stored_tile(converted: Path, app_factory: Callable[..., Flask]) -> None:
    _, (t_col, t_row) = _glass_and_tissue(converted)
    decoders = _Decoders()
    c = app_factory(decoders).test_client()
    with tileserver.open_slide(converted) as slide:
        dz = DeepZoom(slide, 256, 0, True)
        top = dz.level_count - 1
        assert isinstance(dz.plan(top, t_col, t_row), StoredTile)
    before = _count("decode")
    r = c.get(f"/cmu.tiff_files/{top}/{t_col}_{t_row}.jpeg")
    assert r.status_code == 200 and r.headers["X-Tile-Source"] == "decode"
    assert decoders.calls == 1  # exactly one stored tile decoded: no stitching
    assert c.get(f"/cmu.tiff_files/{top}/{t_col}_{t_row}.jpeg").headers["X-Tile-Source"] == "cache"
    assert decoders.calls == 1
    assert _count("decode") == before + 1


def test_dzi_declares_display_rects_and_listing_shows_ratio(app_factory: Callable[..., Flask]) -> None:
    c = app_factory().test_client()
    root = ET.fromstring(c.get("/cmu.tiff.dzi").data)
    assert root.findall(f".//{NS}Rect")
    info = c.get("/slides.json").get_json()[0]
    assert info["format"] == "tileserver" and info["codec"] == "jpeg"
    assert info["source_bytes"] == CMU.stat().st_size
    assert info["compression_ratio"] == round(CMU.stat().st_size / info["file_bytes"], 2)
    assert 'id="ratio-headline"' in c.get("/view/cmu.tiff").get_data(as_text=True)
    assert c.get("/cmu.tiff/thumbnail.jpeg").status_code == 200
    assert c.get("/cmu.tiff/associated/label.jpeg").status_code == 200


def test_corrupt_tile_is_500_for_that_tile_only(converted: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tiff"
    shutil.copy(converted, bad)
    _, (t_col, t_row) = _glass_and_tissue(converted)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[0]
        cols = -(-page.imagewidth // page.tilewidth)  # type: ignore[union-attr]
        i = t_row * cols + t_col
        offset, count = page.dataoffsets[i], page.databytecounts[i]  # type: ignore[union-attr]
    with bad.open("r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * count)
    app = _app(tmp_path)
    c = app.test_client()
    try:
        with tileserver.open_slide(bad) as slide:
            top = DeepZoom(slide, 256, 0, True).level_count - 1
            assert DeepZoom(slide, 256, 0, True).plan(top, t_col, t_row) == StoredTile(0, t_col, t_row, (256, 256))
        r = c.get(f"/bad.tiff_files/{top}/{t_col}_{t_row}.jpeg")
        assert r.status_code == 500 and r.get_json()["type"] == "CorruptTile"
        neighbours = [(t_col + 1, t_row), (t_col, t_row + 1)]
        for col, row in neighbours:
            assert c.get(f"/bad.tiff_files/{top}/{col}_{row}.jpeg").status_code == 200
        assert c.get("/bad.tiff.dzi").status_code == 200
    finally:
        app.extensions["tileserver"].close()


def test_glass_plans_exist_at_every_aligned_level(converted: Path) -> None:
    with tileserver.open_slide(converted) as slide:
        dz = DeepZoom(slide, 256, 0, True)
        top = dz.level_count - 1
        kinds = {type(dz.plan(top, c, r)) for c in range(dz.level_tiles[top][0]) for r in range(dz.level_tiles[top][1])}
        assert kinds == {GlassTile, StoredTile}
