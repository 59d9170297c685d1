"""Layout and version rules of tileserver's compressed slide file.

A compressed slide is one **tiled pyramidal BigTIFF** (``.tiff``) that tifffile,
OpenSlide (for standard codecs) and QuPath understand.

Byte layout
-----------
::

    BigTIFF header (little-endian, "II", 43, offset of IFD 0)
    tile data of level 0, level 1, ... (each tile's bytes exactly as the codec made them)
    IFD 0   level 0 (full resolution)                            NewSubfileType 0
    IFD 1   level 1 (downsample 2)                               NewSubfileType 1 (reduced image)
    ...
    IFD L-1 level L-1, the first level that fits in one tile     NewSubfileType 1
    IFD L.. associated images (label, macro, thumbnail, ...)     NewSubfileType 0, stripped, PageName = name

* **Levels.** Level ``k`` is ``ceil(W / 2**k) x ceil(H / 2**k)`` pixels, made by
  2x2 area averaging of level ``k-1`` (edge pixels replicated at odd sizes), down to
  the first level whose width and height are both <= the tile size.  Its exact
  downsample is ``2**k``.  Every level IFD is tiled, ``TileWidth = TileLength = 256``,
  ``SamplesPerPixel = 3``, 8 bits, contiguous planes, tiles in row-major order.
  ``XResolution``/``YResolution`` are pixels per centimetre at that level
  (``1e4 / (mpp * 2**k)``) with ``ResolutionUnit = 3`` (centimetre) when the
  source gave microns per pixel, which is what OpenSlide turns into
  ``openslide.mpp-x``/``openslide.mpp-y``.
* **Tiles.** Each stored tile is a complete, self-contained bitstream of the
  codec named in the metadata (no ``JPEGTables``), coding the tile padded to
  256x256 by edge replication; readers crop edge tiles to the level size.
  ``Compression`` is the codec's ``tiff_compression``: JPEG 7 (with
  ``Photometric = YCbCr`` and ``YCbCrSubSampling`` matching the coded stream so
  OpenSlide's decoder converts colours exactly as ours does), JPEG 2000 33005,
  WebP 50001, JPEG-XL 50002, AVIF 65001, neural 65000 (private); other codecs
  use ``Photometric = RGB``.
* **Glass.** With glass strategy ``drop`` a glass tile is a *zero-byte entry*
  (``TileByteCounts[i] == 0``, ``TileOffsets[i] == 0``): the sparse index.  Such a
  tile reads as the stored glass colour in our reader (OpenSlide shows it
  transparent).  A lower-level tile is glass iff every level-0 tile it covers is.
* **Associated images** are stripped (not tiled) RGB IFDs compressed with JPEG and
  named by ``PageName`` (tag 285), so OpenSlide's generic-TIFF reader, which only
  uses tiled IFDs, skips them.
* **Metadata.** ``ImageDescription`` of IFD 0 is one JSON object (ASCII) whose
  first key is ``"format": "tileserver"`` (``MAGIC``; cheap to test for), and
  ``Software`` is ``"tileserver <version>"``.  Keys::

      format            "tileserver"
      format_version    int, FORMAT_VERSION at write time
      software          "tileserver <version>"
      created           ISO-8601 UTC time of writing
      width, height     level-0 size in pixels
      tile_size         256
      mpp               [x, y] microns per pixel at level 0, or null
      codec             {"name", "params", "tiff_compression", "model_info"}
                        (model_info: the neural codec's architecture, quality and
                        weights SHA-256; null for classic codecs)
      glass             {"strategy": "keep"|"fill"|"drop", "color": [r, g, b],
                         "kind": "brightfield"|"fluorescence"}
      tissue_fraction   fraction of level-0 area in tissue (non-glass) tiles
      levels            [{"ifd", "width", "height", "downsample", "tiles", "glass_tiles"}, ...]
      associated        {name: {"ifd", "width", "height"}}
      source            {"name", "bytes", "format", "properties": {key: value}}

Version rules
-------------
``FORMAT_VERSION`` is an integer.  Adding optional metadata keys does not change
it (readers ignore keys they do not know).  Any change to the byte layout or to
the meaning of an existing key increments it.  A reader opens files whose
version is between 1 and its own ``FORMAT_VERSION`` and refuses newer ones with
``UnsupportedFormat``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from ..errors import CorruptSlide, UnsupportedFormat

__all__ = [
    "ASSOCIATED_JPEG_QUALITY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GLASS_STRATEGIES",
    "MAGIC",
    "MAX_ASSOCIATED_SIDE",
    "MAX_DESCRIPTION_BYTES",
    "MAX_LEVELS",
    "MAX_SLIDE_SIDE",
    "MAX_TILE_SIZE",
    "TAG_IMAGE_DESCRIPTION",
    "TAG_PAGE_NAME",
    "TILE_SIZE",
    "LevelGeometry",
    "is_int",
    "is_number",
    "level_geometry",
    "parse_metadata",
    "read_first_description",
]

FORMAT_NAME = "tileserver"
FORMAT_VERSION = 1
TILE_SIZE = 256
GLASS_STRATEGIES = ("keep", "fill", "drop")
#: how the first IFD's ImageDescription starts (``json.dumps`` of a dict whose first key is "format")
MAGIC = b'{"format": "tileserver"'
#: a description larger than this is not ours (guards allocations on damaged files)
MAX_DESCRIPTION_BYTES = 64 * 1024 * 1024
ASSOCIATED_JPEG_QUALITY = 90
#: largest level-0 width or height accepted (TIFF's LONG limit); guards damaged metadata
MAX_SLIDE_SIDE = 2**32 - 1
#: largest tile edge accepted (TIFF tile sizes beyond this are not real slides)
MAX_TILE_SIZE = 65536
#: most pyramid levels (2**40 downsample is far beyond any slide; bounds ``level_geometry``)
MAX_LEVELS = 40
#: largest associated image width or height decoded (label/macro/thumbnail are a few thousand pixels)
MAX_ASSOCIATED_SIDE = 16384

TAG_IMAGE_DESCRIPTION = 270
TAG_PAGE_NAME = 285


@dataclass(frozen=True)
class LevelGeometry:
    """Size and tile grid of one pyramid level."""

    width: int
    height: int
    downsample: int
    cols: int
    rows: int

    @property
    def tiles(self) -> int:
        """Number of tiles in the level's grid."""
        return self.cols * self.rows


