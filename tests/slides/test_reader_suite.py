"""One test suite of OpenSlide's API, run over every SlideReader implementation.

``openslide`` readers open the shared slides directly; ``compressed`` readers open
the same slides after ``tileserver convert`` (JPEG, glass dropped).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

import tileserver
from tileserver.slides import SlideReader
from tileserver.slides.openslide_reader import OpenSlideReader

from ..conftest import CMU, DICOM, NDPI

pytestmark = pytest.mark.shared_data

SOURCES = {"cmu": CMU, "ndpi": NDPI, "dicom": DICOM}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tileserver.convert import convert

    out = tmp_path_factory.mktemp("converted")
    paths = {}
    for name, src in SOURCES.items():
        dst = out / f"{name}.tiff"
        convert(src, dst, codec="jpeg", quality=85, glass="drop", progress=False)
        paths[name] = dst
    return paths


@pytest.fixture(params=["openslide", "compressed"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=sorted(SOURCES))
def slide(kind: str, request: pytest.FixtureRequest, converted: dict[str, Path]) -> Iterator[SlideReader]:
    name = str(request.param)
    path = SOURCES[name] if kind == "openslide" else converted[name]
    with tileserver.open_slide(path) as s:
        yield s


def test_open_slide_dispatches(kind: str, slide: SlideReader) -> None:
    assert isinstance(slide, SlideReader)
    assert isinstance(slide, openslide.AbstractSlide)
    if kind == "openslide":
        assert isinstance(slide, OpenSlideReader)
        assert slide.codec is None
    else:
        assert slide.format == "tileserver"
        assert slide.codec == "jpeg"


def test_levels_are_consistent(slide: SlideReader) -> None:
    assert slide.level_count >= 1
    assert len(slide.level_dimensions) == slide.level_count == len(slide.level_downsamples)
    assert slide.dimensions == slide.level_dimensions[0]
    assert slide.level_downsamples[0] == pytest.approx(1.0)
    assert list(slide.level_downsamples) == sorted(slide.level_downsamples)
    for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples, strict=True):
        assert w >= 1 and h >= 1
        assert slide.dimensions[0] / w == pytest.approx(ds, rel=0.02)


def test_properties_and_mpp(slide: SlideReader) -> None:
    props = slide.properties
    assert float(props[openslide.PROPERTY_NAME_MPP_X]) > 0
    assert slide.mpp is not None and slide.mpp[0] > 0
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in props.items())


def test_associated_images_are_pil(slide: SlideReader) -> None:
    for name, img in slide.associated_images.items():
        assert isinstance(name, str)
        assert isinstance(img, Image.Image)
        assert img.width > 0 and img.height > 0


@pytest.mark.parametrize("level_pick", ["first", "last"])
def test_read_region_shape_and_mode(slide: SlideReader, level_pick: str) -> None:
    level = 0 if level_pick == "first" else slide.level_count - 1
    lw, lh = slide.level_dimensions[level]
    size = (min(300, lw), min(200, lh))
    img = slide.read_region((0, 0), level, size)
    assert img.mode == "RGBA"
    assert img.size == size


def test_read_region_outside_is_transparent(slide: SlideReader) -> None:
    w, h = slide.dimensions
    img = slide.read_region((w + 100, h + 100), 0, (16, 16))
    assert img.size == (16, 16)
    assert np.asarray(img)[..., 3].max() == 0


def test_best_level_for_downsample(slide: SlideReader) -> None:
    assert slide.get_best_level_for_downsample(1.0) == 0
    assert slide.get_best_level_for_downsample(1e6) == slide.level_count - 1


def test_thumbnail_fits(slide: SlideReader) -> None:
    thumb = slide.get_thumbnail((128, 128))
    assert max(thumb.size) <= 128 and min(thumb.size) >= 1


def test_deepzoom_generator_accepts_reader(slide: SlideReader) -> None:
    dz = DeepZoomGenerator(slide, tile_size=254, overlap=1)
    top = dz.level_count - 1
    tile = dz.get_tile(top, (0, 0))
    assert tile.size == dz.get_tile_dimensions(top, (0, 0))


def test_context_manager_closes(kind: str, converted: dict[str, Path]) -> None:
    path = CMU if kind == "openslide" else converted["cmu"]
    with tileserver.open_slide(path) as s:
        assert s.level_count >= 1


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_compressed_matches_source_pixels(name: str, converted: dict[str, Path]) -> None:
    """Read the same level-0 region through both readers; JPEG q85 stays close."""
    with tileserver.open_slide(SOURCES[name]) as src, tileserver.open_slide(converted[name]) as dst:
        assert dst.dimensions == src.dimensions
        w, h = src.dimensions
        loc = (w // 3, h // 3)
        size = (min(256, w - loc[0]), min(256, h - loc[1]))
        a = np.asarray(src.read_region(loc, 0, size).convert("RGB"), dtype=np.float64)
        b = np.asarray(dst.read_region(loc, 0, size).convert("RGB"), dtype=np.float64)
        mse = float(np.mean((a - b) ** 2))
        psnr = 10 * np.log10(255**2 / max(mse, 1e-9))
        assert psnr > 28, f"{name}: PSNR {psnr:.1f} dB"


def test_open_slide_errors(tmp_path: Path) -> None:
    with pytest.raises(tileserver.SlideNotFound):
        tileserver.open_slide(tmp_path / "missing.svs")
    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    with pytest.raises(tileserver.UnsupportedFormat):
        tileserver.open_slide(text)
    with pytest.raises(tileserver.UnsupportedFormat):
        tileserver.open_slide(tmp_path)  # a folder with no DICOM files
    assert tileserver.detect_format(text) is None
    assert tileserver.detect_format(CMU) == "aperio"
    assert tileserver.detect_format(DICOM) == "dicom"
