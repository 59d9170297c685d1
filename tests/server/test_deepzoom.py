"""Deep Zoom geometry: identical to OpenSlide's DeepZoomGenerator; fast paths only where they are exact."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator

import tileserver
from tests.conftest import SHARED_SLIDES
from tileserver.deepzoom import DeepZoom, GlassTile, RegionTile, StoredTile, _mask_rects
from tileserver.errors import BadTileAddress
from tileserver.slides import resolve_slide_file

from .fakes import GLASS, FakeStoredSlide

SETTINGS = [(254, 1, False), (256, 0, False), (256, 0, True)]


def _ids(p: Path) -> str:
    return p.name[:12]


@pytest.mark.shared_data
@pytest.mark.parametrize(("tile_size", "overlap", "limit_bounds"), SETTINGS)
@pytest.mark.parametrize("path", SHARED_SLIDES, ids=_ids)
def test_geometry_matches_deepzoomgenerator(path: Path, tile_size: int, overlap: int, limit_bounds: bool) -> None:
    ref = DeepZoomGenerator(openslide.OpenSlide(resolve_slide_file(path)), tile_size, overlap, limit_bounds)
    with tileserver.open_slide(path) as slide:
        dz = DeepZoom(slide, tile_size, overlap, limit_bounds)
        assert dz.level_count == ref.level_count
        assert dz.level_tiles == ref.level_tiles
        assert dz.level_dimensions == ref.level_dimensions
        for level in range(dz.level_count):
            cols, rows = dz.level_tiles[level]
            for col in range(cols):
                for row in range(rows):
                    plan = dz.plan(level, col, row)
                    assert isinstance(plan, RegionTile)  # source slides have no stored-tile fast path
                    assert plan.z_size == ref.get_tile_dimensions(level, (col, row))
                    assert (plan.l0_location, plan.level, plan.l_size) == ref.get_tile_coordinates(level, (col, row))


@pytest.mark.shared_data
@pytest.mark.parametrize(("tile_size", "overlap"), [(254, 1), (256, 0)])
@pytest.mark.parametrize("path", SHARED_SLIDES, ids=_ids)
def test_dzi_matches_deepzoomgenerator(path: Path, tile_size: int, overlap: int) -> None:
    ref = DeepZoomGenerator(openslide.OpenSlide(resolve_slide_file(path)), tile_size, overlap)
    with tileserver.open_slide(path) as slide:
        ours = ET.fromstring(DeepZoom(slide, tile_size, overlap).dzi("jpeg"))
    theirs = ET.fromstring(ref.get_dzi("jpeg"))
    assert ours.tag == theirs.tag
    assert ours.attrib == theirs.attrib
    ns = {"dz": "http://schemas.microsoft.com/deepzoom/2008"}
    assert ours.find("dz:Size", ns).attrib == theirs.find("dz:Size", ns).attrib  # type: ignore[union-attr]
    assert ours.find("dz:DisplayRects", ns) is None  # nothing known about glass in a source slide


@pytest.mark.parametrize("address", [(-1, 0, 0), (99, 0, 0), (12, 9, 0), (12, 0, 12), (0, 1, 0), (5, -1, 0)])
def test_bad_addresses(tmp_path: Path, address: tuple[int, int, int]) -> None:
    dz = DeepZoom(FakeStoredSlide(tmp_path / "a"), 254, 1)
    with pytest.raises(BadTileAddress):
        dz.plan(*address)


@pytest.mark.parametrize(("tile_size", "overlap"), [(256, 0), (254, 1), (512, 0)])
def test_fake_stored_slide_pixels_equal_deepzoomgenerator(tmp_path: Path, tile_size: int, overlap: int) -> None:
    glass = np.zeros((3, 4), bool)
    glass[0, :2] = glass[2, 3] = True
    slide = FakeStoredSlide(tmp_path / "a", 1000, 700, glass=glass)
    dz = DeepZoom(slide, tile_size, overlap)
    ref = DeepZoomGenerator(slide, tile_size, overlap)
    kinds: set[type] = set()
    for level in range(dz.level_count):
        cols, rows = dz.level_tiles[level]
        for col in range(cols):
            for row in range(rows):
                kinds.add(type(dz.plan(level, col, row)))
                ours = np.asarray(dz.tile_image(level, col, row))
                theirs = np.asarray(ref.get_tile(level, (col, row)))
                np.testing.assert_array_equal(ours, theirs, err_msg=f"tile {level}/{col}_{row}")
    if (tile_size, overlap) == (256, 0):
        assert kinds == {GlassTile, StoredTile, RegionTile}
        assert dz.direct_levels == {dz.level_count - 1: 0, dz.level_count - 2: 1, dz.level_count - 3: 2}
    else:
        assert StoredTile not in kinds  # the grid does not line up with stored tiles
        assert dz.direct_levels == {}


def test_glass_and_stored_plans_never_decode(tmp_path: Path) -> None:
    glass = np.zeros((3, 4), bool)
    glass[0, 0] = True
    slide = FakeStoredSlide(tmp_path / "a", 1000, 700, glass=glass, refuse_decode=True)
    dz = DeepZoom(slide, 256, 0)
    top = dz.level_count - 1
    assert dz.plan(top, 0, 0) == GlassTile((256, 256), GLASS)
    assert dz.plan(top, 3, 2) == StoredTile(0, 3, 2, (1000 - 768, 700 - 512))
    img = dz.tile_image(top, 0, 0)  # a refusing decoder: glass must not reach it
    assert img.size == (256, 256)
    assert (np.asarray(img) == GLASS).all()


def test_region_over_glass_only_is_glass(tmp_path: Path) -> None:
    # with overlap the grid does not align, but a tile whose region is all glass needs no read
    glass = np.ones((3, 4), bool)
    glass[2, 3] = False
    slide = FakeStoredSlide(tmp_path / "a", 1000, 700, glass=glass, refuse_decode=True)
    dz = DeepZoom(slide, 254, 1)
    top = dz.level_count - 1
    plan = dz.plan(top, 0, 0)
    assert plan == GlassTile(DeepZoomGenerator(slide, 254, 1).get_tile_dimensions(top, (0, 0)), GLASS)
    assert isinstance(dz.plan(top, 3, 2), RegionTile)


def test_display_rects_cover_tissue_exactly(tmp_path: Path) -> None:
    glass = np.ones((3, 4), bool)
    glass[1, 1:3] = glass[2, 3] = False
    dz = DeepZoom(FakeStoredSlide(tmp_path / "a", 1000, 700, glass=glass), 256, 0)
    assert sorted(dz.display_rects() or []) == [(256, 256, 512, 256), (768, 512, 1000 - 768, 700 - 512)]
    root = ET.fromstring(dz.dzi("png"))
    rects = root.findall(".//{http://schemas.microsoft.com/deepzoom/2008}Rect")
    assert len(rects) == 2
    assert DeepZoom(FakeStoredSlide(tmp_path / "b", 1000, 700), 256, 0).display_rects() is None  # no glass


def test_display_rects_are_coarsened_when_many(tmp_path: Path) -> None:
    glass = np.zeros((8, 8), bool)
    glass[::2, ::2] = True  # a checkerboard-ish mask: many small rectangles
    dz = DeepZoom(FakeStoredSlide(tmp_path / "a", 2048, 2048, glass=glass), 256, 0)
    assert len(dz.display_rects(max_rects=1000) or []) > 4
    coarse = dz.display_rects(max_rects=4) or []
    assert 0 < len(coarse) <= 4
    # coarsening only grows rectangles: every tissue tile is still covered
    for r, c in zip(*np.nonzero(~glass), strict=True):
        x, y = c * 256 + 1, r * 256 + 1
        assert any(rx <= x < rx + rw and ry <= y < ry + rh for rx, ry, rw, rh in coarse)


@pytest.mark.parametrize("seed", range(20))
def test_mask_rects_cover_exactly_the_mask(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((rng.integers(1, 12), rng.integers(1, 12))) < 0.5
    covered = np.zeros_like(mask, dtype=int)
    for c0, r0, c1, r1 in _mask_rects(mask):
        covered[r0:r1, c0:c1] += 1
    np.testing.assert_array_equal(covered, mask.astype(int))  # covers the mask, no overlaps
