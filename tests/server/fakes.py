"""A fake compressed slide: a synthetic pyramid with stored tiles, glass, and a decoder that can refuse."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from tileserver.errors import CorruptTile
from tileserver.slides.base import SlideReader

TILE = 256
GLASS = (240, 242, 245)


class DecoderCalled(AssertionError):
    """Raised by the refusing decoder: the code under test decoded when it must not."""


class FakeStoredSlide(SlideReader):
    """``width x height`` pixels of deterministic texture, tiles of 256, levels down to one tile.

    ``glass`` is a level-0 tile mask (True = dropped glass); coarser levels are glass
    where every level-0 tile they cover is, like the real container.  Tiles in
    ``corrupt`` (level, col, row) raise ``CorruptTile``.  With ``refuse_decode`` any
    read of pixel data raises ``DecoderCalled``.
    """

    def __init__(
        self,
        path: str | Path,
        width: int = 1000,
        height: int = 700,
        glass: npt.NDArray[np.bool_] | None = None,
        corrupt: frozenset[tuple[int, int, int]] = frozenset(),
        refuse_decode: bool = False,
    ) -> None:
        super().__init__(path)
        self.refuse_decode = refuse_decode
        self.corrupt = corrupt
        self.decodes = 0
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], axis=-1).astype(np.uint8)
        cols0, rows0 = math.ceil(width / TILE), math.ceil(height / TILE)
        self._glass0 = np.zeros((rows0, cols0), bool) if glass is None else glass
        for r, c in zip(*np.nonzero(self._glass0), strict=True):
            base[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = GLASS
        self._levels = [base]
        self._glass = [self._glass0]
        while self._levels[-1].shape[0] > TILE or self._levels[-1].shape[1] > TILE:
            prev = self._levels[-1]
            h, w = math.ceil(prev.shape[0] / 2), math.ceil(prev.shape[1] / 2)
            img = Image.fromarray(prev).resize((w, h), Image.Resampling.BOX)
            self._levels.append(np.asarray(img))
            k = len(self._levels) - 1
            rows, cols = math.ceil(h / TILE), math.ceil(w / TILE)
            g = np.zeros((rows, cols), bool)
            f = 2**k
            for r in range(rows):
                for c in range(cols):
                    g[r, c] = bool(self._glass0[r * f : (r + 1) * f, c * f : (c + 1) * f].all())
            self._glass.append(g)
        self.closed = False

    # OpenSlide API
    @classmethod
    def detect_format(cls, filename: object) -> str | None:
        return "fake"

    @property
    def format(self) -> str:
        return "fake"

    @property
    def codec(self) -> str | None:
        return "fakecodec"

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((a.shape[1], a.shape[0]) for a in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(2**k) for k in range(len(self._levels)))

    @property
    def properties(self) -> Mapping[str, str]:
        return {"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5", "tileserver.source-bytes": "123456789"}

    @property
    def associated_images(self) -> Mapping[str, Image.Image]:
        return {}

    def get_best_level_for_downsample(self, downsample: float) -> int:
        best = 0
        for k, d in enumerate(self.level_downsamples):
            if d <= downsample:
                best = k
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        if self.refuse_decode:
            raise DecoderCalled(f"read_region{location, level, size}")
        self.decodes += 1
        arr = self._levels[level]
        d = 2**level
        x, y = location[0] // d, location[1] // d
        out = np.zeros((size[1], size[0], 4), np.uint8)
        part = arr[y : y + size[1], x : x + size[0]]
        out[: part.shape[0], : part.shape[1], :3] = part
        out[: part.shape[0], : part.shape[1], 3] = 255
        return Image.fromarray(out, "RGBA")

    def close(self) -> None:
        self.closed = True

    # StoredTiles
    tile_size = TILE
    glass_color = GLASS

    def stored_tiles(self) -> FakeStoredSlide:
        return self

    def grid(self, level: int) -> tuple[int, int]:
        g = self._glass[level]
        return g.shape[1], g.shape[0]

    def is_glass(self, level: int, col: int, row: int) -> bool:
        return bool(self._glass[level][row, col])

    def read_tile(self, level: int, col: int, row: int) -> npt.NDArray[np.uint8]:
        if self.refuse_decode:
            raise DecoderCalled(f"read_tile{level, col, row}")
        if (level, col, row) in self.corrupt:
            raise CorruptTile(f"tile {level, col, row} is corrupt")
        self.decodes += 1
        a = self._levels[level]
        return np.ascontiguousarray(a[row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE])
