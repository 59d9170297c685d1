"""``SlideReader``: OpenSlide's slide API, shared by every slide implementation.

``SlideReader`` subclasses ``openslide.AbstractSlide`` so that
``openslide.deepzoom.DeepZoomGenerator`` (and any other code written against
OpenSlide) accepts our readers unchanged.  Implementations:

* ``tileserver.slides.openslide_reader.OpenSlideReader`` – anything OpenSlide opens.
* ``tileserver.slides.compressed.CompressedSlide`` – our compressed container.

On top of OpenSlide's API a reader may expose its stored tile grid through
``stored_tiles()``; the tile service uses it for the 1:1 and glass fast paths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import openslide

__all__ = ["Decoder", "SlideReader", "StoredTiles"]

#: bytes of one stored tile -> its pixels (``H x W x 3`` uint8); how a reader's decodes can be rerouted
Decoder = Callable[[bytes], npt.NDArray[np.uint8]]


@runtime_checkable
class StoredTiles(Protocol):
    """Direct access to a reader's stored tiles (level, col, row in stored-level space)."""

    #: edge length of stored tiles, in level pixels
    tile_size: int
    #: RGB colour that dropped glass tiles read as
    glass_color: tuple[int, int, int]

    def grid(self, level: int) -> tuple[int, int]:
        """(columns, rows) of stored tiles at ``level``."""
        ...

    def is_glass(self, level: int, col: int, row: int) -> bool:
        """True when the tile is a zero-byte (dropped glass) entry; reads no tile data."""
        ...

    def read_tile(self, level: int, col: int, row: int) -> npt.NDArray[np.uint8]:
        """Decode one stored tile, cropped to the level's edge (``H x W x 3`` uint8).

        Raises ``CorruptTile`` when the stored bytes do not decode.
        """
        ...


class SlideReader(openslide.AbstractSlide):
    """A whole-slide image with OpenSlide's API plus a few facts we report."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    @property
    def format(self) -> str:
        """Short name of the file format (``"aperio"``, ``"tileserver"``, ...)."""
        return "unknown"

    @property
    def codec(self) -> str | None:
        """Codec of our compressed files (``"jpeg"``, ``"neural"``, ...); None for source slides."""
        return None

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Microns per pixel at level 0 (x, y), when the slide says."""
        props = self.properties
        try:
            return (float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y]))
        except (KeyError, ValueError):
            return None

    def stored_tiles(self) -> StoredTiles | None:
        """Stored tile access for the tile service's fast paths, when the format has it."""
        return None

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary (used by ``tileserver info`` and ``/slides.json``)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "codec": self.codec,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "mpp": list(self.mpp) if self.mpp else None,
            "associated_images": sorted(self.associated_images),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"
