"""``OpenSlideReader``: a ``SlideReader`` over anything OpenSlide opens."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import openslide
from PIL import Image

from ..errors import CorruptSlide, UnsupportedFormat
from .base import SlideReader

__all__ = ["SHARED_CACHE_BYTES", "OpenSlideReader"]

#: one OpenSlide tile cache shared by every slide this process opens, so memory
#: stays bounded however many slides are open (OpenSlide's default is 32 MiB *per slide*)
SHARED_CACHE_BYTES = 64 * 1024 * 1024

_shared_cache: openslide.OpenSlideCache | None = None
_shared_cache_lock = threading.Lock()


def _cache() -> openslide.OpenSlideCache | None:
    """The process-wide cache, created on first use (after any fork)."""
    global _shared_cache
    with _shared_cache_lock:
        if _shared_cache is None:
            try:
                _shared_cache = openslide.OpenSlideCache(SHARED_CACHE_BYTES)
            except openslide.lowlevel.OpenSlideVersionError:  # OpenSlide < 4.0
                return None
        return _shared_cache


class OpenSlideReader(SlideReader):
    """Delegates to ``openslide.OpenSlide``; errors become ours."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        fmt = openslide.OpenSlide.detect_format(str(self.path))
        if fmt is None:
            raise UnsupportedFormat(f"{self.path}: not a slide format OpenSlide reads")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as exc:
            raise CorruptSlide(f"{self.path}: {exc}") from exc
        self._format = fmt
        cache = _cache()
        if cache is not None:
            self._osr.set_cache(cache)
        self._profile = self._osr._profile  # keep DeepZoomGenerator's colour handling

    @classmethod
    def detect_format(cls, filename: openslide.lowlevel.Filename) -> str | None:
        return openslide.OpenSlide.detect_format(filename)

    @property
    def format(self) -> str:
        return self._format

    def close(self) -> None:
        self._osr.close()

    @property
    def level_count(self) -> int:
        return self._osr.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._osr.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._osr.level_downsamples

    @property
    def properties(self) -> Mapping[str, str]:
        return self._osr.properties

    @property
    def associated_images(self) -> Mapping[str, Image.Image]:
        try:
            return self._osr.associated_images
        except openslide.OpenSlideError as exc:
            raise CorruptSlide(f"{self.path}: {exc}") from exc

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return self._osr.get_best_level_for_downsample(downsample)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        try:
            return self._osr.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            raise CorruptSlide(f"{self.path}: {exc}") from exc
