"""Tile codecs: a registry of ``TileCodec`` implementations by stable name."""

from .base import Tile, TileCodec, available, get, register

__all__ = ["Tile", "TileCodec", "available", "get", "register"]
