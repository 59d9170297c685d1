"""Evaluation tiles for the benchmarks: 256x256 tissue tiles of the shared slides and patches.

Tiles are grouped by where they come from, so results can be reported per group:

* ``slides``  – level-0 tissue tiles of the shared H&E slides (CMU SVS, Camelyon DICOM), JPEG-coded by the scanner
* ``patches`` – the tissue patches from other labs (PNG/TIFF/JPEG; mostly JPEG-sourced upstream)

Each tile records its source file so results can also be split into the files a
neural model trained on and the files it held out (see the model configs), and
the codec that coded its pixels before us (``source_codec``: ``jpeg`` or
``jpeg2000`` from the slide's own metadata or the file type, else ``unknown``:
a PNG/TIFF patch whose upstream scanner codec is not recorded).  A codec looks
best on tiles that already carry its own artefacts, so results are split by it.
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
    source_codec: str = "unknown"
    rel: str = ""  # the file's path under the shared data directory, as the training configs name it
    height: int = 0  # the source image's height: held-out rows are counted from its bottom


_DICOM_SYNTAX = {
    "1.2.840.10008.1.2.4.50": "jpeg",
    "1.2.840.10008.1.2.4.51": "jpeg",
    "1.2.840.10008.1.2.4.90": "jpeg2000",
    "1.2.840.10008.1.2.4.91": "jpeg2000",
}
_TIFF_COMPRESSION = {6: "jpeg", 7: "jpeg", 33003: "jpeg2000", 33005: "jpeg2000", 34712: "jpeg2000"}


def source_codec(path: Path, properties: dict[str, str] | None = None) -> str:
    """The codec that coded ``path``'s level-0 pixels: ``jpeg``, ``jpeg2000`` or ``unknown``."""
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        return "jpeg"
    if suffix in (".jp2", ".j2k"):
        return "jpeg2000"
    if properties and "dicom.TransferSyntaxUID" in properties:
        return _DICOM_SYNTAX.get(properties["dicom.TransferSyntaxUID"], "unknown")
    if suffix in (".svs", ".tif", ".tiff", ".ndpi") and path.stat().st_size > 1 << 20:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return _TIFF_COMPRESSION.get(int(tif.pages[0].compression), "unknown")
    return "unknown"


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


#: the shared slides the benchmarks read, under the data directory
SLIDES = ("slides/CMU-1-Small-Region.svs", "slides/camelyon-dicom")


def data_files() -> list[str]:
    """The files :func:`load_tiles` reads, as paths under the data directory."""
    tissue = DATA / "patches" / "tissue"
    patches = [f"patches/tissue/{p.name}" for p in sorted(tissue.iterdir())] if tissue.is_dir() else []
    return [rel for rel in SLIDES if (DATA / rel).exists()] + patches


def load_tiles(per_slide: int = 12, per_patch: int = 2, only: set[str] | None = None) -> list[EvalTile]:
    """Deterministic set of tissue tiles from the shared data (``only``: just the files of these names)."""
    from tileserver.slides import resolve_slide_file
    from tileserver.slides.openslide_reader import OpenSlideReader

    tiles: list[EvalTile] = []
    for rel in SLIDES:
        path = DATA / rel
        if not path.exists() or (only is not None and path.name not in only):
            continue
        with OpenSlideReader(resolve_slide_file(path)) as slide:
            w, h = slide.dimensions
            img = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
            codec = source_codec(resolve_slide_file(path), dict(slide.properties))
        for x, y, t in _crops(img, per_slide):
            tiles.append(EvalTile("slides", path.name, x, y, t, codec, rel, img.shape[0]))
    for path in sorted((DATA / "patches" / "tissue").iterdir()):
        if only is not None and path.name not in only:
            continue
        img = np.asarray(Image.open(path).convert("RGB"))
        if min(img.shape[:2]) < TILE:
            continue
        rel = f"patches/tissue/{path.name}"
        for x, y, t in _crops(img, per_patch):
            tiles.append(EvalTile("patches", path.name, x, y, t, source_codec(path), rel, img.shape[0]))
    return tiles


def decode_tiles(n: int = 16) -> np.ndarray:
    """``n`` tissue tiles for the decode benchmarks, deterministic: half from the slides, the rest from
    the patches (``N x 256 x 256 x 3`` uint8)."""
    tiles = load_tiles(per_slide=6, per_patch=1)
    slides = [t.pixels for t in tiles if t.group == "slides"]
    patches = [t.pixels for t in tiles if t.group == "patches"]
    return np.stack((slides[: n // 2] + patches)[:n])


def spread_tiles(n: int = 16) -> np.ndarray:
    """``n`` of ``bench/compress.py``'s tiles spread evenly over its set (``np.linspace``): the tiles
    that refinement and encoder add-ons were tuned on, and that ``bench/decode_ab.py`` times."""
    tiles = load_tiles()
    pick = np.linspace(0, len(tiles) - 1, n).round().astype(int)
    return np.stack([tiles[i].pixels for i in pick])
