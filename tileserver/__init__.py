"""tileserver: Deep Zoom tile server and neural-codec compression for whole-slide images.

Public API::

    import tileserver
    with tileserver.open_slide("slide.svs") as slide:   # or one of our compressed .tiff files
        region = slide.read_region((0, 0), 0, (512, 512))
"""

from __future__ import annotations

from .errors import (
    BadTileAddress,
    ConfigError,
    ConversionError,
    CorruptSlide,
    CorruptTile,
    MissingModel,
    SlideNotFound,
    TileServerError,
    UnsupportedFormat,
)
from .slides import SlideReader, detect_format, open_slide

__version__ = "0.1.0"

__all__ = [
    "BadTileAddress",
    "ConfigError",
    "ConversionError",
    "CorruptSlide",
    "CorruptTile",
    "MissingModel",
    "SlideNotFound",
    "SlideReader",
    "TileServerError",
    "UnsupportedFormat",
    "__version__",
    "detect_format",
    "open_slide",
]
