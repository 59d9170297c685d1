"""Fixtures for the reliability tests: small compressed slides, result recording, free ports."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import openslide
import pytest

from tests.conftest import CMU

Pixels = npt.NDArray[np.uint8]

REPO = Path(__file__).resolve().parents[2]

#: where ``record`` merges measured numbers (set TILESERVER_RELIABILITY_RESULTS=bench/results/reliability.json)
RESULTS_ENV = "TILESERVER_RELIABILITY_RESULTS"

_record_lock = threading.Lock()

#: level-0 region of the CMU slide used for the small slides: glass on the left, tissue on the right
CROP_LOCATION = (256, 256)
CROP_SIZE = (700, 520)


def record(section: str, numbers: dict[str, Any]) -> None:
    """Print ``numbers`` and, when ``$TILESERVER_RELIABILITY_RESULTS`` names a file, merge them into it."""
    print(f"\n[reliability] {section}: {json.dumps(numbers, sort_keys=True)}")
    target = os.environ.get(RESULTS_ENV)
    if not target:
        return
    path = Path(target)
    if not path.is_absolute():
        path = REPO / path
    with _record_lock:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            doc = {}
        doc[section] = numbers
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def cmu_crop() -> Pixels:
    """``CROP_SIZE`` RGB pixels of the CMU slide at ``CROP_LOCATION``."""
    with openslide.OpenSlide(str(CMU)) as s:
        region = s.read_region(CROP_LOCATION, 0, CROP_SIZE).convert("RGB")
    return np.ascontiguousarray(np.asarray(region))


def write_small_source(dst: Path) -> Path:
    """A small container (JPEG q95, glass kept) of the CMU crop, with a label and a thumbnail.

    Written with ``ContainerWriter`` so that the slide converted from it carries
    associated images too (a generic TIFF crop would have none).
    """
    from tileserver import codecs
    from tileserver.container.writer import ContainerWriter

    img = cmu_crop()
    codec = codecs.get("jpeg", quality=95)
    h, w = img.shape[:2]
    with ContainerWriter(dst, width=w, height=h, codec=codec, glass="keep", glass_color=(245, 245, 245)) as wr:
        level_img = img
        for level, g in enumerate(wr.levels):
            if level:
                prev = level_img
                ph, pw = prev.shape[:2]
                pad = np.pad(prev, ((0, ph % 2), (0, pw % 2), (0, 0)), mode="edge").astype(np.uint16)
                level_img = ((pad[0::2, 0::2] + pad[1::2, 0::2] + pad[0::2, 1::2] + pad[1::2, 1::2] + 2) // 4).astype(
                    np.uint8
                )
            for row in range(g.rows):
                for col in range(g.cols):
                    tile = level_img[row * 256 : (row + 1) * 256, col * 256 : (col + 1) * 256]
                    padded = np.zeros((256, 256, 3), np.uint8)
                    padded[: tile.shape[0], : tile.shape[1]] = tile
                    wr.add_tile(level, col, row, codec.encode(padded))
        label = np.full((60, 80, 3), 200, np.uint8)
        label[20:40, 10:70] = 30
        wr.finish(associated={"label": label, "thumbnail": level_img}, source={"name": "crop", "bytes": 1})
    return dst


@pytest.fixture(scope="session")
def small_compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CMU crop converted with ``tileserver.convert.convert`` (JPEG, glass dropped): 14 tiles, ~50 KB."""
    from tileserver.convert import convert

    d = tmp_path_factory.mktemp("small")
    src = write_small_source(d / "source.tiff")
    out = d / "small.tiff"
    convert(src, out, codec="jpeg", glass="drop", progress=False, quality_samples=4)
    return out


@pytest.fixture(scope="session")
def cmu_compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole CMU slide converted to JPEG with dropped glass."""
    from tileserver.convert import convert

    out = tmp_path_factory.mktemp("cmu") / "CMU-1-Small-Region.tiff"
    convert(CMU, out, codec="jpeg", glass="drop", progress=False, quality_samples=8)
    return out
