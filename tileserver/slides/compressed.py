"""``CompressedSlide``: a ``SlideReader`` over tileserver's compressed container.

Coordinate spaces (as in openslide's ``deepzoom.py``): ``l0_`` level-0 pixels,
``l_`` pixels in a stored level, ``t_`` a stored tile's column / row.  Level ``k``
is exactly ``2**k`` times smaller than level 0 (sizes rounded up), so
``l_x = l0_x // 2**k``.

Tiles are decoded by the codec named in the file (rebuilt with
``tileserver.codecs.get(name, **params)``), or by a function set with
``set_decoder`` (the server routes decodes through its ``DecodeBatcher``).
Dropped glass tiles are answered from the sparse index, never decoded.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import openslide
from PIL import Image

from ..codecs.base import TileCodec
from ..container.format import FORMAT_NAME, FORMAT_VERSION, LevelGeometry
from ..container.reader import ContainerReader, is_container
from ..errors import BadTileAddress, CorruptTile, MissingModel, UnsupportedFormat
from .base import Decoder, SlideReader, StoredTiles

__all__ = ["CompressedSlide", "is_compressed_slide"]

#: decoded tiles kept for read_region (Deep Zoom tiles straddle up to four stored tiles)
_REGION_CACHE_TILES = 64

# Source properties that describe the source file's own layout, which ours replaces.
_DROPPED_SOURCE_KEYS = ("openslide.level", "openslide.associated.", "openslide.icc-size", "openslide.quickhash")


def is_compressed_slide(path: str | Path) -> bool:
    """True when ``path`` is a tileserver compressed slide.

    Cheap: reads the TIFF header and the first IFD's description only.  False for
    non-TIFF, unreadable or missing files.
    """
    try:
        return Path(path).is_file() and is_container(path)
    except OSError:
        return False


class _TileLRU:
    """A tiny locked LRU of decoded tiles (decode happens outside the lock)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._data: OrderedDict[tuple[int, int, int], npt.NDArray[np.uint8]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int, int]) -> npt.NDArray[np.uint8] | None:
        with self._lock:
            tile = self._data.get(key)
            if tile is not None:
                self._data.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int, int], tile: npt.NDArray[np.uint8]) -> None:
        with self._lock:
            self._data[key] = tile
            self._data.move_to_end(key)
            while len(self._data) > self._capacity:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class CompressedSlide(SlideReader):
    """One tileserver compressed slide, with OpenSlide's API and ``StoredTiles`` access.

    Raises ``UnsupportedFormat`` (not our file, unknown codec, newer format),
    ``CorruptSlide`` (damaged structure) or ``MissingModel`` (neural weights absent).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._container = ContainerReader(self.path)
        c = self._container
        try:
            if c.codec_name == "neural":
                _check_neural_model(c.model_info, self.path)
            params = dict(c.codec_params)
            if c.codec_name == "neural" and c.model_info:
                # The model that coded the slide, which may since have been retired.
                params["model"] = c.model_info.get("weights_sha256")
            self._codec: TileCodec = _build_codec(c.codec_name, params, self.path)
        except BaseException:
            c.close()
            raise
        self._decoder: Decoder = self._codec.decode
        #: edge length of stored tiles (StoredTiles)
        self.tile_size: int = c.tile_size
        #: RGB colour that glass reads as (StoredTiles)
        self.glass_color: tuple[int, int, int] = c.glass_color
        self._region_cache = _TileLRU(_REGION_CACHE_TILES)
        self._properties = MappingProxyType(self._build_properties())
        self._associated: dict[str, Image.Image] | None = None

    # -- OpenSlide API -----------------------------------------------------------------------
    @classmethod
    def detect_format(cls, filename: openslide.lowlevel.Filename) -> str | None:
        """``"tileserver"`` for our files, else None."""
        return FORMAT_NAME if is_compressed_slide(Path(str(filename))) else None

    @property
    def format(self) -> str:
        return FORMAT_NAME

    @property
    def codec(self) -> str | None:
        return self._container.codec_name

    @property
    def tile_codec(self) -> TileCodec:
        """The codec object rebuilt from the file's name and parameters."""
        return self._codec

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The file's metadata JSON (see ``tileserver.container.format``)."""
        return self._container.metadata

    def close(self) -> None:
        self._container.close()
        self._region_cache.clear()

    @property
    def level_count(self) -> int:
        return len(self._container.levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((g.width, g.height) for g in self._container.levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(g.downsample) for g in self._container.levels)

    @property
    def properties(self) -> Mapping[str, str]:
        return self._properties

    @property
    def associated_images(self) -> Mapping[str, Image.Image]:
        if self._associated is None:
            images = {}
            for name in self._container.associated_ifds:
                rgb = Image.fromarray(self._container.associated_image(name), "RGB")
                images[name] = rgb.convert("RGBA")
            self._associated = images
        return MappingProxyType(self._associated)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        downsamples = self.level_downsamples
        if downsample < downsamples[0]:
            return 0
        for i in range(1, len(downsamples)):
            if downsample < downsamples[i]:
                return i - 1
        return len(downsamples) - 1

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA region of ``size`` at ``level`` whose top-left is ``location`` in level-0 pixels.

        Pixels inside the slide have alpha 255 (glass in the stored glass colour);
        pixels outside are transparent, as OpenSlide does.
        """
        w, h = (int(size[0]), int(size[1]))
        if w < 0 or h < 0:
            raise openslide.OpenSlideError(f"negative width ({w}) or height ({h}) not allowed")
        if not 0 <= level < self.level_count:
            raise openslide.OpenSlideError(f"level {level} out of range")
        out = np.zeros((h, w, 4), np.uint8)
        g = self._container.levels[level]
        ts = self._container.tile_size
        l_x, l_y = int(location[0]) // g.downsample, int(location[1]) // g.downsample
        # the part of the region inside the level
        x0, y0 = max(l_x, 0), max(l_y, 0)
        x1, y1 = min(l_x + w, g.width), min(l_y + h, g.height)
        if x0 < x1 and y0 < y1:
            for t_row in range(y0 // ts, (y1 - 1) // ts + 1):
                for t_col in range(x0 // ts, (x1 - 1) // ts + 1):
                    tile = self._region_tile(level, t_col, t_row)
                    # overlap of this tile with the region, in level pixels
                    tx0, ty0 = t_col * ts, t_row * ts
                    ax0, ay0 = max(x0, tx0), max(y0, ty0)
                    ax1, ay1 = min(x1, tx0 + tile.shape[1]), min(y1, ty0 + tile.shape[0])
                    out[ay0 - l_y : ay1 - l_y, ax0 - l_x : ax1 - l_x, :3] = tile[
                        ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0
                    ]
            out[y0 - l_y : y1 - l_y, x0 - l_x : x1 - l_x, 3] = 255
        return Image.fromarray(out, "RGBA")

    def _region_tile(self, level: int, col: int, row: int) -> npt.NDArray[np.uint8]:
        key = (level, col, row)
        tile = self._region_cache.get(key)
        if tile is None:
            tile = self.read_tile(level, col, row)
            self._region_cache.put(key, tile)
        return tile

    # -- StoredTiles -------------------------------------------------------------------------
    def stored_tiles(self) -> StoredTiles:
        """This slide itself implements ``StoredTiles``."""
        return self

    @property
    def glass_strategy(self) -> str:
        """How glass was stored: ``keep``, ``fill`` or ``drop``."""
        return self._container.glass_strategy

    def grid(self, level: int) -> tuple[int, int]:
        """(columns, rows) of stored tiles at ``level``."""
        g = self._level(level)
        return g.cols, g.rows

    def is_glass(self, level: int, col: int, row: int) -> bool:
        """True for a dropped (zero-byte) glass tile; reads only the index."""
        return self._container.is_glass(level, col, row)

    def glass_fraction(self) -> float:
        """Fraction of level-0 tiles stored as dropped glass."""
        mask = self._container.glass_mask(0)
        return float(mask.mean()) if mask.size else 0.0

    def tile_shape(self, level: int, col: int, row: int) -> tuple[int, int]:
        """(height, width) of a stored tile after cropping to the level edge."""
        g = self._level(level)
        ts = self._container.tile_size
        self._container.is_glass(level, col, row)  # validates the address
        return min(ts, g.height - row * ts), min(ts, g.width - col * ts)

    def read_tile_bytes(self, level: int, col: int, row: int) -> bytes:
        """The stored bytes of one tile (``b""`` for dropped glass)."""
        return self._container.tile_bytes(level, col, row)

    def set_decoder(self, fn: Decoder | None) -> None:
        """Decode tiles with ``fn(bytes) -> ndarray`` (None restores the codec's own decode)."""
        self._decoder = self._codec.decode if fn is None else fn
        self._region_cache.clear()

    def read_tile(self, level: int, col: int, row: int) -> npt.NDArray[np.uint8]:
        """One stored tile decoded and cropped to the level edge (``H x W x 3`` uint8).

        Glass is answered from the index in the glass colour; raises ``CorruptTile``
        when the stored bytes do not decode.
        """
        h, w = self.tile_shape(level, col, row)
        data = self._container.tile_bytes(level, col, row)
        if not data:
            tile = np.empty((h, w, 3), np.uint8)
            tile[:] = self.glass_color
            return tile
        try:
            pixels = np.asarray(self._decoder(data))
        except CorruptTile:
            raise
        except Exception as exc:  # a decoder's own error becomes one tile's failure
            raise CorruptTile(f"{self.path}: tile ({level}, {col}, {row}): {exc}") from exc
        if pixels.ndim != 3 or pixels.shape[0] < h or pixels.shape[1] < w or pixels.shape[2] < 3:
            raise CorruptTile(f"{self.path}: tile ({level}, {col}, {row}) decoded to shape {pixels.shape}")
        return np.ascontiguousarray(pixels[:h, :w, :3], dtype=np.uint8)

    # -- helpers -----------------------------------------------------------------------------
    def _level(self, level: int) -> LevelGeometry:
        if not 0 <= level < len(self._container.levels):
            raise BadTileAddress(f"{self.path}: level {level} out of range 0..{len(self._container.levels) - 1}")
        return self._container.levels[level]

    def info(self) -> dict[str, Any]:
        """``SlideReader.info`` plus size on disk, glass and source facts."""
        c = self._container
        out = super().info()
        src = c.metadata.get("source") or {}
        out.update(
            file_bytes=c.file_size,
            codec_params=dict(c.codec_params),
            glass=c.glass_strategy,
            glass_color=list(c.glass_color),
            glass_fraction=self.glass_fraction(),
            tissue_fraction=c.metadata.get("tissue_fraction"),
            source_bytes=src.get("bytes"),
            source_name=src.get("name"),
            format_version=c.metadata.get("format_version"),
        )
        return out

    def _build_properties(self) -> dict[str, str]:
        c = self._container
        meta = c.metadata
        props: dict[str, str] = {}
        # ContainerReader checked the types of the keys used here at open (format._check_types)
        src = meta.get("source") or {}
        for key, value in (src.get("properties") or {}).items():
            if not str(key).startswith(_DROPPED_SOURCE_KEYS):
                props[str(key)] = str(value)
        props[openslide.PROPERTY_NAME_VENDOR] = FORMAT_NAME
        mpp = meta.get("mpp")
        if mpp:
            props[openslide.PROPERTY_NAME_MPP_X] = repr(float(mpp[0]))
            props[openslide.PROPERTY_NAME_MPP_Y] = repr(float(mpp[1]))
        else:
            props.pop(openslide.PROPERTY_NAME_MPP_X, None)
            props.pop(openslide.PROPERTY_NAME_MPP_Y, None)
        props["openslide.level-count"] = str(len(c.levels))
        for i, g in enumerate(c.levels):
            props[f"openslide.level[{i}].width"] = str(g.width)
            props[f"openslide.level[{i}].height"] = str(g.height)
            props[f"openslide.level[{i}].downsample"] = str(float(g.downsample))
            props[f"openslide.level[{i}].tile-width"] = str(c.tile_size)
            props[f"openslide.level[{i}].tile-height"] = str(c.tile_size)
        for name, (height, width) in c.associated_sizes.items():
            props[f"openslide.associated.{name}.width"] = str(width)
            props[f"openslide.associated.{name}.height"] = str(height)
        params = c.codec_params
        quality = params.get("quality", params.get("distance"))
        props["tileserver.format-version"] = str(meta.get("format_version", FORMAT_VERSION))
        props["tileserver.codec"] = c.codec_name
        props["tileserver.codec-params"] = json.dumps(params, sort_keys=True)
        props["tileserver.quality"] = "" if quality is None else str(quality)
        props["tileserver.glass"] = c.glass_strategy
        props["tileserver.glass-color"] = "#{:02x}{:02x}{:02x}".format(*c.glass_color)
        props["tileserver.source-bytes"] = str(src.get("bytes", ""))
        props["tileserver.source-name"] = str(src.get("name", ""))
        tf = meta.get("tissue_fraction")
        props["tileserver.tissue-fraction"] = "" if tf is None else f"{float(tf):.6f}"
        props["tileserver.file-bytes"] = str(c.file_size)
        if c.model_info:
            props["tileserver.model"] = json.dumps(c.model_info, sort_keys=True)
        return props


def _build_codec(name: str, params: Mapping[str, Any], path: Path) -> TileCodec:
    from ..codecs import get as get_codec

    try:
        return get_codec(name, **params)
    except (ValueError, TypeError) as exc:
        raise UnsupportedFormat(f"{path}: cannot use codec {name!r}: {exc}") from exc


def _check_neural_model(model_info: Mapping[str, Any] | None, path: Path) -> None:
    """Fail early and clearly when a neural slide's weights are not installed."""
    try:
        from ..codecs import neural
    except ImportError as exc:
        raise MissingModel(f"{path}: needs the neural codec (model {model_info}), which is not installed") from exc
    check = getattr(neural, "check_model", None)
    if check is None:
        raise MissingModel(f"{path}: this tileserver's neural codec cannot check model {model_info}")
    check(model_info)
