"""Read a compressed slide's index, raw tile bytes and associated images (layout in ``format``).

``ContainerReader`` knows nothing about codecs: it validates the file's
structure once at open (every tile's offset and byte count must lie inside the
file, so a damaged file fails with ``CorruptSlide`` instead of a huge read) and
then serves raw tile bytes with ``os.pread``, which is safe from many threads.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile

from ..errors import BadTileAddress, CorruptSlide, CorruptTile, UnsupportedFormat
from .format import MAGIC, LevelGeometry, level_geometry, parse_metadata, read_first_description

__all__ = ["ContainerReader", "is_container"]


def is_container(path: str | Path) -> bool:
    """True when ``path`` is one of our files (checks the marker only; decodes nothing)."""
    desc = read_first_description(path)
    return desc is not None and desc.startswith(MAGIC)


class ContainerReader:
    """The parsed structure of one container file, and raw access to its tiles."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        desc = read_first_description(self.path)
        if desc is None:
            if not self.path.exists():
                raise UnsupportedFormat(f"{self.path}: no such file")
            raise UnsupportedFormat(f"{self.path}: not a TIFF with tileserver metadata")
        self.metadata: dict[str, Any] = parse_metadata(desc, self.path)
        meta = self.metadata
        try:
            self.width, self.height = int(meta["width"]), int(meta["height"])
            self.tile_size = int(meta["tile_size"])
            codec = meta["codec"]
            self.codec_name: str = str(codec["name"])
            self.codec_params: dict[str, Any] = dict(codec.get("params") or {})
            self.tiff_compression = int(codec["tiff_compression"])
            self.model_info: dict[str, Any] | None = codec.get("model_info")
            glass = meta["glass"]
            self.glass_strategy: str = str(glass["strategy"])
            r, g, b = (int(c) for c in glass["color"])
            self.glass_color: tuple[int, int, int] = (r, g, b)
            self.levels: list[LevelGeometry] = level_geometry(self.width, self.height, self.tile_size)
            level_ifds = [int(lv["ifd"]) for lv in meta["levels"]]
            self.associated_ifds: dict[str, int] = {
                str(k): int(v["ifd"]) for k, v in (meta.get("associated") or {}).items()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptSlide(f"{self.path}: damaged tileserver metadata: {exc!r}") from exc
        if len(level_ifds) != len(self.levels) or self.tile_size <= 0:
            raise CorruptSlide(
                f"{self.path}: metadata lists {len(level_ifds)} levels, geometry needs {len(self.levels)}"
            )
        self.file_size = self.path.stat().st_size
        self._offsets: list[npt.NDArray[np.int64]] = []
        self._counts: list[npt.NDArray[np.int64]] = []
        self._parse(level_ifds)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        self._assoc_lock = threading.Lock()

    def _parse(self, level_ifds: list[int]) -> None:
        try:
            with tifffile.TiffFile(self.path) as tf:
                for level, (ifd, g) in enumerate(zip(level_ifds, self.levels, strict=True)):
                    page = tf.pages[ifd]
                    if not isinstance(page, tifffile.TiffPage):
                        raise CorruptSlide(f"{self.path}: level {level} IFD {ifd} is not a page")
                    if (
                        not page.is_tiled
                        or (page.tilelength, page.tilewidth) != (self.tile_size, self.tile_size)
                        or (page.imagelength, page.imagewidth) != (g.height, g.width)
                        or int(page.compression) != self.tiff_compression
                    ):
                        raise CorruptSlide(f"{self.path}: level {level} IFD does not match its metadata")
                    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                    counts = np.asarray(page.databytecounts, dtype=np.int64)
                    self._check_segments(offsets, counts, g.tiles, f"level {level}")
                    self._offsets.append(offsets)
                    self._counts.append(counts)
                for name, ifd in self.associated_ifds.items():
                    page = tf.pages[ifd]
                    if not isinstance(page, tifffile.TiffPage):
                        raise CorruptSlide(f"{self.path}: associated image {name!r} IFD {ifd} is not a page")
                    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                    counts = np.asarray(page.databytecounts, dtype=np.int64)
                    self._check_segments(offsets, counts, len(offsets), f"associated image {name!r}")
        except (CorruptSlide, UnsupportedFormat):
            raise
        except Exception as exc:  # tifffile raises many kinds on damaged files
            raise CorruptSlide(f"{self.path}: cannot parse TIFF structure: {exc}") from exc

    def _check_segments(
        self, offsets: npt.NDArray[np.int64], counts: npt.NDArray[np.int64], expected: int, what: str
    ) -> None:
        if len(offsets) != expected or len(counts) != expected:
            raise CorruptSlide(f"{self.path}: {what} has {len(offsets)} tiles, expected {expected}")
        if (counts < 0).any() or (offsets < 0).any() or ((offsets + counts) > self.file_size).any():
            raise CorruptSlide(f"{self.path}: {what} has tile data beyond the end of the file (truncated?)")

    # -- tiles -------------------------------------------------------------------------------
    def _index(self, level: int, col: int, row: int) -> int:
        if not 0 <= level < len(self.levels):
            raise BadTileAddress(f"{self.path}: level {level} out of range 0..{len(self.levels) - 1}")
        g = self.levels[level]
        if not (0 <= col < g.cols and 0 <= row < g.rows):
            raise BadTileAddress(f"{self.path}: tile ({col}, {row}) outside level {level}'s {g.cols}x{g.rows} grid")
        return row * g.cols + col

    def is_glass(self, level: int, col: int, row: int) -> bool:
        """True for a zero-byte (dropped glass) entry."""
        i = self._index(level, col, row)  # validates level before it indexes the list
        return bool(self._counts[level][i] == 0)

    def glass_mask(self, level: int) -> npt.NDArray[np.bool_]:
        """Boolean ``rows x cols`` grid of zero-byte entries at ``level``."""
        self._index(level, 0, 0)
        g = self.levels[level]
        mask: npt.NDArray[np.bool_] = (self._counts[level] == 0).reshape(g.rows, g.cols)
        return mask

    def tile_bytes(self, level: int, col: int, row: int) -> bytes:
        """Raw stored bytes of one tile (``b""`` for dropped glass)."""
        i = self._index(level, col, row)
        n = int(self._counts[level][i])
        if n == 0:
            return b""
        fd = self._fd
        if fd is None:
            raise CorruptTile(f"{self.path}: slide is closed")
        try:
            data = os.pread(fd, n, int(self._offsets[level][i]))
        except OSError as exc:
            raise CorruptTile(f"{self.path}: cannot read tile ({level}, {col}, {row}): {exc}") from exc
        if len(data) != n:
            raise CorruptTile(f"{self.path}: tile ({level}, {col}, {row}) is truncated")
        return data

    def associated_image(self, name: str) -> npt.NDArray[np.uint8]:
        """Decode one associated image (``H x W x 3`` uint8)."""
        ifd = self.associated_ifds[name]
        with self._assoc_lock:
            try:
                with tifffile.TiffFile(self.path) as tf:
                    arr = np.asarray(tf.pages[ifd].asarray())
            except Exception as exc:
                raise CorruptSlide(f"{self.path}: cannot decode associated image {name!r}: {exc}") from exc
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return np.ascontiguousarray(arr[:, :, :3].astype(np.uint8, copy=False))

    def close(self) -> None:
        """Release the file handle; later tile reads raise ``CorruptTile``."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
