"""Exception hierarchy for tileserver.

::

    TileServerError                 base of everything we raise on purpose
    ├── SlideNotFound               no slide at that path (or outside the slides root)
    ├── UnsupportedFormat           the file is not a slide we can read
    ├── CorruptSlide                a slide file whose structure is damaged
    ├── BadTileAddress              level / col / row / format out of range
    ├── CorruptTile                 one stored tile could not be decoded
    ├── MissingModel                a neural slide needs weights that are not installed
    ├── ConfigError                 a setting is unknown or has a bad value
    └── ConversionError             ``tileserver convert`` could not finish

HTTP statuses for these live in ``tileserver.server.errors`` (one table).
"""

from __future__ import annotations

__all__ = [
    "BadTileAddress",
    "ConfigError",
    "ConversionError",
    "CorruptSlide",
    "CorruptTile",
    "MissingModel",
    "SlideNotFound",
    "TileServerError",
    "UnsupportedFormat",
]


class TileServerError(Exception):
    """Base class for every error tileserver raises deliberately."""


class SlideNotFound(TileServerError):
    """No slide exists at the requested path, or the path leaves the slides root."""


class UnsupportedFormat(TileServerError):
    """The file exists but is not a slide format we can read."""


class CorruptSlide(TileServerError):
    """The slide file is damaged (bad offsets, truncated, inconsistent tags)."""


class BadTileAddress(TileServerError):
    """A tile address (level, column, row, format) is out of range."""


class CorruptTile(TileServerError):
    """One stored tile's bytes could not be decoded; other tiles are unaffected."""


class MissingModel(TileServerError):
    """A neural-coded slide names model weights that are not installed."""


class ConfigError(TileServerError):
    """A configuration key is unknown or its value is invalid."""


class ConversionError(TileServerError):
    """A conversion failed; no output file was left behind."""
