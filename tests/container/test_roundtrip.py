"""Writer -> file -> ``CompressedSlide``: structure, pixels, glass, damage, atomic writes."""

from __future__ import annotations

import os
import struct
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import tifffile
from openslide.deepzoom import DeepZoomGenerator

import tileserver
from tileserver import codecs
from tileserver.codecs.base import TileCodec
from tileserver.container import ContainerWriter, clean_stale_partials, level_geometry, partial_path
from tileserver.errors import (
    BadTileAddress,
    ConversionError,
    CorruptSlide,
    CorruptTile,
    MissingModel,
    UnsupportedFormat,
)
from tileserver.slides.compressed import CompressedSlide, is_compressed_slide

from ..conftest import CMU

CLASSIC = ["jpeg", "jpegxl", "jpeg2000", "webp", "avif"]
FAST = {"jpeg": {"quality": 90}, "jpegxl": {"quality": 90, "effort": 1}, "jpeg2000": {"quality": 45},
        "webp": {"quality": 90}, "avif": {"quality": 80, "speed": 10}}  # fmt: skip
GLASS = (241, 242, 243)
W, H = 700, 600  # 3 x 3 tiles at level 0, 3 levels
GLASS_TILES = {(0, 0), (2, 0), (2, 2)}


def image(w: int = W, h: int = H) -> np.ndarray:
    """A smooth test image every codec reproduces well."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 37.0)
    g = 128 + 100 * np.cos(y / 23.0)
    b = (x + y) / (w + h) * 255
    return np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def write_container(
    path: Path,
    codec: TileCodec,
    *,
    img: np.ndarray | None = None,
    glass: str = "drop",
    glass_tiles: set[tuple[int, int]] = GLASS_TILES,
    associated: dict[str, np.ndarray] | None = None,
    mpp: tuple[float, float] | None = (0.25, 0.26),
    overwrite: bool = False,
) -> np.ndarray:
    """Write ``img`` (level 0; lower levels subsampled) with ``glass_tiles`` dropped; returns ``img``."""
    img = image() if img is None else img
    h, w = img.shape[:2]
    with ContainerWriter(
        path, width=w, height=h, codec=codec, glass=glass, glass_color=GLASS, mpp=mpp, overwrite=overwrite
    ) as writer:
        level_img = img
        glass_grid = {(c, r) for c, r in glass_tiles}
        for level, g in enumerate(writer.levels):
            if level:
                level_img = level_img[::2, ::2]
                glass_grid = {
                    (c, r)
                    for c in range(g.cols)
                    for r in range(g.rows)
                    if all(
                        (cc, rr) in glass_grid
                        for cc in (2 * c, 2 * c + 1)
                        for rr in (2 * r, 2 * r + 1)
                        if cc < writer.levels[level - 1].cols and rr < writer.levels[level - 1].rows
                    )
                }
            for r in range(g.rows):
                for c in range(g.cols):
                    if (c, r) in glass_grid and glass == "drop":
                        writer.add_tile(level, c, r, b"")
                        continue
                    t = level_img[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
                    t = np.pad(t, ((0, 256 - t.shape[0]), (0, 256 - t.shape[1]), (0, 0)), mode="edge")
                    writer.add_tile(level, c, r, codec.encode(t))
        writer.finish(
            associated=associated or {},
            source={"name": "synthetic.svs", "bytes": 12345, "format": "aperio", "properties": {"aperio.AppMag": "20"}},
            tissue_fraction=0.5,
        )
    return img


@pytest.fixture(scope="module")
def jpeg_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("c") / "jpeg.tiff"
    label = np.full((50, 80, 3), (10, 200, 30), np.uint8)
    img = write_container(path, codecs.get("jpeg", quality=95), associated={"label": label})
    return path, img


@pytest.fixture
def slide(jpeg_file: tuple[Path, np.ndarray]) -> Iterator[CompressedSlide]:
    with CompressedSlide(jpeg_file[0]) as s:
        yield s


@pytest.mark.parametrize("name", CLASSIC)
def test_every_classic_codec_round_trips(tmp_path: Path, name: str) -> None:
    codec = codecs.get(name, **FAST[name])
    path = tmp_path / f"{name}.tiff"
    img = write_container(path, codec)
    assert is_compressed_slide(path)
    with tileserver.open_slide(path) as s:
        assert isinstance(s, CompressedSlide)
        assert s.codec == name
        assert s.level_dimensions == ((700, 600), (350, 300), (175, 150))
        st = s.stored_tiles()
        assert st is s
        tile = st.read_tile(0, 1, 1)
        assert tile.shape == (256, 256, 3)
        assert psnr(tile, img[256:512, 256:512]) > 30
        edge = st.read_tile(0, 2, 1)  # cropped to the level edge
        assert edge.shape == (256, 700 - 512, 3)
        region = np.asarray(s.read_region((200, 256), 0, (300, 300)))  # four tissue tiles
        assert psnr(region[:, :, :3], img[256:556, 200:500]) > 30
    with tifffile.TiffFile(path) as tf:
        assert tf.pages[0].compression == codec.tiff_compression  # type: ignore[union-attr]


def test_structure_seen_by_tifffile(jpeg_file: tuple[Path, np.ndarray]) -> None:
    with tifffile.TiffFile(jpeg_file[0]) as tf:
        assert tf.is_bigtiff
        pages = list(tf.pages)
        assert len(pages) == 3 + 1  # three levels and the label
        p0 = pages[0]
        assert p0.software.startswith("tileserver ")  # type: ignore[union-attr]
        assert p0.description.startswith('{"format": "tileserver"')  # type: ignore[union-attr]
        counts = list(p0.databytecounts)  # type: ignore[union-attr]
        assert [i for i, n in enumerate(counts) if n == 0] == sorted(r * 3 + c for c, r in GLASS_TILES)
        assert all(p.is_tiled and p.tilewidth == 256 for p in pages[:3])  # type: ignore[union-attr]
        assert [p.subfiletype for p in pages[:3]] == [0, 1, 1]  # type: ignore[union-attr]
        assert not pages[3].is_tiled  # type: ignore[union-attr]
        assert pages[3].tags["PageName"].value == "label"  # type: ignore[union-attr]
        assert pages[0].tags["ResolutionUnit"].value == 3  # type: ignore[union-attr]


def test_openslide_reads_jpeg_drop_file(jpeg_file: tuple[Path, np.ndarray], slide: CompressedSlide) -> None:
    path, _ = jpeg_file
    with openslide.OpenSlide(path) as osr:
        assert osr.level_dimensions == slide.level_dimensions
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.26)
        assert dict(osr.associated_images) == {}  # the stripped label IFD is ignored
        for level in range(osr.level_count):
            size = osr.level_dimensions[level]
            a = np.asarray(osr.read_region((0, 0), level, size))
            b = np.asarray(slide.read_region((0, 0), level, size))
            opaque = a[:, :, 3] == 255
            assert opaque.any()
            # identical colours wherever OpenSlide has a tile (it shows dropped glass transparent)
            np.testing.assert_array_equal(a[opaque], b[opaque])


def test_api_shape(slide: CompressedSlide) -> None:
    assert slide.format == "tileserver"
    assert CompressedSlide.detect_format(str(slide.path)) == "tileserver"
    assert CompressedSlide.detect_format(str(CMU)) is None
    assert slide.level_count == 3
    assert slide.level_downsamples == (1.0, 2.0, 4.0)
    assert slide.dimensions == (700, 600)
    assert slide.mpp == (0.25, 0.26)
    assert slide.get_best_level_for_downsample(0.5) == 0
    assert slide.get_best_level_for_downsample(1.9) == 0
    assert slide.get_best_level_for_downsample(2) == 1
    assert slide.get_best_level_for_downsample(100) == 2
    assert slide.grid(0) == (3, 3) and slide.grid(2) == (1, 1)
    thumb = slide.get_thumbnail((100, 100))
    assert max(thumb.size) == 100


def test_properties(slide: CompressedSlide) -> None:
    p = slide.properties
    assert p["openslide.vendor"] == "tileserver"
    assert p["openslide.level-count"] == "3"
    assert p["openslide.level[1].width"] == "350"
    assert p["openslide.level[2].downsample"] == "4.0"
    assert p["openslide.level[0].tile-width"] == "256"
    assert float(p["openslide.mpp-x"]) == 0.25
    assert p["aperio.AppMag"] == "20"  # source properties carried over
    assert p["tileserver.codec"] == "jpeg"
    assert p["tileserver.quality"] == "95"
    assert p["tileserver.glass"] == "drop"
    assert p["tileserver.glass-color"] == "#f1f2f3"
    assert p["tileserver.source-bytes"] == "12345"
    assert float(p["tileserver.tissue-fraction"]) == 0.5
    assert p["tileserver.format-version"] == "1"
    assert p["openslide.associated.label.width"] == "80"


def test_glass_reads_as_glass_colour_from_the_index(slide: CompressedSlide) -> None:
    calls: list[bytes] = []

    def spy(data: bytes) -> np.ndarray:
        calls.append(data)
        return codecs.get("jpeg").decode(data)

    slide.set_decoder(spy)
    assert slide.is_glass(0, 0, 0) and slide.is_glass(0, 2, 2)
    assert not slide.is_glass(0, 1, 0)
    assert slide.read_tile_bytes(0, 0, 0) == b""
    tile = slide.read_tile(0, 2, 2)
    assert tile.shape == (600 - 512, 700 - 512, 3)
    assert (tile == GLASS).all()
    assert calls == []  # glass never reaches the decoder
    region = np.asarray(slide.read_region((0, 0), 0, (256, 256)))
    assert (region[:, :, :3] == GLASS).all() and (region[:, :, 3] == 255).all()
    # a lower-level tile is glass only when everything it covers is
    assert not slide.is_glass(1, 0, 0)
    assert slide.glass_fraction() == pytest.approx(3 / 9)


def test_read_region_stitches_tiles_and_is_transparent_outside(
    slide: CompressedSlide,
) -> None:
    region = np.asarray(slide.read_region((200, 230), 0, (100, 60)))  # straddles four tiles
    expected = np.concatenate(
        [
            np.concatenate([slide.read_tile(0, 0, 0)[230:, 200:], slide.read_tile(0, 1, 0)[230:, :44]], axis=1),
            np.concatenate([slide.read_tile(0, 0, 1)[:34, 200:], slide.read_tile(0, 1, 1)[:34, :44]], axis=1),
        ]
    )
    np.testing.assert_array_equal(region[:, :, :3], expected)
    outside = np.asarray(slide.read_region((-10, 590), 0, (30, 30)))
    assert (outside[:, :10, 3] == 0).all()  # left of the slide
    assert (outside[10:, :, 3] == 0).all()  # below it (rows 600+)
    assert (outside[:10, 10:, 3] == 255).all()
    np.testing.assert_array_equal(outside[:10, 10:, :3], slide.read_tile(0, 0, 2)[78:88, :20])
    level1 = np.asarray(slide.read_region((512, 256), 1, (40, 40)))
    np.testing.assert_array_equal(level1[:, :, :3], slide.read_tile(1, 1, 0)[128:168, :40])
    with pytest.raises(openslide.OpenSlideError):
        slide.read_region((0, 0), 5, (10, 10))


def test_bad_tile_addresses(slide: CompressedSlide) -> None:
    for address in [(3, 0, 0), (-1, 0, 0), (0, 3, 0), (0, 0, 3), (0, -1, 0), (2, 1, 0)]:
        with pytest.raises(BadTileAddress):
            slide.read_tile(*address)
        with pytest.raises(BadTileAddress):
            slide.is_glass(*address)


def test_associated_images(slide: CompressedSlide) -> None:
    label = slide.associated_images["label"]
    assert label.mode == "RGBA" and label.size == (80, 50)
    px = np.asarray(label)
    assert np.abs(px[:, :, :3].astype(int) - (10, 200, 30)).max() < 8
    assert (px[:, :, 3] == 255).all()


def test_set_decoder_routes_and_guards(slide: CompressedSlide) -> None:
    slide.set_decoder(lambda data: np.zeros((256, 256, 3), np.uint8))
    assert (slide.read_tile(0, 1, 1) == 0).all()
    slide.set_decoder(lambda data: np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(CorruptTile, match="shape"):
        slide.read_tile(0, 1, 1)

    def boom(data: bytes) -> np.ndarray:
        raise RuntimeError("batcher down")

    slide.set_decoder(boom)
    with pytest.raises(CorruptTile, match="batcher down"):
        slide.read_tile(0, 1, 1)
    slide.set_decoder(None)
    assert slide.read_tile(0, 1, 1).mean() > 10


def test_concurrent_reads_match_sequential(slide: CompressedSlide) -> None:
    addresses = [(lv, c, r) for lv in range(3) for c in range(slide.grid(lv)[0]) for r in range(slide.grid(lv)[1])]
    expected = {a: slide.read_tile(*a) for a in addresses}
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                for a in addresses:
                    np.testing.assert_array_equal(slide.read_tile(*a), expected[a])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_deepzoom_over_compressed_slide(slide: CompressedSlide) -> None:
    dz = DeepZoomGenerator(slide, tile_size=254, overlap=1)
    assert dz.level_count == 11  # ceil(log2(700)) + 1
    last = dz.level_count - 1
    tile = dz.get_tile(last, (1, 1))
    assert tile.size == (256, 256)
    expected = np.asarray(slide.read_region((253, 253), 0, (256, 256)).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(tile), expected)
    assert dz.get_tile(0, (0, 0)).size == (1, 1)


def test_is_compressed_slide_is_false_for_others(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("not a slide")
    plain = tmp_path / "plain.tiff"
    tifffile.imwrite(plain, np.zeros((300, 300, 3), np.uint8), tile=(256, 256))
    for p in (text, plain, CMU, tmp_path / "missing.tiff", tmp_path):
        assert not is_compressed_slide(p)
    with pytest.raises(UnsupportedFormat):
        CompressedSlide(plain)


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def test_truncated_file_is_corrupt_slide(jpeg_file: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    data = jpeg_file[0].read_bytes()
    with tifffile.TiffFile(jpeg_file[0]) as tf:
        first_tile_end = int(tf.pages[0].dataoffsets[1]) + int(tf.pages[0].databytecounts[1])  # type: ignore[union-attr]
    bad = tmp_path / "cut.tiff"
    bad.write_bytes(data[: first_tile_end + 10])  # keeps the header but loses tiles and IFDs
    with pytest.raises((CorruptSlide, UnsupportedFormat)):
        tileserver.open_slide(bad)


def test_bytecount_beyond_file_is_corrupt_slide(jpeg_file: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    bad = _copy(jpeg_file[0], tmp_path / "huge.tiff")
    with tifffile.TiffFile(bad) as tf:
        tag = tf.pages[0].tags["TileByteCounts"]  # type: ignore[union-attr]
        where, fmt = tag.valueoffset, {4: "<I", 16: "<Q"}[tag.dtype]
    with open(bad, "rb+") as fh:
        fh.seek(where + struct.calcsize(fmt))  # the second tile's count
        fh.write(struct.pack(fmt, 2**32 - 1))  # 4 GB: must never be allocated
    with pytest.raises(CorruptSlide, match="beyond the end"):
        CompressedSlide(bad)


def test_damaged_tile_is_corrupt_tile_only(jpeg_file: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    bad = _copy(jpeg_file[0], tmp_path / "garbled.tiff")
    with tifffile.TiffFile(bad) as tf:
        offset = int(tf.pages[0].dataoffsets[4])  # type: ignore[union-attr]
        count = int(tf.pages[0].databytecounts[4])  # type: ignore[union-attr]
    with open(bad, "rb+") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * count)
    with CompressedSlide(bad) as s:
        with pytest.raises(CorruptTile):
            s.read_tile(0, 1, 1)
        assert s.read_tile(0, 0, 1).shape == (256, 256, 3)  # neighbours unaffected


class _FakeNeural:
    name = "neural"
    params: dict[str, Any] = {"quality": 3}  # noqa: RUF012 - matches the TileCodec protocol
    tiff_compression = 65000
    model_info = {"architecture": "fake", "quality": 3, "sha256": "0" * 64}  # noqa: RUF012

    def encode(self, tile: np.ndarray) -> bytes:
        return b"N" + tile[:2, :2].tobytes()

    def decode(self, data: bytes) -> np.ndarray:  # pragma: no cover - never reached
        raise AssertionError

    def decode_batch(self, blobs: Any) -> list[Any]:  # pragma: no cover
        raise AssertionError


def test_private_compression_code_and_missing_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "neural.tiff"
    codec = _FakeNeural()
    with ContainerWriter(path, width=300, height=260, codec=codec, glass="drop", glass_color=GLASS) as w:
        for level, g in enumerate(w.levels):
            for r in range(g.rows):
                for c in range(g.cols):
                    w.add_tile(level, c, r, codec.encode(np.zeros((256, 256, 3), np.uint8)))
        w.finish(model_info=codec.model_info)
    with tifffile.TiffFile(path) as tf:
        assert tf.pages[0].compression == 65000  # type: ignore[union-attr]
    assert is_compressed_slide(path)
    seen: list[Any] = []

    def check_model(info: Any) -> None:
        seen.append(info)
        raise MissingModel(f"model {info['sha256'][:8]} is not installed")

    fake = types.ModuleType("tileserver.codecs.neural")
    fake.check_model = check_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tileserver.codecs.neural", fake)
    monkeypatch.setattr(tileserver.codecs, "neural", fake, raising=False)
    with pytest.raises(MissingModel, match="00000000"):
        tileserver.open_slide(path)
    assert seen == [codec.model_info]


def test_writer_refuses_incomplete_pyramid(tmp_path: Path) -> None:
    dst = tmp_path / "x.tiff"
    with ContainerWriter(dst, width=300, height=300, codec=codecs.get("jpeg"), glass="drop", glass_color=GLASS) as w:
        w.add_tile(0, 0, 0, b"")
        with pytest.raises(ConversionError, match="never written"):
            w.finish()
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "x.tiff"
    with (
        pytest.raises(KeyboardInterrupt),
        ContainerWriter(dst, width=300, height=300, codec=codecs.get("jpeg"), glass="keep", glass_color=GLASS) as w,
    ):
        w.add_tile(0, 0, 0, b"abc")
        assert w.spool_path.exists()
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_writer_does_not_overwrite_without_permission(tmp_path: Path) -> None:
    dst = tmp_path / "x.tiff"
    write_container(dst, codecs.get("jpeg"))
    before = dst.read_bytes()
    with pytest.raises(ConversionError, match="already exists"):
        write_container(dst, codecs.get("jpeg", quality=20))
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tiff"]
    write_container(dst, codecs.get("jpeg", quality=20), overwrite=True)
    assert dst.read_bytes() != before


def test_stale_partials_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    dst = tmp_path / "x.tiff"
    dead_pid = 2**22 + 12345  # above the default pid_max: never alive
    stale = [partial_path(dst, dead_pid)]
    stale.append(stale[0].with_name(stale[0].name + ".spool"))
    for p in stale:
        p.write_bytes(b"junk")
    alive = partial_path(dst, os.getppid())
    alive.write_bytes(b"someone else's write in progress")
    other = tmp_path / ".y.tiff.partial-1"
    other.write_bytes(b"another file's partial")
    assert sorted(clean_stale_partials(dst)) == sorted(stale)
    assert alive.exists() and other.exists()


def test_geometry_matches_writer(tmp_path: Path) -> None:
    w = ContainerWriter(tmp_path / "g.tiff", width=1000, height=10, codec=codecs.get("jpeg"), glass="drop",
                        glass_color=GLASS)  # fmt: skip
    try:
        assert w.levels == level_geometry(1000, 10)
    finally:
        w.abort()
    assert list(tmp_path.iterdir()) == []


def test_unknown_codec_is_unsupported_format(tmp_path: Path) -> None:
    class Mystery(_FakeNeural):
        name = "mystery"

    path = tmp_path / "m.tiff"
    with ContainerWriter(path, width=10, height=10, codec=Mystery(), glass="drop", glass_color=GLASS) as w:
        w.add_tile(0, 0, 0, b"x")
        w.finish()
    assert is_compressed_slide(path)
    with pytest.raises(UnsupportedFormat, match="mystery"):
        tileserver.open_slide(path)


def test_associated_images_come_from_the_file_that_was_opened(tmp_path: Path) -> None:
    """A slide replaced on disk (convert --force while serving) must not lend its IFDs to an open reader."""
    path = tmp_path / "slide.tiff"
    green = np.full((50, 80, 3), (10, 200, 30), np.uint8)
    write_container(path, codecs.get("jpeg", quality=95), associated={"label": green})
    with CompressedSlide(path) as s:
        replacement = tmp_path / "other.tiff"
        red = np.full((90, 40, 3), (200, 20, 20), np.uint8)
        write_container(replacement, codecs.get("jpeg", quality=95), associated={"label": red, "macro": red})
        os.replace(replacement, path)
        label = np.asarray(s.associated_images["label"].convert("RGB"))
        assert label.shape == (50, 80, 3)
        assert abs(int(label[..., 1].mean()) - 200) < 10
