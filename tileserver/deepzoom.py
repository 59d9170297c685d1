"""Deep Zoom geometry over any ``SlideReader``, plus our fast paths.

The geometry is OpenSlide's ``DeepZoomGenerator`` itself (it works over any
``openslide.AbstractSlide``, which our readers are), so level count, tile grid,
tile sizes and pixels are OpenSlide's by construction.  ``DeepZoom`` adds a
*plan* for each tile saying the cheapest way to produce it:

* ``GlassTile``  – the tile lies wholly in dropped glass: a blank tile of the
  exact size in the stored glass colour; nothing is read or decoded.
* ``StoredTile`` – the Deep Zoom grid lines up with the slide's stored tiles
  (same tile size, overlap 0, same downsample and level size, no bounds
  offset): the tile is exactly one stored tile, no region stitching.
* ``RegionTile`` – anything else: ``DeepZoomGenerator.get_tile`` (read_region,
  composite on the background colour, scale).

Coordinate spaces, named as in ``openslide.deepzoom`` and used as prefixes:

* ``t_``  – column and row of a tile within a Deep Zoom level
* ``z_``  – pixels within a Deep Zoom level
* ``l_``  – pixels within a slide level
* ``l0_`` – pixels within slide level 0
* ``s_``  – column and row of a stored tile within a slide level
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from io import BytesIO
from xml.etree.ElementTree import Element, ElementTree, SubElement

import numpy as np
import numpy.typing as npt
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from .errors import BadTileAddress
from .slides.base import SlideReader, StoredTiles

__all__ = ["DZI_NAMESPACE", "DeepZoom", "GlassTile", "RegionTile", "StoredTile", "TilePlan"]

DZI_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"

#: a region covering more stored tiles than this is not checked for glass (reading it is cheaper)
_MAX_GLASS_CHECK = 64


@dataclass(frozen=True)
class GlassTile:
    """Answer with a blank ``z_size`` tile of ``color``."""

    z_size: tuple[int, int]
    color: tuple[int, int, int]


@dataclass(frozen=True)
class StoredTile:
    """Answer with stored tile ``(s_col, s_row)`` of slide level ``level``, which is exactly ``z_size``."""

    level: int
    s_col: int
    s_row: int
    z_size: tuple[int, int]


@dataclass(frozen=True)
class RegionTile:
    """Answer with ``DeepZoomGenerator.get_tile`` (``read_region(l0_location, level, l_size)`` scaled to ``z_size``)."""

    l0_location: tuple[int, int]
    level: int
    l_size: tuple[int, int]
    z_size: tuple[int, int]


TilePlan = GlassTile | StoredTile | RegionTile


class DeepZoom(DeepZoomGenerator):
    """``DeepZoomGenerator`` with tile plans, address validation and DisplayRects."""

    def __init__(self, slide: SlideReader, tile_size: int = 254, overlap: int = 1, limit_bounds: bool = False) -> None:
        super().__init__(slide, tile_size, overlap, limit_bounds)
        self.slide = slide
        self.tile_size = tile_size
        self.overlap = overlap
        self.limit_bounds = limit_bounds
        self.stored: StoredTiles | None = slide.stored_tiles()
        self._dzi_cache: dict[tuple[str, bool], str] = {}
        # Deep Zoom level -> slide level whose stored tiles are exactly this level's tiles
        self._direct: dict[int, int] = {}
        if self.stored is not None:
            self._direct = self._aligned_levels(self.stored)

    def _aligned_levels(self, stored: StoredTiles) -> dict[int, int]:
        slide = self.slide
        if (
            self.tile_size != stored.tile_size
            or self.overlap != 0
            or self._l0_offset != (0, 0)
            or tuple(self._l_dimensions) != tuple(slide.level_dimensions)
        ):
            return {}
        direct: dict[int, int] = {}
        for dz_level in range(self.level_count):
            level = self._slide_from_dz_level[dz_level]
            if (
                self._l_z_downsamples[dz_level] == 1.0
                and self.level_dimensions[dz_level] == slide.level_dimensions[level]
                and self.level_tiles[dz_level] == stored.grid(level)
            ):
                direct[dz_level] = level
        return direct

    @property
    def direct_levels(self) -> dict[int, int]:
        """Deep Zoom levels answered 1:1 from stored tiles (Deep Zoom level -> slide level)."""
        return dict(self._direct)

    def check_address(self, dz_level: int, t_col: int, t_row: int) -> None:
        """``BadTileAddress`` unless the tile exists."""
        if not 0 <= dz_level < self.level_count:
            raise BadTileAddress(f"level {dz_level} out of range 0..{self.level_count - 1}")
        t_cols, t_rows = self.level_tiles[dz_level]
        if not (0 <= t_col < t_cols and 0 <= t_row < t_rows):
            raise BadTileAddress(f"tile {t_col}_{t_row} outside level {dz_level}'s {t_cols}x{t_rows} grid")

    def plan(self, dz_level: int, t_col: int, t_row: int) -> TilePlan:
        """How to produce tile ``(t_col, t_row)`` of Deep Zoom level ``dz_level`` (see the module docstring)."""
        self.check_address(dz_level, t_col, t_row)
        (l0_location, level, l_size), z_size = self._get_tile_info(dz_level, (t_col, t_row))
        stored = self.stored
        if stored is not None:
            if dz_level in self._direct:
                if stored.is_glass(level, t_col, t_row):
                    return GlassTile(z_size, stored.glass_color)
                return StoredTile(level, t_col, t_row, z_size)
            if self._region_is_glass(stored, l0_location, level, l_size):
                return GlassTile(z_size, stored.glass_color)
        return RegionTile(l0_location, level, l_size, z_size)

    def _region_is_glass(
        self, stored: StoredTiles, l0_location: tuple[int, int], level: int, l_size: tuple[int, int]
    ) -> bool:
        downsample = self.slide.level_downsamples[level]
        s_cols, s_rows = stored.grid(level)
        ts = stored.tile_size
        # stored tiles touched by the region, rounded outwards (more tiles = never a false "glass")
        l_x, l_y = l0_location[0] / downsample, l0_location[1] / downsample
        s_c0, s_r0 = max(0, math.floor(l_x / ts)), max(0, math.floor(l_y / ts))
        s_c1 = min(s_cols - 1, math.ceil((l_x + l_size[0]) / ts) - 1)
        s_r1 = min(s_rows - 1, math.ceil((l_y + l_size[1]) / ts) - 1)
        if s_c1 < s_c0 or s_r1 < s_r0 or (s_c1 - s_c0 + 1) * (s_r1 - s_r0 + 1) > _MAX_GLASS_CHECK:
            return False
        return all(stored.is_glass(level, c, r) for r in range(s_r0, s_r1 + 1) for c in range(s_c0, s_c1 + 1))

    def tile_image(self, dz_level: int, t_col: int, t_row: int) -> Image.Image:
        """The tile as an RGB image, whatever its plan (the reference path, used by tests and tools)."""
        return self.render(self.plan(dz_level, t_col, t_row), dz_level, t_col, t_row)

    def render(self, plan: TilePlan, dz_level: int, t_col: int, t_row: int) -> Image.Image:
        """Carry out ``plan`` (made by ``plan(dz_level, t_col, t_row)``) as an RGB image."""
        if isinstance(plan, GlassTile):
            return Image.new("RGB", plan.z_size, plan.color)
        if isinstance(plan, StoredTile):
            assert self.stored is not None  # a StoredTile plan exists only with stored tiles
            return Image.fromarray(self.stored.read_tile(plan.level, plan.s_col, plan.s_row), "RGB")
        return self.get_tile(dz_level, (t_col, t_row))

    def tissue_mask(self) -> npt.NDArray[np.bool_] | None:
        """Level-0 stored-tile grid, True where a tile holds tissue (not dropped glass); None without stored tiles."""
        stored = self.stored
        if stored is None:
            return None
        s_cols, s_rows = stored.grid(0)
        mask = np.ones((s_rows, s_cols), dtype=bool)
        for r in range(s_rows):
            for c in range(s_cols):
                mask[r, c] = not stored.is_glass(0, c, r)
        return mask

    def display_rects(self, max_rects: int = 256) -> list[tuple[int, int, int, int]] | None:
        """Rectangles ``(x, y, w, h)`` in Deep Zoom full-resolution pixels covering all tissue.

        None when not known (no stored tiles, bounds offset, or no glass at all).
        The mask is coarsened (a cell is tissue if any tile in it is) until at most
        ``max_rects`` rectangles remain, so viewers test few rectangles per tile.
        """
        mask = self.tissue_mask()
        if mask is None or mask.all() or self._l0_offset != (0, 0) or self.stored is None:
            return None
        z_w, z_h = self.level_dimensions[-1]
        cell = self.stored.tile_size
        while True:
            rects = _mask_rects(mask)
            if len(rects) <= max_rects or mask.size <= 1:
                break
            mask = _pool_any(mask)
            cell *= 2
        out = []
        for c0, r0, c1, r1 in rects:
            x, y = c0 * cell, r0 * cell
            out.append((x, y, min(c1 * cell, z_w) - x, min(r1 * cell, z_h) - y))
        return out

    def dzi(self, fmt: str, *, display_rects: bool = True) -> str:
        """The ``.dzi`` XML, with ``DisplayRects`` for tissue when known and ``display_rects``.

        Built once per format and kept: ``DisplayRects`` walks the whole level-0 tile index,
        and this object lives as long as the open slide it describes.
        """
        key = (fmt, display_rects)
        xml = self._dzi_cache.get(key)
        if xml is None:
            xml = self._dzi_cache.setdefault(key, self._build_dzi(fmt, display_rects))
        return xml

    def _build_dzi(self, fmt: str, display_rects: bool) -> str:
        image = Element(
            "Image", TileSize=str(self.tile_size), Overlap=str(self.overlap), Format=fmt, xmlns=DZI_NAMESPACE
        )
        z_w, z_h = self.level_dimensions[-1]
        SubElement(image, "Size", Width=str(z_w), Height=str(z_h))
        rects = self.display_rects() if display_rects else None
        if rects:
            holder = SubElement(image, "DisplayRects")
            for x, y, w, h in rects:
                dr = SubElement(holder, "DisplayRect", MinLevel="0", MaxLevel=str(self.level_count - 1))
                SubElement(dr, "Rect", X=str(x), Y=str(y), Width=str(w), Height=str(h))
        buf = BytesIO()
        ElementTree(image).write(buf, encoding="UTF-8", xml_declaration=True)
        return buf.getvalue().decode("UTF-8")


def _pool_any(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """2x2 OR-pooling (odd edges padded with False)."""
    rows, cols = mask.shape
    padded = np.zeros((rows + rows % 2, cols + cols % 2), dtype=bool)
    padded[:rows, :cols] = mask
    pooled: npt.NDArray[np.bool_] = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).any(axis=(1, 3))
    return pooled


def _mask_rects(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int, int, int]]:
    """Cover the True cells with rectangles ``(c0, r0, c1, r1)`` (exclusive ends).

    Horizontal runs per row, merged downwards with identical runs of the rows below.
    """
    open_runs: dict[tuple[int, int], int] = {}  # (c0, c1) -> first row
    rects: list[tuple[int, int, int, int]] = []
    rows = mask.shape[0]
    for r in range(rows + 1):
        runs: set[tuple[int, int]] = set()
        if r < rows:
            row = mask[r]
            c = 0
            while c < row.size:
                if row[c]:
                    c0 = c
                    while c < row.size and row[c]:
                        c += 1
                    runs.add((c0, c))
                else:
                    c += 1
        for run in list(open_runs):
            if run not in runs:
                rects.append((run[0], open_runs.pop(run), run[1], r))
        for run in runs:
            open_runs.setdefault(run, r)
    return sorted(rects, key=lambda t: (t[1], t[0]))
