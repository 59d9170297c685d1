"""Background estimation: the colour of a slide's glass and whether it is brightfield or fluorescence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from ..errors import TileServerError

if TYPE_CHECKING:
    from ..slides.base import SlideReader

__all__ = ["Background", "Kind", "estimate_background", "estimate_background_from_image"]

Kind = Literal["brightfield", "fluorescence"]


@dataclass(frozen=True)
class Background:
    """The colour of a slide's glass and the kind of imaging that made it."""

    color: tuple[int, int, int]
    kind: Kind


#: longest side of the image the background is estimated from
_BG_IMAGE_SIZE = 1024


def estimate_background(slide: SlideReader) -> Background:
    """Background colour and kind of ``slide`` (a ``SlideReader``), from its own pixels.

    Uses ``slide.get_thumbnail((1024, 1024))``, which OpenSlide builds from the best
    low-resolution level, so level 0 of a large slide is never read.  Raises
    ``TypeError`` for an object without ``get_thumbnail``.
    """
    get_thumbnail = getattr(slide, "get_thumbnail", None)
    if get_thumbnail is None:
        raise TypeError(f"estimate_background needs a SlideReader, got {type(slide).__name__}")
    thumb = get_thumbnail((_BG_IMAGE_SIZE, _BG_IMAGE_SIZE))
    rgb = np.asarray(thumb.convert("RGB"), dtype=np.uint8)
    return estimate_background_from_image(rgb)


def estimate_background_from_image(rgb: npt.NDArray[np.uint8]) -> Background:
    """Background colour and kind from an ``H x W x 3`` uint8 image of a whole slide (or part of one).

    Fluorescence: the image is mostly dark (median brightness under 80 of 255) —
    brightfield glass is light, and even a slide covered edge to edge with tissue
    stays far brighter than that.  The background is then the typical colour of the
    darkest fifth of pixels.

    Brightfield: the glass is the brightest dense mode of near-neutral pixels (chroma
    ≤ 24): the fullest luminance bin in the brighter half of them, then the median colour
    of pixels within ±12 of it.  When a slide has no such pixels (tissue edge to edge) it
    falls back to the brightest 1 % overall.  The result is lifted to at least (200, 200,
    200) per channel, so tissue never becomes "background".
    """
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise TileServerError("estimate_background_from_image needs an H x W x 3 uint8 array")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise TileServerError("estimate_background_from_image got an empty image")
    px = rgb[..., :3].reshape(-1, 3)
    if px.shape[0] > 1_000_000:  # a regular subsample is plenty for percentiles
        px = px[:: px.shape[0] // 1_000_000 + 1]
    bright = px.max(axis=1).astype(np.int32)
    if float(np.median(bright)) < 80.0:
        cut = np.percentile(bright, 20)
        dark = px[bright <= cut]
        color = np.median(dark, axis=0)
        return Background(color=_rgb_tuple(color), kind="fluorescence")
    f = px.astype(np.int32)
    luma = f.sum(axis=1)
    chroma = f.max(axis=1) - f.min(axis=1)
    neutral = chroma <= 24
    if np.count_nonzero(neutral) >= max(16, px.shape[0] // 200):
        cand = f[neutral]
        cand_luma = luma[neutral]
        # glass is the brightest dense mode of neutral pixels: the fullest luma bin among
        # the brighter half (so tissue-grey modes lose), then the median of pixels near it
        hist = np.bincount(cand_luma, minlength=766).astype(np.float64)
        hist = np.convolve(hist, np.ones(7), mode="same")
        lo = int(np.percentile(cand_luma, 50))
        peak = lo + int(np.argmax(hist[lo:]))
        sel = cand[np.abs(cand_luma - peak) <= 12]
    else:
        sel = f[luma >= np.percentile(luma, 99)]
    color = np.median(sel, axis=0)
    # glass is light: never accept a background darker than light grey
    color = np.maximum(color, 200.0)
    return Background(color=_rgb_tuple(color), kind="brightfield")


def _rgb_tuple(c: npt.NDArray[np.generic]) -> tuple[int, int, int]:
    v = [round(float(x)) for x in np.clip(c, 0, 255)[:3]]
    return (v[0], v[1], v[2])
