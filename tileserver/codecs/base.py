"""The ``TileCodec`` protocol every codec implements, and the codec registry.

A codec turns one RGB tile (``ndarray[H, W, 3]`` of ``uint8``) into bytes and
back.  Codecs are registered by a stable string name; files store that name,
never a position in a table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..errors import CorruptTile

__all__ = ["Tile", "TileCodec", "available", "get", "register"]

Tile = npt.NDArray[np.uint8]


@runtime_checkable
class TileCodec(Protocol):
    """Bytes <-> pixels for one tile at a time, or a batch."""

    #: stable registry name, e.g. ``"jpeg"``
    name: str
    #: parameters that, with the name, reproduce this codec (stored in files)
    params: dict[str, Any]
    #: TIFF compression tag value used when storing tiles of this codec
    tiff_compression: int

    def encode(self, tile: Tile) -> bytes:
        """Code one ``H x W x 3`` uint8 tile."""
        ...

    def decode(self, data: bytes) -> Tile:
        """Decode one tile; raises ``CorruptTile`` on bad input."""
        ...

    def decode_batch(self, blobs: Sequence[bytes]) -> list[Tile | CorruptTile]:
        """Decode many tiles; a bad blob yields its ``CorruptTile`` in its slot."""
        ...


_REGISTRY: dict[str, Callable[..., TileCodec]] = {}


def register(name: str) -> Callable[[Callable[..., TileCodec]], Callable[..., TileCodec]]:
    """Class decorator registering a codec factory under a stable name."""

    def deco(factory: Callable[..., TileCodec]) -> Callable[..., TileCodec]:
        if name in _REGISTRY:
            raise ValueError(f"codec {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def _ensure_loaded() -> None:
    # Import side effects register the codecs; neural imports torch lazily itself.
    from . import classic  # noqa: F401

    try:
        from . import neural  # noqa: F401
    except ImportError:  # pragma: no cover - neural module not present
        pass


def available() -> list[str]:
    """Names of all registered codecs."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get(name: str, **params: Any) -> TileCodec:
    """Build the codec registered as ``name`` with ``params``.

    Raises ``ValueError`` for an unknown name or bad parameters.
    """
    _ensure_loaded()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
    return factory(**params)
