"""Write a compressed slide: encoded tiles in, one finished BigTIFF out (layout in ``format``).

Tiles of all levels arrive in any order while the converter streams through the
source, but TIFF stores each level's tiles together, so ``ContainerWriter``
first appends every tile's bytes to a spool file beside the destination and
keeps only their offsets in memory; ``finish`` then writes the TIFF from the
spool with tifffile.  Both files carry a clearly temporary name
(``.<dst name>.partial-<pid>``) and the TIFF is renamed onto ``dst`` only once
complete, so a crash never leaves a file that looks like a finished slide.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile

from ..codecs.base import TileCodec
from ..errors import ConversionError
from .format import (
    ASSOCIATED_JPEG_QUALITY,
    FORMAT_NAME,
    FORMAT_VERSION,
    GLASS_STRATEGIES,
    TAG_PAGE_NAME,
    TILE_SIZE,
    LevelGeometry,
    level_geometry,
)

__all__ = ["ContainerWriter", "clean_stale_partials", "partial_path"]

_TIFF_JPEG = 7
#: adobe deflate: always available to tifffile, never one of our codecs' codes
_STAND_IN_COMPRESSION = 8


def _tifffile_knows(code: int) -> bool:
    if code in (65000, 65001, 65002):  # EER in tifffile
        return False
    try:
        tifffile.TIFF.COMPRESSORS[code]
    except (KeyError, NotImplementedError):
        return False
    return True


def partial_path(dst: Path, pid: int | None = None) -> Path:
    """The temporary name a write to ``dst`` uses before it is renamed into place."""
    return dst.with_name(f".{dst.name}.partial-{os.getpid() if pid is None else pid}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(dst: Path) -> list[Path]:
    """Remove temporary files of earlier writes to ``dst`` whose process is gone; returns them."""
    pattern = re.compile(re.escape(f".{dst.name}.partial-") + r"(\d+)(\.spool)?$")
    removed: list[Path] = []
    try:
        candidates = list(dst.parent.iterdir())
    except OSError:
        return removed
    for p in candidates:
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _software() -> str:
    from .. import __version__

    return f"tileserver {__version__}"


class ContainerWriter:
    """Collects encoded tiles for every level, then writes the container atomically.

    Use as a context manager: leaving the block with an exception (including
    ``KeyboardInterrupt``/``SystemExit``) removes the temporary files; call
    ``finish`` inside the block to publish the file.
    """

    def __init__(
        self,
        dst: str | Path,
        *,
        width: int,
        height: int,
        codec: TileCodec,
        glass: str,
        glass_color: tuple[int, int, int],
        glass_kind: str = "brightfield",
        mpp: tuple[float, float] | None = None,
        overwrite: bool = False,
        tile_size: int = TILE_SIZE,
    ) -> None:
        if glass not in GLASS_STRATEGIES:
            raise ValueError(f"glass must be one of {', '.join(GLASS_STRATEGIES)}, got {glass!r}")
        self.dst = Path(dst)
        self.codec = codec
        self.glass = glass
        self.glass_color = tuple(int(c) for c in glass_color)
        self.glass_kind = glass_kind
        self.mpp = mpp
        self.overwrite = overwrite
        self.tile_size = tile_size
        self.width, self.height = int(width), int(height)
        self.levels: list[LevelGeometry] = level_geometry(self.width, self.height, tile_size)
        self.temp_path = partial_path(self.dst)
        self.spool_path = self.temp_path.with_name(self.temp_path.name + ".spool")
        clean_stale_partials(self.dst)
        # (offset, length) of every tile in the spool; length -1 = not yet written
        self._offsets = [np.zeros(g.tiles, np.int64) for g in self.levels]
        self._lengths = [np.full(g.tiles, -1, np.int64) for g in self.levels]
        self._spool_fd: int | None = os.open(self.spool_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._spool_end = 0
        self._done = False

    # -- tiles -------------------------------------------------------------------------------
    def add_tile(self, level: int, col: int, row: int, data: bytes) -> None:
        """Store one tile's encoded bytes; ``b""`` is a dropped glass tile."""
        g = self.levels[level]
        if not (0 <= col < g.cols and 0 <= row < g.rows):
            raise ValueError(f"tile ({level}, {col}, {row}) outside the {g.cols}x{g.rows} grid")
        if self._spool_fd is None:
            raise ConversionError(f"{self.dst}: writer already closed")
        i = row * g.cols + col
        if data:
            os.pwrite(self._spool_fd, data, self._spool_end)
            self._offsets[level][i] = self._spool_end
            self._spool_end += len(data)
        self._lengths[level][i] = len(data)

    def zero_byte_tiles(self, level: int) -> int:
        """Number of zero-byte (dropped glass) entries written so far at ``level``."""
        return int((self._lengths[level] == 0).sum())

    def level_bytes(self, level: int) -> int:
        """Bytes of tile data written so far at ``level``."""
        return int(self._lengths[level].clip(min=0).sum())

    def _level_tiles(self, level: int) -> Iterator[bytes]:
        fd = self._spool_fd
        if fd is None:
            raise ConversionError(f"{self.dst}: writer already closed")
        for off, n in zip(self._offsets[level].tolist(), self._lengths[level].tolist(), strict=True):
            yield os.pread(fd, n, off) if n > 0 else b""

    # -- finishing ---------------------------------------------------------------------------
    def finish(
        self,
        *,
        associated: Mapping[str, npt.NDArray[np.uint8]] | None = None,
        source: Mapping[str, Any] | None = None,
        tissue_fraction: float | None = None,
        model_info: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the TIFF from the spool and rename it onto ``dst``; returns ``dst``."""
        if self._spool_fd is None or self._done:
            raise ConversionError(f"{self.dst}: writer already closed")
        for level, lengths in enumerate(self._lengths):
            missing = int((lengths < 0).sum())
            if missing:
                raise ConversionError(f"{self.dst}: {missing} tiles of level {level} were never written")
        assoc = {name: np.ascontiguousarray(img[:, :, :3]) for name, img in (associated or {}).items()}
        meta = self._metadata(assoc, source or {}, tissue_fraction, model_info)
        description = json.dumps(meta, sort_keys=False)
        self._write_tiff(description, assoc)
        if self.dst.exists() and not self.overwrite:
            raise ConversionError(f"{self.dst}: already exists (use --force to overwrite)")
        os.replace(self.temp_path, self.dst)
        self._done = True
        self._close_spool()
        return self.dst

    def _metadata(
        self,
        assoc: Mapping[str, npt.NDArray[np.uint8]],
        source: Mapping[str, Any],
        tissue_fraction: float | None,
        model_info: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        n_levels = len(self.levels)
        # "format" must stay the first key: it is the cheap marker (format.MAGIC)
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "software": _software(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "width": self.width,
            "height": self.height,
            "tile_size": self.tile_size,
            "mpp": list(self.mpp) if self.mpp else None,
            "codec": {
                "name": self.codec.name,
                "params": dict(self.codec.params),
                "tiff_compression": int(self.codec.tiff_compression),
                "model_info": dict(model_info) if model_info else None,
            },
            "glass": {"strategy": self.glass, "color": list(self.glass_color), "kind": self.glass_kind},
            "tissue_fraction": tissue_fraction,
            "levels": [
                {
                    "ifd": i,
                    "width": g.width,
                    "height": g.height,
                    "downsample": g.downsample,
                    "tiles": g.tiles,
                    "glass_tiles": int((self._lengths[i] == 0).sum()),
                }
                for i, g in enumerate(self.levels)
            ],
            "associated": {
                name: {"ifd": n_levels + j, "width": int(img.shape[1]), "height": int(img.shape[0])}
                for j, (name, img) in enumerate(assoc.items())
            },
            "source": dict(source),
        }

    def _tile_tags(self) -> dict[str, Any]:
        if self.codec.tiff_compression == _TIFF_JPEG:
            # Our JPEG streams are YCbCr; saying so makes OpenSlide/libtiff convert colours as we do.
            sub = (1, 1) if str(self.codec.params.get("subsampling", "420")) == "444" else (2, 2)
            return {"photometric": "ycbcr", "subsampling": sub}
        return {"photometric": "rgb"}

    def _write_tiff(self, description: str, assoc: Mapping[str, npt.NDArray[np.uint8]]) -> None:
        ts = self.tile_size
        tile_tags = self._tile_tags()
        code = int(self.codec.tiff_compression)
        # tifffile insists on knowing a compressor even for pre-encoded tiles, and reads
        # 65000-65002 as EER; write private codes under a stand-in and patch the tag after.
        write_code = code if _tifffile_knows(code) else _STAND_IN_COMPRESSION
        with tifffile.TiffWriter(self.temp_path, bigtiff=True, byteorder="<") as tw:
            for i, g in enumerate(self.levels):
                extra: dict[str, Any] = {}
                if i == 0:
                    extra.update(description=description, software=_software())
                else:
                    extra.update(subfiletype=1, software=False)
                if self.mpp:
                    mx, my = self.mpp
                    extra.update(
                        resolution=(1e4 / (mx * g.downsample), 1e4 / (my * g.downsample)),
                        resolutionunit="CENTIMETER",
                    )
                tw.write(
                    self._level_tiles(i),
                    shape=(g.height, g.width, 3),
                    dtype=np.uint8,
                    tile=(ts, ts),
                    compression=write_code,
                    metadata=None,
                    **tile_tags,
                    **extra,
                )
            for name, img in assoc.items():
                tw.write(
                    img,
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": ASSOCIATED_JPEG_QUALITY},
                    rowsperstrip=img.shape[0],
                    metadata=None,
                    software=False,
                    extratags=[(TAG_PAGE_NAME, "s", 0, name, True)],
                )
        if write_code != code:
            self._patch_compression(code)
        with open(self.temp_path, "rb+") as fh:
            os.fsync(fh.fileno())

    def _patch_compression(self, code: int) -> None:
        with tifffile.TiffFile(self.temp_path) as tf:
            where = [tf.pages[i].tags[259].valueoffset for i in range(len(self.levels))]  # type: ignore[union-attr]
        with open(self.temp_path, "rb+") as fh:
            for offset in where:
                fh.seek(offset)
                fh.write(struct.pack("<H", code))

    # -- cleanup -----------------------------------------------------------------------------
    def _close_spool(self) -> None:
        if self._spool_fd is not None:
            os.close(self._spool_fd)
            self._spool_fd = None
        with contextlib.suppress(OSError):
            self.spool_path.unlink()

    def abort(self) -> None:
        """Discard everything written so far (temporary files removed; ``dst`` untouched)."""
        self._close_spool()
        if not self._done:
            with contextlib.suppress(OSError):
                self.temp_path.unlink()

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()
