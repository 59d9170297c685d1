"""Read a compressed slide's index, raw tile bytes and associated images (layout in ``format``).

``ContainerReader`` knows nothing about codecs: it validates the file's
structure once at open (every tile's offset and byte count must lie inside the
file, so a damaged file fails with ``CorruptSlide`` instead of a huge read) and
then serves raw tile bytes with ``os.pread``, which is safe from many threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile

from ..errors import BadTileAddress, CorruptSlide, CorruptTile, UnsupportedFormat
from .format import (
    MAGIC,
    MAX_ASSOCIATED_SIDE,
    LevelGeometry,
    is_int,
    level_geometry,
    parse_metadata,
    read_first_description,
)

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
        # parse_metadata checked the top-level types (width, height, tile_size in range, ...);
        # the nested objects are checked here, key by key, before anything uses them.
        self.width, self.height = int(meta["width"]), int(meta["height"])
        self.tile_size = int(meta["tile_size"])
        codec, glass = meta["codec"], meta["glass"]
        self.codec_name: str = self._field(codec, "name", "codec.name", str, "a string")
        params = codec.get("params")
        self._require(params is None or isinstance(params, dict), "codec.params", "an object or null", params)
        self.codec_params: dict[str, Any] = dict(params or {})
        self.tiff_compression = self._field(codec, "tiff_compression", "codec.tiff_compression", is_int, "an integer")
        model_info = codec.get("model_info")
        self._require(
            model_info is None or isinstance(model_info, dict), "codec.model_info", "an object or null", model_info
        )
        self.model_info: dict[str, Any] | None = model_info
        self.glass_strategy: str = self._field(glass, "strategy", "glass.strategy", str, "a string")
        color = glass.get("color")
        self._require(
            isinstance(color, list) and len(color) == 3 and all(is_int(c) and 0 <= c <= 255 for c in color),
            "glass.color",
            "three integers in 0..255",
            color,
        )
        r, g, b = color
        self.glass_color: tuple[int, int, int] = (r, g, b)
        try:
            self.levels: list[LevelGeometry] = level_geometry(self.width, self.height, self.tile_size)
        except ValueError as exc:
            raise CorruptSlide(f"{self.path}: damaged tileserver metadata: {exc}") from exc
        level_ifds = [self._ifd(lv, f"levels[{i}]") for i, lv in enumerate(meta["levels"])]
        self.associated_ifds: dict[str, int] = {}
        #: (height, width) of each associated image as the metadata records it
        self.associated_sizes: dict[str, tuple[int, int]] = {}
        for name, entry in (meta.get("associated") or {}).items():
            key = f"associated.{name}"
            self.associated_ifds[name] = self._ifd(entry, key)
            w = self._field(entry, "width", key + ".width", is_int, "an integer")
            h = self._field(entry, "height", key + ".height", is_int, "an integer")
            self._require(w >= 1 and h >= 1, key, "a positive size", (w, h))
            self.associated_sizes[name] = (h, w)
        if len(level_ifds) != len(self.levels):
            raise CorruptSlide(
                f"{self.path}: metadata lists {len(level_ifds)} levels, geometry needs {len(self.levels)}"
            )
        self.file_size = self.path.stat().st_size
        self._offsets: list[npt.NDArray[np.int64]] = []
        self._counts: list[npt.NDArray[np.int64]] = []
        self._parse(level_ifds)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        self._assoc_lock = threading.Lock()

    def _require(self, ok: bool, key: str, want: str, value: object) -> None:
        if not ok:
            raise CorruptSlide(f"{self.path}: damaged tileserver metadata: {key!r} must be {want}, got {value!r:.80}")

    def _field(self, obj: dict[str, Any], name: str, key: str, check: Any, want: str) -> Any:
        """``obj[name]`` after ``check`` (a type or a predicate) accepts it, else ``CorruptSlide``."""
        value = obj.get(name)
        ok = isinstance(value, check) if isinstance(check, type) else bool(check(value))
        self._require(ok, key, want, value)
        return value

    def _ifd(self, entry: object, key: str) -> int:
        ifd = entry.get("ifd") if isinstance(entry, dict) else None
        if not (is_int(ifd) and ifd >= 0):
            what = "an object with a non-negative integer 'ifd'"
            raise CorruptSlide(f"{self.path}: damaged tileserver metadata: {key!r} must be {what}, got {entry!r:.80}")
        return ifd

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

    @contextlib.contextmanager
    def _tiff(self) -> Iterator[tifffile.TiffFile]:
        """tifffile over the descriptor opened with the slide, not the path: a file replaced
        on disk since must not lend its IFDs to this reader."""
        fd = self._fd
        if fd is None:
            raise CorruptSlide(f"{self.path}: slide is closed")
        with os.fdopen(os.dup(fd), "rb") as fh:
            fh.seek(0)  # a dup shares the offset; tile reads use pread and never move it
            with tifffile.TiffFile(fh, name=self.path.name) as tf:
                yield tf

    def associated_image(self, name: str) -> npt.NDArray[np.uint8]:
        """Decode one associated image (``H x W x 3`` uint8).

        Raises ``CorruptSlide`` when its IFD disagrees with the metadata's size (checked
        before decoding, so a damaged size tag cannot cause a huge allocation) or the
        decode is not an image of that size.
        """
        ifd = self.associated_ifds[name]
        expected = self.associated_sizes[name]
        if max(expected) > MAX_ASSOCIATED_SIDE:
            raise CorruptSlide(
                f"{self.path}: associated image {name!r} is {expected[1]}x{expected[0]},"
                f" more than {MAX_ASSOCIATED_SIDE} pixels a side"
            )
        with self._assoc_lock:
            try:
                with self._tiff() as tf:
                    page = tf.pages[ifd]
                    if not isinstance(page, tifffile.TiffPage):
                        raise CorruptSlide(f"{self.path}: associated image {name!r} IFD {ifd} is not a page")
                    if (
                        (page.imagelength, page.imagewidth) != expected
                        or page.imagedepth != 1
                        or page.samplesperpixel not in (1, 3, 4)
                        or page.bitspersample != 8
                    ):
                        raise CorruptSlide(
                            f"{self.path}: associated image {name!r} IFD is {page.imagewidth}x{page.imagelength}"
                            f" ({page.samplesperpixel} samples of {page.bitspersample} bits),"
                            f" metadata says {expected[1]}x{expected[0]} RGB"
                        )
                    arr = np.asarray(page.asarray())
            except CorruptSlide:
                raise
            except Exception as exc:
                raise CorruptSlide(f"{self.path}: cannot decode associated image {name!r}: {exc}") from exc
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[:2] != expected or arr.shape[2] < 3 or arr.dtype != np.uint8:
            raise CorruptSlide(f"{self.path}: associated image {name!r} decoded to {arr.dtype} {arr.shape}")
        return np.ascontiguousarray(arr[:, :, :3])

    def close(self) -> None:
        """Release the file handle; later tile reads raise ``CorruptTile``."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
