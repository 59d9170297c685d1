"""The classic glass detector: numpy only, conservative, about half a millisecond per 256² tile.

How a brightfield tile is judged
--------------------------------
* The tile (padded to a multiple of 32 by repeating its last row/column, so an edge
  tile keeps every pixel) is averaged over 4×4 blocks and turned into optical density
  relative to the glass colour, ``od_c = ln((bg_c + 1) / (x_c + 1))``.
* Its *chroma* is the OD vector minus its grey part (``od - mean(od)``).  Every
  histological stain (haematoxylin, eosin, DAB, …) absorbs the three channels
  unequally; glass, dust, bubbles, shading and coverslip edges darken them alike.
* Chroma is averaged over blocks of 4, 8, 16 and 32 pixels.  Averaging lowers noise,
  so bigger blocks get lower thresholds: a faint but extended stain (the palest
  tissue in the shared data, a near-white lilac thumbnail, has a chroma of 0.02–0.05)
  is found at 16–32 px, a small intense speck at 4–8 px.  A block is *stained* when its
  chroma passes the scale's threshold and is at least a quarter of its ``od_max``
  (so grey structures with coloured fringes do not count).  Thresholds rise with the
  tile's own noise (the spread of its 4-px blocks inside its flattest fifth of 16-px
  blocks; the rise is capped at twice the floor) so JPEG-noisy glass stays
  glass while clean glass lets the faintest tissue through.
* A 16-px block darker than ``od_max`` 0.8 counts whatever its colour (only tissue and
  ink are that dark; a speck of dust is too small to darken a whole block).
* Faint films (mucus, thin detached tissue) can be nearly grey.  An 8/16/32-px block whose
  mean ``od_max`` is at least 0.05/0.04/0.035 with chroma ≥ 0.015 and ≥ a quarter of
  ``od_max``, blue not its most absorbed channel, counts when it is also *granular*: fine
  texture (mean |Laplacian| of full-resolution luminance) ≥ 1 level and ≥ 3× the tile's
  median — a bubble's grey shadow is as smooth as glass.  3/2/1 such blocks make tissue.
  A smooth film counts too when it has an H&E hue (green absorbed within 75 % of the
  most, blue less than green) and covers 48/8/3 blocks — a strip the width of a tile edge,
  more than the bubble shadows in the data ever show.
* Ink: pen ink sits on top of the coverslip, out of focus, so it is smooth.  A 16-px
  block that absorbs strongly (``od_max`` ≥ 0.3) and has almost no texture (mean
  |Laplacian| of the 4×4-averaged luminance ≤ 3 levels) is ink, and so is the blurred fringe
  next to it (texture ≤ 8, within two blocks).  Ink blocks do not count as tissue, and
  the darkness rule does not apply within two blocks of an ink core (a dark grey block
  there is the stroke's edge; dark tissue is coloured and counts by chroma anyway).
  Ink is only considered on a tile that also shows clean glass (≥ 10 % of blocks): a
  stroke on glass borders glass, while a tile covered edge to edge may be ink over
  tissue, which is kept.  Pen over tissue keeps the tissue's texture and is kept too.
* The tile is tissue when it has at least 3 stained 4-px blocks, or 2 stained 8-px
  blocks, or one stained 16- or 32-px block, or enough faint-film blocks (above).  A tile
  narrower than a block uses the threshold of the largest block that fits it (repeating
  an edge averages no noise away).

Fluorescence tiles are judged the same way on the brightest channel's excess over
the (dark) background, in 8-bit levels: 10 at 4 px, 6 at 8 px, 4 at 16 px, 3 at 32 px
(no ink or film rules).

Thresholds were set on ``shared/data/patches`` (see ``docs/tissue.md``): every tile of
every tissue patch is kept, the clean glass tiles are dropped, with the glass-side
margin being the thinner one by design.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import TileServerError
from .background import Background

__all__ = ["ClassicGlassDetector"]

RGBImage = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

_SCALES = (4, 8, 16, 32)
#: tiles judged together in one numpy pass (bounds memory: ~50 MB at 256x256)
_CHUNK = 32


@dataclass(frozen=True)
class ClassicGlassDetector:
    """Fast numpy detector: coloured absorption at several scales, ink, darkness (see module docstring).

    Brightfield thresholds are in optical density (natural log, relative to the glass
    colour); fluorescence thresholds are in 8-bit levels above the background.
    """

    name: str = "classic"
    #: block edge (level pixels) → chroma floor (norm of the block's OD vector minus its grey part)
    chroma_floors: tuple[tuple[int, float], ...] = ((4, 0.06), (8, 0.045), (16, 0.035), (32, 0.028))
    #: block edge → how many stained blocks of that size make a tile tissue
    min_blocks: tuple[tuple[int, int], ...] = ((4, 3), (8, 2), (16, 1), (32, 1))
    #: noise multiple a block's chroma must exceed (noise measured per tile, divided by the block edge) ...
    noise_z: float = 4.0
    #: ... but the noise term never lifts a threshold above this multiple of its floor
    noise_cap: float = 2.0
    #: a stained block's chroma must also be at least this fraction of its od_max
    min_chroma_ratio: float = 0.25
    #: a 16-pixel block this dark (mean od_max) is tissue whatever its colour, unless ink
    dark_od: float = 0.8
    #: faint absorption (mucus, thin films): block edge → minimum mean od_max, with a little colour ...
    faint_od_floors: tuple[tuple[int, float], ...] = ((8, 0.05), (16, 0.04), (32, 0.035))
    #: ... chroma at least this and at least ``faint_chroma_ratio`` of od_max (grey shading, a
    #: bubble's shadow, sits at 0.20-0.22; a faint lilac film at 0.26-0.4) ...
    faint_min_chroma: float = 0.015
    faint_chroma_ratio: float = 0.25
    #: ... blue not the most absorbed channel (haematoxylin / eosin hues) ...
    #: ... and this many such blocks (more than for stained blocks: the evidence is weaker)
    faint_min_blocks: tuple[tuple[int, int], ...] = ((8, 3), (16, 2), (32, 1))
    #: ... and granular: mean |Laplacian| of full-resolution luminance at least this (levels) and at
    #: least ``faint_texture_ratio`` times the tile's median (a bubble's shadow is as smooth as glass)
    faint_min_texture: float = 1.0
    faint_texture_ratio: float = 3.0
    #: a smooth faint film (no texture needed) counts when it has an H&E hue (green absorbed
    #: within 75 % of the most, blue less than green) and covers this many blocks: a film the
    #: width of a tile edge strip, more than a bubble's shadow ever shows
    smooth_film_min_blocks: tuple[tuple[int, int], ...] = ((8, 48), (16, 8), (32, 3))
    #: ink core: 16-pixel block with mean od_max at least this ...
    ink_od: float = 0.3
    #: ... and mean |Laplacian| of the 4x4-averaged luminance (8-bit levels) at most this
    ink_max_texture: float = 3.0
    #: ink fringe: blocks within this many 16-pixel blocks of an ink core ...
    ink_grow: int = 2
    #: ... whose texture is at most this (a blurred stroke edge has some curvature, tissue more)
    ink_fringe_texture: float = 8.0
    #: ink is only considered on tiles where at least this fraction of 16-pixel blocks is clean glass
    ink_min_glass: float = 0.1
    #: fluorescence: block edge → minimum mean excess of the brightest channel over the background
    fluo_thresholds: tuple[tuple[int, float], ...] = ((4, 10.0), (8, 6.0), (16, 4.0), (32, 3.0))

    def glass_flags(self, tiles: list[RGBImage], background: Background) -> list[bool]:
        """One flag per tile, True = glass (no tissue found, safe to drop); see the module docstring.

        Tiles are ``H x W x 3`` uint8 of any size (edge tiles may be 1 pixel wide).
        Tiles of the same size are judged together in one vectorised pass.
        """
        flags: list[bool] = [False] * len(tiles)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, t in enumerate(tiles):
            h, w = _check_tile(t).shape[:2]
            groups[(h, w)].append(i)
        for idx in groups.values():
            for start in range(0, len(idx), _CHUNK):
                part = idx[start : start + _CHUNK]
                evidence = self._evidence(np.stack([tiles[i][..., :3] for i in part]), background)
                tissue = np.zeros(len(part), dtype=bool)
                for _, need, m in evidence:
                    tissue |= m.sum(axis=(1, 2)) >= need
                for i, is_tissue in zip(part, tissue, strict=True):
                    flags[i] = not bool(is_tissue)
        return flags

    def is_tissue(self, tile: RGBImage, background: Background) -> bool:
        """Whether one tile holds tissue (the negation of its glass flag)."""
        return not self.glass_flags([tile], background)[0]

    def tissue_mask(self, tile: RGBImage, background: Background) -> BoolArray:
        """Blocks that counted as tissue at any scale, on the tile's 4-pixel grid (for overlays)."""
        x = _check_tile(tile)
        evidence = self._evidence(x[None, ..., :3], background, complete=True)
        base = np.zeros_like(evidence[0][2][0])
        for s, _, m in evidence:
            f = s // 4
            base |= np.repeat(np.repeat(m[0], f, axis=0), f, axis=1)
        h, w = x.shape[:2]
        out: BoolArray = base[: (h + 3) // 4, : (w + 3) // 4]
        return out

    # -- internals: every array carries the tile index first -------------------------------

    def _evidence(
        self, tiles: RGBImage, background: Background, complete: bool = False
    ) -> list[tuple[int, int, BoolArray]]:
        """(block edge, blocks needed, (N, rows, cols) map of blocks that count) for each rule and scale.

        A tile is tissue when any rule has at least its needed number of blocks.  Unless
        ``complete``, the faint-film rule is left empty on tiles the other rules already call tissue.

        Internally colour arrays are planar, (3, N, rows, cols): numpy is slow at reducing
        a last axis of length 3, fast at adding whole planes.
        """
        # a tile narrower than a block repeats its edge to fill it, which averages no noise
        # away: such blocks get the threshold of the largest block that fits the tile
        fits = max(4, 1 << (min(tiles.shape[1:3]).bit_length() - 1))
        padded = _pad_to(tiles, 32)
        b4 = _quarter(padded)
        bg = [np.float32(c) for c in background.color]
        if background.kind == "fluorescence":
            thresholds = dict(self.fluo_thresholds)
            need = dict(self.min_blocks)
            out_f: list[tuple[int, int, BoolArray]] = []
            b = b4
            for s in _SCALES:
                if s > 4:
                    b = _half(b)
                signal = _max3(b[0] - bg[0], b[1] - bg[1], b[2] - bg[2]) >= thresholds[min(s, fits)]
                out_f.append((s, need[s], signal))
            return out_f
        od4 = np.stack([np.log((bg[c] + 1.0) / (b4[c] + 1.0)) for c in range(3)])
        u4 = od4 - (od4[0] + od4[1] + od4[2]) * np.float32(1.0 / 3.0)  # the colour part of the absorption
        sigma = _noise(u4)[:, None, None]
        floors = dict(self.chroma_floors)
        faint_floors = dict(self.faint_od_floors)
        need = dict(self.min_blocks)
        faint_need = dict(self.faint_min_blocks)
        smooth_need = dict(self.smooth_film_min_blocks)
        pyramid: dict[int, tuple[FloatArray, FloatArray]] = {4: (u4, od4)}
        u, od = u4, od4
        for s in _SCALES[1:]:
            u, od = _half(u), _half(od)
            pyramid[s] = (u, od)
        od16 = pyramid[16][1]
        ink16, near_ink16 = self._ink(b4, _max3(od16[0], od16[1], od16[2]))
        out: list[tuple[int, int, BoolArray]] = []
        faint_maps: dict[int, BoolArray] = {}
        for s, (u, od) in pyramid.items():
            odmax = _max3(od[0], od[1], od[2])
            chroma = np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])
            floor = floors[min(s, fits)]
            # a block mean of (s/4)^2 4-pixel blocks: noise falls with the block edge
            thr = np.clip(self.noise_z * sigma / (s // 4), floor, self.noise_cap * floor)
            stained = (chroma >= thr) & (chroma >= self.min_chroma_ratio * odmax)
            if s == 16:
                # dark but grey next to ink is the stroke's edge (dark tissue is coloured anyway)
                stained |= (odmax >= self.dark_od) & ~near_ink16
            not_ink = ~_ink_at(ink16, s)
            out.append((s, need[s], stained & not_ink))
            if s in faint_floors:
                # tiles narrower than the block: no noise averaged away, so a doubled floor
                f_floor = faint_floors[s] if s <= fits else 2 * faint_floors[s]
                f_thr = np.clip(self.noise_z * sigma / (s // 4), f_floor, self.noise_cap * f_floor)
                # H&E hues only (blue absorbed least): the yellowish grey of old mounting medium
                # or a bubble's shadow absorbs blue most.  Strong DAB is caught by the chroma rule.
                faint = (
                    (odmax >= f_thr)
                    & (chroma >= self.faint_min_chroma)
                    & (chroma >= self.faint_chroma_ratio * odmax)
                    & (od[2] < odmax)
                )
                faint_maps[s] = faint & not_ink
                he_hue = (od[1] >= 0.75 * odmax) & (od[2] < od[1])
                out.append((s, smooth_need[s], faint & he_hue & not_ink))
        # tiles already settled as tissue need no texture (the costly part): skip them unless asked
        settled = np.zeros(tiles.shape[0], dtype=bool)
        if not complete:
            for _, k, m in out:
                settled |= m.sum(axis=(1, 2)) >= k
        textured = self._textured(padded, faint_maps, settled)
        out.extend((s, faint_need[s], m & textured[s]) for s, m in faint_maps.items())
        return out

    def _textured(self, padded: RGBImage, faint_maps: dict[int, BoolArray], skip: BoolArray) -> dict[int, BoolArray]:
        """Per scale, blocks with fine texture well above the tile's own (a film is granular, a shadow smooth).

        Texture is the mean |Laplacian| of the full-resolution luminance; it is computed only for
        tiles that have faint candidates and are not in ``skip`` (tiles the other rules already settled).
        """
        n = padded.shape[0]
        shapes = {s: m.shape for s, m in faint_maps.items()}
        out = {s: np.zeros(shape, dtype=bool) for s, shape in shapes.items()}
        sel = np.flatnonzero(np.any([m.any(axis=(1, 2)) for m in faint_maps.values()], axis=0) & ~skip)
        if sel.size == 0 or n == 0:
            return out
        luma = padded[sel].astype(np.float32).sum(axis=3) * np.float32(1.0 / 3.0)
        lap = np.zeros_like(luma)
        lap[:, 1:-1, 1:-1] = np.abs(
            4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1] - luma[:, 1:-1, :-2] - luma[:, 1:-1, 2:]
        )
        tex = _half(_half(_half(lap)))  # 8-pixel blocks
        flat = tex.reshape(sel.size, -1)
        k = flat.shape[1] // 2
        median = np.partition(flat, k, axis=1)[:, k][:, None, None]
        floor = np.maximum(np.float32(self.faint_min_texture), np.float32(self.faint_texture_ratio) * median)
        for s in sorted(shapes):
            while tex.shape[1] > shapes[s][1]:
                tex = _half(tex)  # block means of texture keep their scale, so one floor serves all
            out[s][sel] = tex >= floor
        return out

    def _ink(self, b4: FloatArray, odmax16: FloatArray) -> tuple[BoolArray, BoolArray]:
        """(N, rows, cols) 16-pixel blocks of pen ink (strong and smooth, plus their blurred
        fringe), and the blocks within ``ink_grow`` of an ink core whatever their texture."""
        ink = np.zeros(odmax16.shape, dtype=bool)
        near = np.zeros(odmax16.shape, dtype=bool)
        candidates = (odmax16 >= self.ink_od).any(axis=(1, 2)) & (
            (odmax16 <= 0.05).mean(axis=(1, 2)) >= self.ink_min_glass
        )
        if not candidates.any():
            return ink, near
        sel = np.flatnonzero(candidates)
        luma = (b4[0, sel] + b4[1, sel] + b4[2, sel]) * np.float32(1.0 / 3.0)
        lap = np.zeros_like(luma)
        lap[:, 1:-1, :] += np.abs(luma[:, :-2, :] + luma[:, 2:, :] - 2 * luma[:, 1:-1, :])
        lap[:, :, 1:-1] += np.abs(luma[:, :, :-2] + luma[:, :, 2:] - 2 * luma[:, :, 1:-1])
        texture = _half(_half(lap))
        core = (texture <= self.ink_max_texture) & (odmax16[sel] >= self.ink_od)
        fringe = texture <= self.ink_fringe_texture
        grown, around = core.copy(), core.copy()
        for _ in range(self.ink_grow):
            grown |= fringe & _dilate(grown)
            around = _dilate(around)
        ink[sel] = grown
        near[sel] = around
        return ink, near


def _check_tile(tile: object) -> RGBImage:
    if not isinstance(tile, np.ndarray) or tile.ndim != 3 or tile.shape[2] < 3:
        raise TileServerError(f"a tile must be an H x W x 3 array, got {getattr(tile, 'shape', type(tile))}")
    if tile.shape[0] == 0 or tile.shape[1] == 0:
        raise TileServerError(f"empty tile {tile.shape}")
    if tile.dtype != np.uint8:
        raise TileServerError(f"a tile must be uint8, got {tile.dtype}")
    return tile


def _noise(u: FloatArray) -> npt.NDArray[np.float32]:
    """Per tile, the noise of the 4-pixel blocks' colour components in its flattest fifth of 16-pixel blocks.

    ``u`` is planar (3, N, rows, cols).  Glass noise (sensor, JPEG) is what the flattest
    blocks hold; tissue texture only reaches them when tissue fills the tile, and then the
    tile has stain to spare (``noise_cap`` also bounds how far the estimate can lift a threshold).
    """
    m = _half(_half(u))
    v = _half(_half(u * u)) - m * m
    var = np.maximum(v[0] + v[1] + v[2], 0.0)
    sd = np.sqrt(var).reshape(u.shape[1], -1)
    k = sd.shape[1] // 5
    return np.partition(sd, k, axis=1)[:, k]


def _max3(a: FloatArray, b: FloatArray, c: FloatArray) -> FloatArray:
    return np.maximum(np.maximum(a, b), c)


def _pad_to(x: RGBImage, m: int) -> RGBImage:
    """Pad (N, H, W, C) to multiples of ``m`` by repeating the last row/column (edge tiles keep all pixels)."""
    h, w = x.shape[1:3]
    ph, pw = -h % m, -w % m
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return np.ascontiguousarray(x)


#: folds the four pixels' channels of a 4-pixel row run into one RGB mean (with the 4 rows summed first)
_FOLD = np.zeros((12, 3), dtype=np.float32)
for _k in range(4):
    for _c in range(3):
        _FOLD[3 * _k + _c, _c] = 1.0 / 16.0


def _quarter(x: RGBImage) -> FloatArray:
    """4x4 block means of padded uint8 tiles (N, H, W, 3) → planar float32 (3, N, H/4, W/4).

    Rows are summed as whole contiguous runs in uint16, then each block's 4x3 values are
    folded to RGB with one small matrix product: the fastest numpy path measured.
    """
    n, h, w, c = x.shape
    rows = x.reshape(n, h // 4, 4, w * c).sum(axis=2, dtype=np.uint16)
    rgb = rows.reshape(n, h // 4, w // 4, 4 * c).astype(np.float32) @ _FOLD
    return np.ascontiguousarray(np.moveaxis(rgb, 3, 0))


def _half(x: FloatArray) -> FloatArray:
    """2x2 block means over the last two axes (both even)."""
    h, w = x.shape[-2:]
    rows = x.reshape(*x.shape[:-2], h // 2, 2 * w)
    pairs = rows[..., :w] + rows[..., w:]  # adds whole contiguous rows
    out: FloatArray = (pairs[..., 0::2] + pairs[..., 1::2]) * np.float32(0.25)
    return out


def _ink_at(ink16: BoolArray, scale: int) -> BoolArray:
    """The 16-pixel ink map on another block grid (a 32-pixel block is ink only if all its parts are)."""
    if scale == 16:
        return ink16
    n, h, w = ink16.shape
    if scale > 16:
        coarse: BoolArray = ink16.reshape(n, h // 2, 2, w // 2, 2).all(axis=(2, 4))
        return coarse
    f = 16 // scale
    return np.repeat(np.repeat(ink16, f, axis=1), f, axis=2)


def _dilate(m: BoolArray) -> BoolArray:
    """4-neighbour dilation of (N, H, W) masks."""
    out = m.copy()
    out[:, 1:, :] |= m[:, :-1, :]
    out[:, :-1, :] |= m[:, 1:, :]
    out[:, :, 1:] |= m[:, :, :-1]
    out[:, :, :-1] |= m[:, :, 1:]
    return out