def level_geometry(width: int, height: int, tile_size: int = TILE_SIZE) -> list[LevelGeometry]:
    """Geometry of every level: downsample 1, 2, 4, ... until the level fits one tile.

    Raises ``ValueError`` for a non-positive size or tile size, or a pyramid of more
    than ``MAX_LEVELS`` levels (the loop is bounded whatever the input).
    """
    if width < 1 or height < 1:
        raise ValueError(f"slide size must be positive, got {width}x{height}")
    if tile_size < 1:
        raise ValueError(f"tile size must be positive, got {tile_size}")
    levels = []
    w, h, ds = width, height, 1
    for _ in range(MAX_LEVELS):
        levels.append(LevelGeometry(w, h, ds, -(-w // tile_size), -(-h // tile_size)))
        if w <= tile_size and h <= tile_size:
            return levels
        w, h, ds = -(-w // 2), -(-h // 2), ds * 2
    raise ValueError(f"{width}x{height} with tile size {tile_size} needs more than {MAX_LEVELS} levels")


_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}


def read_first_description(path: str | Path, limit: int = MAX_DESCRIPTION_BYTES) -> bytes | None:
    """The ImageDescription bytes of a TIFF's first IFD, or None (not TIFF, no tag, unreadable).

    Parses only the header and the first IFD's entries, so it is cheap on any file.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 16, 0)
        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            return None
        e = "<" if head[:2] == b"II" else ">"
        version = struct.unpack(e + "H", head[2:4])[0]
        if version == 42:
            ifd = struct.unpack(e + "I", head[4:8])[0]
            count_fmt, count_size, entry_size, value_fmt, inline = "H", 2, 12, "I", 4
        elif version == 43 and len(head) == 16:
            ifd = struct.unpack(e + "Q", head[8:16])[0]
            count_fmt, count_size, entry_size, value_fmt, inline = "Q", 8, 20, "Q", 8
        else:
            return None
        if ifd <= 0 or ifd + count_size > size:
            return None
        n = struct.unpack(e + count_fmt, os.pread(fd, count_size, ifd))[0]
        if n > 4096 or ifd + count_size + n * entry_size > size:
            return None
        entries = os.pread(fd, n * entry_size, ifd + count_size)
        for i in range(n):
            entry = entries[i * entry_size : (i + 1) * entry_size]
            tag, typ = struct.unpack(e + "HH", entry[:4])
            if tag != TAG_IMAGE_DESCRIPTION:
                continue
            count = struct.unpack(e + value_fmt, entry[4 : 4 + inline])[0]
            nbytes = count * _TYPE_SIZES.get(typ, 1)
            if nbytes > limit:
                return None
            if nbytes <= inline:
                data = entry[4 + inline : 4 + inline + nbytes]
            else:
                offset = struct.unpack(e + value_fmt, entry[4 + inline :])[0]
                if offset + nbytes > size:
                    return None
                data = os.pread(fd, nbytes, offset)
            return data.rstrip(b"\0")
        return None
    except (OSError, struct.error):
        return None
    finally:
        os.close(fd)


def parse_metadata(description: bytes | str, path: str | Path) -> dict[str, Any]:
    """Parse and check our metadata JSON; raises ``UnsupportedFormat`` / ``CorruptSlide``."""
    raw = description.encode("latin-1") if isinstance(description, str) else description
    if not raw.startswith(MAGIC):
        raise UnsupportedFormat(f"{path}: not a tileserver compressed slide")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CorruptSlide(f"{path}: damaged tileserver metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise CorruptSlide(f"{path}: damaged tileserver metadata (not an object)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CorruptSlide(f"{path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"{path}: tileserver format version {version} is newer than this reader's ({FORMAT_VERSION}); upgrade"
        )
    for key in ("width", "height", "tile_size", "codec", "glass", "levels"):
        if key not in meta:
            raise CorruptSlide(f"{path}: tileserver metadata lacks {key!r}")
    _check_types(meta, path)
    return meta


def is_int(value: object) -> TypeGuard[int]:
    """True for a JSON integer (``bool`` excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """True for a finite JSON number (``bool`` excluded)."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def _check_types(meta: dict[str, Any], path: str | Path) -> None:
    """Check the type and range of each top-level key readers use, naming the first bad key.

    Nested objects (``codec``, ``glass``, ``levels`` entries) are checked by their users;
    here only their kind, so that no reader calls a method on the wrong type.
    """

    def bad(key: str, want: str) -> CorruptSlide:
        return CorruptSlide(f"{path}: damaged tileserver metadata: {key!r} must be {want}, got {meta[key]!r:.80}")

    for key in ("width", "height"):
        if not (is_int(meta[key]) and 1 <= meta[key] <= MAX_SLIDE_SIDE):
            raise bad(key, f"an integer in 1..{MAX_SLIDE_SIDE}")
    if not (is_int(meta["tile_size"]) and 1 <= meta["tile_size"] <= MAX_TILE_SIZE):
        raise bad("tile_size", f"an integer in 1..{MAX_TILE_SIZE}")
    for key in ("codec", "glass"):
        if not isinstance(meta[key], dict):
            raise bad(key, "an object")
    if not isinstance(meta["levels"], list):
        raise bad("levels", "a list")
    for key in ("associated", "source"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise bad(key, "an object or null")
    source = meta.get("source") or {}
    if source.get("properties") is not None and not isinstance(source["properties"], dict):
        raise CorruptSlide(f"{path}: damaged tileserver metadata: 'source.properties' must be an object or null")
    mpp = meta.get("mpp")
    if mpp is not None and not (isinstance(mpp, list) and len(mpp) == 2 and all(is_number(v) for v in mpp)):
        raise bad("mpp", "null or a pair of finite numbers")
    tissue = meta.get("tissue_fraction")
    if tissue is not None and not is_number(tissue):
        raise bad("tissue_fraction", "null or a finite number")
