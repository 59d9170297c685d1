"""Tissue / glass segmentation: which tiles of a slide are glass and may be dropped.

The converter asks one question per tile: *is this tile glass?*  A wrong "yes"
drops tissue (a misdiagnosis risk), a wrong "no" only costs bytes, so every rule
here leans towards "tissue" when unsure.

Usage::

    from tileserver.tissue import estimate_background, get_detector, tissue_fraction

    background = estimate_background(slide)          # from the slide's own low-resolution pixels
    detector = get_detector("classic")               # or "cnn"
    flags = detector.glass_flags(tiles, background)  # True = glass (safe to drop)
    print(tissue_fraction(flags))

* ``estimate_background`` (``background.py``): the glass colour and whether the slide
  is ``"brightfield"`` (light glass, stains absorb) or ``"fluorescence"`` (dark
  background, tissue emits).
* ``"classic"`` (``classic.py``): numpy only, well under a millisecond per 256×256
  tile on one core; coloured absorption at several scales, pen-ink handling.
* ``"cnn"`` (``cnn.py``): a tiny CNN trained on the shared patches
  (``python -m tileserver.tissue_train``), weights shipped in
  ``tileserver/tissue_weights`` with their SHA-256.  It only ever *adds* tissue to
  the classic answer: a tile is glass only when both agree.  Torch is imported only
  when it is asked for.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .background import Background, Kind, estimate_background, estimate_background_from_image
from .classic import ClassicGlassDetector

__all__ = [
    "Background",
    "ClassicGlassDetector",
    "GlassDetector",
    "Kind",
    "estimate_background",
    "estimate_background_from_image",
    "get_detector",
    "tissue_fraction",
]


@runtime_checkable
class GlassDetector(Protocol):
    """Decides per tile whether it is glass (safe to drop)."""

    @property
    def name(self) -> str:
        """Stable name of the detector (``"classic"``, ``"cnn"``)."""
        ...

    def glass_flags(self, tiles: list[npt.NDArray[np.uint8]], background: Background) -> list[bool]:
        """One flag per ``H x W x 3`` uint8 tile: True = glass (no tissue), False = keep."""
        ...


DETECTORS = ("classic", "cnn")


def get_detector(name: str = "classic") -> GlassDetector:
    """The detector called ``name``: ``"classic"`` (fast, numpy) or ``"cnn"`` (learned, torch).

    Raises ``ValueError`` for any other name, and ``MissingModel`` for ``"cnn"`` when
    its weights are absent or do not match their recorded SHA-256.
    """
    if name == "classic":
        return ClassicGlassDetector()
    if name == "cnn":
        from .cnn import CnnGlassDetector  # torch is imported only here

        return CnnGlassDetector()
    raise ValueError(f"unknown tissue detector {name!r}; choose one of {', '.join(DETECTORS)}")


def tissue_fraction(flags: list[bool]) -> float:
    """Fraction of tiles that are tissue (``False`` flags); 0.0 for no tiles."""
    if not flags:
        return 0.0
    return sum(1 for f in flags if not f) / len(flags)
