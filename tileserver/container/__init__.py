"""tileserver's compressed slide file: a tiled pyramidal BigTIFF (layout and versions in ``format``)."""

from .format import FORMAT_NAME, FORMAT_VERSION, GLASS_STRATEGIES, TILE_SIZE, LevelGeometry, level_geometry
from .reader import ContainerReader, is_container
from .writer import ContainerWriter, clean_stale_partials, partial_path

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GLASS_STRATEGIES",
    "TILE_SIZE",
    "ContainerReader",
    "ContainerWriter",
    "LevelGeometry",
    "clean_stale_partials",
    "is_container",
    "level_geometry",
    "partial_path",
]
