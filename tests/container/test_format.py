"""Container layout rules: level geometry, the cheap marker check, metadata versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tileserver.container.format import (
    FORMAT_VERSION,
    MAGIC,
    level_geometry,
    parse_metadata,
    read_first_description,
)
from tileserver.errors import CorruptSlide, UnsupportedFormat

from ..conftest import CMU


def test_levels_halve_until_one_tile() -> None:
    levels = level_geometry(2220, 2967)
    assert [(g.width, g.height) for g in levels] == [(2220, 2967), (1110, 1484), (555, 742), (278, 371), (139, 186)]
    assert [g.downsample for g in levels] == [1, 2, 4, 8, 16]
    assert (levels[0].cols, levels[0].rows) == (9, 12)
    assert levels[-1].tiles == 1


@pytest.mark.parametrize(
    ("size", "count"), [((1, 1), 1), ((256, 256), 1), ((257, 10), 2), ((513, 100), 3), ((100_000, 80_000), 10)]
)
def test_level_count(size: tuple[int, int], count: int) -> None:
    levels = level_geometry(*size)
    assert len(levels) == count
    assert max(levels[-1].width, levels[-1].height) <= 256
    assert all(max(g.width, g.height) > 256 for g in levels[:-1])


def test_level_geometry_rejects_empty() -> None:
    with pytest.raises(ValueError, match="positive"):
        level_geometry(0, 10)


@pytest.mark.parametrize("bigtiff", [False, True])
@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_first_description_is_read_from_header(tmp_path: Path, bigtiff: bool, byteorder: str) -> None:
    path = tmp_path / "d.tiff"
    desc = json.dumps({"format": "tileserver", "x": "y" * 500})
    tifffile.imwrite(
        path, np.zeros((8, 8, 3), np.uint8), bigtiff=bigtiff, byteorder=byteorder, description=desc, metadata=None
    )
    assert read_first_description(path) == desc.encode()
    assert read_first_description(path).startswith(MAGIC)  # type: ignore[union-attr]


def test_first_description_of_non_tiffs(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a slide\n")
    empty = tmp_path / "empty.tiff"
    empty.write_bytes(b"")
    header_only = tmp_path / "header.tiff"
    header_only.write_bytes(b"II*\x00\xff\xff\xff\x00")  # IFD offset beyond the end
    for p in (text, empty, header_only, tmp_path / "missing.tiff", tmp_path):
        assert read_first_description(p) is None
    assert read_first_description(CMU) is not None  # an Aperio description
    assert not read_first_description(CMU).startswith(MAGIC)  # type: ignore[union-attr]


def test_description_size_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "big.tiff"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8), description="x" * 5000, metadata=None)
    assert read_first_description(path, limit=1000) is None


def _meta(**over: object) -> bytes:
    meta: dict[str, object] = {
        "format": "tileserver",
        "format_version": FORMAT_VERSION,
        "width": 10,
        "height": 10,
        "tile_size": 256,
        "codec": {},
        "glass": {},
        "levels": [],
    }
    meta.update(over)
    return json.dumps(meta).encode()


def test_parse_metadata_version_rules() -> None:
    assert parse_metadata(_meta(), "x")["format_version"] == FORMAT_VERSION
    assert parse_metadata(_meta(unknown_future_key=1), "x")["unknown_future_key"] == 1
    with pytest.raises(UnsupportedFormat, match="newer"):
        parse_metadata(_meta(format_version=FORMAT_VERSION + 1), "x")
    with pytest.raises(CorruptSlide, match="format_version"):
        parse_metadata(_meta(format_version="1"), "x")
    with pytest.raises(UnsupportedFormat, match="not a tileserver"):
        parse_metadata(b'{"other": 1}', "x")
    with pytest.raises(CorruptSlide, match="damaged"):
        parse_metadata(MAGIC + b", oops", "x")
    with pytest.raises(CorruptSlide, match="lacks"):
        parse_metadata(json.dumps({"format": "tileserver", "format_version": 1, "width": 1}).encode(), "x")
