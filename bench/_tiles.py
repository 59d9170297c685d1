"""Evaluation tiles for the benchmarks: 256x256 tissue tiles of the shared slides and patches.

Tiles are grouped by where they come from, so results can be reported per group:

* ``slides``  – level-0 tissue tiles of the shared H&E slides (CMU SVS, Camelyon DICOM), JPEG-coded by the scanner
* ``patches`` – the tissue patches from other labs (PNG/TIFF/JPEG; mostly JPEG-sourced upstream)

Each tile records its source file so results can also be split into the files a
neural model trained on and the files it held out (see the model configs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(os.environ.get("TILESERVER_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TILE = 256


@dataclass(frozen=True)
class EvalTile:
    group: str
    source: str
    x: int
    y: int
    pixels: np.ndarray


def _is_tissue(tile: np.ndarray) -> bool:
    try:
        from tileserver import tissue

        bg = tissue.Background(color=(240, 240, 240), kind="brightfield")
        flags = tissue.get_detector("classic").glass_flags([tile], bg)
        if flags[0]:
            return False
    except (ImportError, AttributeError):
        pass
    # Mostly tissue, not an edge sliver: the benchmark measures coding of tissue.
    gray = tile.mean(axis=2)
    return bool((gray < 215).mean() > 0.5)


def _crops(img: np.ndarray, limit: int) -> list[tuple[int, int, np.ndarray]]:
    h, w = img.shape[:2]
    out = []
    for y in range(0, h - TILE + 1, TILE):
        for x in range(0, w - TILE + 1, TILE):
            t = np.ascontiguousarray(img[y : y + TILE, x : x + TILE, :3])
            if _is_tissue(t):
                out.append((x, y, t))
    if len(out) > limit:  # spread the picks over the image, deterministically
        idx = np.linspace(0, len(out) - 1, limit).round().astype(int)
        out = [out[i] for i in idx]
    return out


def load_tiles(per_slide: int = 12, per_patch: int = 2) -> list[EvalTile]:
    """Deterministic set of tissue tiles from the shared data."""
    from tileserver.slides import resolve_slide_file
    from tileserver.slides.openslide_reader import OpenSlideReader

    tiles: list[EvalTile] = []
    for rel in ("slides/CMU-1-Small-Region.svs", "slides/camelyon-dicom"):
        path = DATA / rel
        if not path.exists():
            continue
        with OpenSlideReader(resolve_slide_file(path)) as slide:
            w, h = slide.dimensions
            img = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
        for x, y, t in _crops(img, per_slide):
            tiles.append(EvalTile("slides", path.name, x, y, t))
    for path in sorted((DATA / "patches" / "tissue").iterdir()):
        img = np.asarray(Image.open(path).convert("RGB"))
        if min(img.shape[:2]) < TILE:
            continue
        for x, y, t in _crops(img, per_patch):
            tiles.append(EvalTile("patches", path.name, x, y, t))
    return tiles
