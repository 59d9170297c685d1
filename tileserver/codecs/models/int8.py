"""Integer decoding for the KLT coders: int8 x int8 -> int32 products, integer rescaling, exact everywhere.

The float64 exact decoder (``klt.py``, ``context.py``) spent 14 of a q3 tile's 24 ms of
decoding in the synthesis and about half of the rest in the hyper-synthesis and context
networks: float64 is the slowest arithmetic a CPU has.  A model built with ``int8 = true``
decodes its synthesis with integers instead, and with ``int8_entropy = true`` its
hyper-synthesis and context networks too: every convolution is an int8 matrix product with
int32 accumulation (``torch._int_mm`` with AMX or VNNI; elsewhere an exact float32 product of
the same integers, see :func:`int_mm_is_exact`), and
numba kernels do each layer's rescaling, rounding, pixel shuffle and padding in one pass
over the data.  The entropy model's layers (small: about 30 M multiply-adds per 256² tile
against 190 M in the synthesis) use the same arithmetic through :func:`quantize_conv` and
:func:`small_conv`; their outputs (means, log-scales, corrections) are integers over
``2**VALUE_BITS``.  The description below is the synthesis's.

What is quantized, and how (fixed by the weights and two calibrated activation
ranges ``act_max`` stored with them, never by data seen at decode time):

* the latent: rounded to multiples of ``2**-LATENT_FRAC_BITS`` as int16 (``|y| < 250``),
  held as two int8 halves ``y = 256 hi + lo``, so each product with it is two int8
  products combined exactly in int64;
* the inverse KLT (the linear base image): int16 weights per output channel (scale
  ``max|w| / 32639``), likewise two int8 halves, so four int8 products in all;
* the three refinement layers: int8 weights per output channel (scale ``max|w| / 127``);
  the ReLU outputs of the first two are uint8 on ``[0, act_max]``, held as ``a - 128``
  in int8 (padding with -128 is the float model's zero padding);
* rescaling: each output is ``(acc + B) * m`` with integers ``B`` (the bias and the
  ``-128`` offset folded in) and ``m`` (a multiplier over ``2**MULT_BITS``), rounded by
  adding half and shifting right; the last layer's output is added to the base image
  on the ``2**-PIXEL_BITS`` grid of a pixel level and rounded the same way.

All of it is integer arithmetic whose worst case :func:`int8_layers` bounds when it
builds the layers (it raises rather than let a sum overflow int32 or int64), so the
pixels depend on nothing but the weights and the latent: not on batch, threads,
summation order, CPU or GPU.  :func:`reference` is the same arithmetic in plain
torch (any device); tests check the two agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .klt import KLTPS

__all__ = [
    "BASE_CLAMP",
    "LATENT_FRAC_BITS",
    "MULT_BITS",
    "PIXEL_BITS",
    "VALUE_BITS",
    "Int8Synthesis",
    "QConv",
    "int8_layers",
    "int_mm_is_exact",
    "quantize_conv",
    "reference",
    "small_conv",
    "small_conv_reference",
    "synthesizer",
    "weight_scale",
]

#: the latent is rounded to multiples of 2**-LATENT_FRAC_BITS (int16, |y| < 250)
LATENT_FRAC_BITS = 7
#: layer multipliers are integers over 2**MULT_BITS
MULT_BITS = 30
#: the base image and the last layer are summed in units of 2**-PIXEL_BITS of a pixel level
PIXEL_BITS = 36
#: the base image is clamped to +-BASE_CLAMP (in [0, 1] pixel units) before the residual is added
BASE_CLAMP = 32
_LATENT_MAX = 32000  # |int16 latent|: its two int8 halves stay inside -128..127
_W16_MAX = 32639  # |int16 weight| = 256 * 127 + 127: its halves stay inside -128..127
_RESIDUAL_MAX = 16  # |last layer's residual| bound, in pixel units (see int8_layers)


@dataclass(frozen=True)
class QConv:
    """One quantized convolution: int8 weights ``(k*k*C_in) x C_out`` in im2col order (kernel row,
    kernel column, channel), integer bias ``B`` (accumulator units) and multipliers ``m`` (over
    ``2**MULT_BITS``), both int64.

    ``halves``: the input is int16 latent-grid values (two int8 products); otherwise uint8
    activations held as ``a - 128`` (``B`` includes the offset)."""

    w: Tensor
    bias: Tensor
    mult: Tensor
    kernel: int
    halves: bool

    def to(self, device: torch.device) -> QConv:
        """This layer's tensors on ``device``."""
        return QConv(self.w.to(device), self.bias.to(device), self.mult.to(device), self.kernel, self.halves)

    @cached_property
    def w_t(self) -> Tensor:
        """The weights transposed, ``C_out x (k*k*C_in)``, contiguous: made once per layer (the CPU
        path's channel-major products, :func:`small_conv`)."""
        return self.w.T.contiguous()


@dataclass(frozen=True)
class Int8Synthesis:
    """Everything the integer synthesis needs, derived once from a model.

    ``base_w``: ``M x 384`` int8, the inverse KLT's int16 weights as (high | low) halves;
    ``base_unit``, ``base_bias``: int64 per output channel, over ``2**PIXEL_BITS``, in 1/255 units;
    ``layers``: the three refinement layers (the last one's multipliers in 1/255 units).
    """

    base_w: Tensor
    base_unit: Tensor
    base_bias: Tensor
    layers: list[QConv]


def weight_scale(w: Tensor, top: float = 127.0) -> Tensor:
    """Per-output-channel scale of an integer weight: ``max |w| / top`` (1 for an all-zero channel).

    The decoder quantizes with it, and training's fake quantization uses the same definition."""
    s = w.detach().abs().flatten(1).amax(dim=1) / top
    return torch.where(s > 0, s, torch.ones_like(s))


def _halves(v: Tensor) -> tuple[Tensor, Tensor]:
    """Integers ``|v| <= 32639`` (int64) as ``256 * hi + lo`` with ``hi`` in -127..127, ``lo`` in -128..127."""
    lo = torch.remainder(v + 128, 256) - 128
    return torch.div(v - lo, 256, rounding_mode="floor"), lo


def int8_layers(model: KLTPS) -> Int8Synthesis:
    """``model``'s synthesis quantized as the module docstring says.

    Raises ``ValueError`` for an uncalibrated model or one whose worst case could overflow
    (export then refuses it).
    """
    from .klt import exact_weights

    act_max = model.int8_act_max.detach().double()
    if not bool((act_max > 0).all()):
        raise ValueError("int8 synthesis is not calibrated (act_max is zero)")
    (inverse, inv_scale), *refine = model._exact_convs()[:4]
    pixel = 2.0**PIXEL_BITS * 255.0  # one [0, 1] pixel unit on the summing grid

    # Inverse KLT: int16 weights per output channel.
    w, b = exact_weights(inverse, inv_scale)
    _on_cpu("inverse KLT", w, b)
    w = w.reshape(w.shape[0], -1)  # 192 x M
    s = weight_scale(w, _W16_MAX)
    hi, lo = _halves(torch.round(w / s[:, None]).long())
    base_w = torch.cat([hi, lo]).T.to(torch.int8).contiguous()  # M x 384
    base_unit = torch.round(s * 2.0**-LATENT_FRAC_BITS * pixel).long()
    base_bias = torch.round(b * pixel).long()
    # |sum over the latent of y * w| <= M * 32000 * 32639 < 2**37.
    if float(base_unit.abs().max()) * w.shape[1] * _LATENT_MAX * _W16_MAX >= 2.0**62:
        raise ValueError("int8 synthesis: the base image could overflow int64")

    layers = []
    in_unit = 2.0**-LATENT_FRAC_BITS
    for i, (conv, scale) in enumerate(refine):
        w, b = exact_weights(conv, scale)
        last = i == len(refine) - 1
        out_unit = 1.0 / 255.0 if last else float(act_max[i]) / 255.0
        layer = quantize_conv(w, b, in_unit=in_unit, halves=i == 0, out_unit=out_unit, name=f"synthesis layer {i + 1}")
        if last and float(_rescaled_max(layer).max()) * 2.0**-MULT_BITS >= _RESIDUAL_MAX * 255:
            raise ValueError(f"int8 synthesis layer {i + 1}: the residual could exceed {_RESIDUAL_MAX} pixels")
        layers.append(layer)
        in_unit = out_unit
    return Int8Synthesis(base_w, base_unit, base_bias, layers)


def _latent_int(y_hat: Tensor) -> Tensor:
    """The latent on its int16 grid (int64)."""
    y = torch.round(y_hat.double() * 2.0**LATENT_FRAC_BITS)
    return y.clamp_(-_LATENT_MAX, _LATENT_MAX).long()


def _rescale(v: Tensor, mult: Tensor, bits: int) -> Tensor:
    """``round(v * mult / 2**bits)``, halves up, in integers."""
    return torch.bitwise_right_shift(v * mult + (1 << (bits - 1)), bits)


# -- the reference: plain torch, any device -------------------------------------------------------


def _window(xp: Tensor) -> Tensor:
    """Padded ``N x H+2 x W+2 x C`` -> im2col rows ``(N*H*W) x 9C`` (kernel row, kernel column, channel).

    Row ``(b, i, j)`` is three runs of ``3C`` contiguous values, one per kernel row: one strided
    view of the padded input, copied once (several times faster than a loop here)."""
    n, hp, wp, c = xp.shape
    window = torch.as_strided(xp, (n, hp - 2, wp - 2, 3, 3 * c), (hp * wp * c, wp * c, c, wp * c, 1))
    return window.reshape(-1, 9 * c)


def _columns(x: Tensor, kernel: int, fill: int) -> Tensor:
    """``N x H x W x C`` -> im2col rows ``(N*H*W) x (k*k*C)``, padded with ``fill`` (same dtype)."""
    n, h, w, c = x.shape
    if kernel == 1:
        return x.reshape(-1, c)
    xp = torch.full((n, h + 2, w + 2, c), fill, dtype=x.dtype, device=x.device)
    xp[:, 1:-1, 1:-1] = x
    return _window(xp)


def _shuffle_ref(x: Tensor, r: int) -> Tensor:
    """Pixel shuffle by ``r`` in ``N x H x W x (C*r*r)`` layout (channel ``c * r * r + r * i + j``)."""
    n, h, w, cr = x.shape
    c = cr // (r * r)
    return x.reshape(n, h, w, c, r, r).permute(0, 1, 4, 2, 5, 3).reshape(n, r * h, r * w, c)


_INT_MM_EXACT: bool | None = None


def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` sums int8 products exactly on this CPU (checked once per process).

    oneDNN's int8 kernels are exact with VNNI or AMX.  Without them (AVX2 or AVX-512 without
    VNNI: Haswell to Skylake, AMD Zen 2/3) they multiply through ``vpmaddubsw``, which
    saturates a pair of products at 32767, so large weights against large activations come
    out wrong — a decoder that trusted them would decode another machine's tiles wrongly.
    The probe multiplies exactly that pattern (and random values) and compares."""
    global _INT_MM_EXACT
    if _INT_MM_EXACT is None:
        gen = torch.Generator().manual_seed(0)
        probes = [
            (torch.full((32, 64), 127, dtype=torch.int8), torch.full((64, 16), 127, dtype=torch.int8)),
            (torch.full((32, 64), -128, dtype=torch.int8), torch.full((64, 16), -128, dtype=torch.int8)),
            (
                torch.randint(-128, 128, (48, 288), dtype=torch.int8, generator=gen),
                torch.randint(-128, 128, (288, 24), dtype=torch.int8, generator=gen),
            ),
        ]
        _INT_MM_EXACT = all(torch.equal(torch._int_mm(a, b).long(), _matmul_ref(a, b)) for a, b in probes)
    return _INT_MM_EXACT


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """int8 ``a`` (rows x K) times int8 ``b`` (K x N), exactly, as int32 (CPU).

    ``torch._int_mm`` where it is exact (:func:`int_mm_is_exact`); otherwise a float32 product
    of the same integers, exact too: ``K <= 1024`` products of at most 2**14 keep every partial
    sum an integer below 2**24, whatever the order (float64 if float32 products may run at
    reduced precision, or for larger K).  Same result, a few times slower."""
    if int_mm_is_exact():
        return torch._int_mm(a, b)
    if a.shape[1] <= 1024 and torch.get_float32_matmul_precision() == "highest":
        return (a.float() @ b.float()).to(torch.int32)
    return _matmul_ref(a, b).to(torch.int32)


def _matmul_ref(a: Tensor, b: Tensor) -> Tensor:
    # Products of integers summed in float64 are exact while every partial sum stays below 2**53
    # (int8 and int16 values at these sizes): any device, any order, independent of torch._int_mm.
    return (a.double() @ b.double()).long()


def reference(model: KLTPS, y_hat: Tensor, layers: Int8Synthesis | None = None) -> Tensor:
    """The integer synthesis in plain torch: float64 ``B x M x h x w`` latents -> uint8 ``B x 3 x 8h x 8w``.

    ``layers``: ``int8_layers(model)``, if already built."""
    from .klt import BLOCK

    dev = y_hat.device
    q = layers if layers is not None else int8_layers(model)
    yq = _latent_int(y_hat).permute(0, 2, 3, 1)  # N x h x w x M
    n, h, w, m = yq.shape
    w16 = q.base_w[:, :192].long() * 256 + q.base_w[:, 192:].long()  # M x 192
    base = _matmul_ref(yq.reshape(-1, m), w16.to(dev)) * q.base_unit.to(dev) + q.base_bias.to(dev)
    limit = BASE_CLAMP * 255 << PIXEL_BITS
    base = _shuffle_ref(base.clamp_(-limit, limit).reshape(n, h, w, -1), BLOCK)  # N x 8h x 8w x 3
    x, fill = yq, 0
    for i, layer in enumerate(q.layers):
        wl, bl, ml = (t.to(dev) for t in (layer.w, layer.bias, layer.mult))
        acc = _matmul_ref(_columns(x, 3, fill), wl) + bl
        if i < len(q.layers) - 1:
            a = _rescale(acc, ml, MULT_BITS).clamp_(0, 255) - 128
            x, fill = _shuffle_ref(a.reshape(*x.shape[:3], -1), 2), -128
        else:
            res = (acc * ml) << (PIXEL_BITS - MULT_BITS)
            res = _shuffle_ref(res.reshape(*x.shape[:3], -1), 2)
    out = _rescale(base + res, torch.ones((), dtype=torch.int64, device=dev), PIXEL_BITS).clamp_(0, 255)
    return out.to(torch.uint8).permute(0, 3, 1, 2)


# -- the CPU path: int8 GEMMs and fused numba kernels ---------------------------------------------


@numba.njit(cache=False, nogil=True, inline="always")
def _round_shift(v: Any, mult: Any, bits: int) -> Any:  # pragma: no cover - compiled
    """:func:`_rescale` for one int64: ``round(v * mult / 2**bits)``, halves up."""
    return (v * mult + (np.int64(1) << (bits - 1))) >> bits


@numba.njit(cache=False, nogil=True, inline="always")
def _latent_halves(y: float) -> tuple[int, int]:  # pragma: no cover - compiled
    """One latent value -> the (high, low) int8 halves of its int16 grid value (as :func:`_latent_int`)."""
    v = int(min(max(np.rint(y * float(1 << LATENT_FRAC_BITS)), -_LATENT_MAX), _LATENT_MAX))
    lo = ((v + 128) & 255) - 128
    return (v - lo) >> 8, lo


@numba.njit(cache=False, nogil=True)
def _latent_planes(y: Any, planes: Any) -> None:  # pragma: no cover - compiled
    """float64 ``N x M x h x w`` latents -> ``planes[0]`` (high) and ``planes[1]`` (low) int8 halves
    of the int16 latent, ``N x h+2 x w+2 x M`` each with a zero border (as :func:`_latent_int`)."""
    n, m, h, w = y.shape
    for b in range(n):
        for i in range(h):
            for j in range(w):  # position by position: contiguous writes, strided reads (faster here)
                hi_row, lo_row = planes[0, b, i + 1, j + 1], planes[1, b, i + 1, j + 1]
                for c in range(m):
                    hi_row[c], lo_row[c] = _latent_halves(y[b, c, i, j])


@numba.njit(cache=False, nogil=True)
def _requant(  # pragma: no cover - compiled
    acc: Any, halves: bool, bias: Any, mult: Any, n: int, h: int, w: int, out: Any
) -> None:
    """``clamp(round((acc + B) * m), 0, 255) - 128``, 2x-shuffled into the interior of padded ``out``
    (``acc``'s columns, ``B`` and ``m`` in :func:`_shuffle_order`).

    With ``halves`` the accumulator is ``256 * acc[:R] + acc[R:]`` (the latent's two halves)."""
    rows = n * h * w
    c = acc.shape[1] // 4
    for b in range(n):
        for i in range(h):
            for s in range(2):
                for j in range(w):
                    r = (b * h + i) * w + j
                    for t in range(2):
                        dst = out[b, 1 + 2 * i + s, 1 + 2 * j + t]
                        for ch in range(c):
                            k = (s * 2 + t) * c + ch
                            v = np.int64(acc[r, k])
                            if halves:
                                v = v * 256 + acc[rows + r, k]
                            v = _round_shift(v + bias[k], mult[k], MULT_BITS)
                            dst[ch] = min(max(v, 0), 255) - 128


def _shuffle_order(c: int) -> Any:
    """The CPU path's column order for a layer followed by a 2x pixel shuffle to ``c`` channels:
    (shuffle row, shuffle column, channel), so the values one output position takes are contiguous."""
    return np.array([ch * 4 + i * 2 + j for i in range(2) for j in range(2) for ch in range(c)])


#: the CPU path's column order for the inverse KLT: (block row, column, channel), so one block
#: row's 8 pixels x 3 channels are contiguous as in the output image
_BASE_ORDER = np.array([c * 64 + i * 8 + j for i in range(8) for j in range(8) for c in range(3)])


@numba.njit(cache=False, nogil=True)
def _final(
    acc: Any, bias: Any, mult: Any, base: Any, unit: Any, base_bias: Any, n: int, lh: int, lw: int, out: Any
) -> None:  # pragma: no cover - compiled
    """Pixels: base image plus the last layer, rounded from the ``2**-PIXEL_BITS`` grid, ``N x 8lh x 8lw x 3``.

    ``acc``: the last layer's ``(N * 4lh * 4lw) x 12`` accumulators, columns in ``_shuffle_order(3)``;
    ``base``: the inverse KLT's ``2Q x 384`` products of the latent halves (``Q = N * lh * lw``
    positions; high/low latent half x high/low weight half), each half's 192 columns in
    ``_BASE_ORDER``; ``bias``, ``mult``, ``unit`` and ``base_bias`` in the same orders.
    """
    q_rows = n * lh * lw
    limit = np.int64(BASE_CLAMP * 255) << PIXEL_BITS
    one = np.int64(1)
    rows = out.reshape(n, 8 * lh, 24 * lw)
    pix = np.empty(192, np.int64)  # one block's base image, clamped
    res = np.empty(12, np.int64)  # one last-layer position's residuals: a 2 x 2 pixel pair
    for b in range(n):
        for bi in range(lh):
            for bj in range(lw):
                q = (b * lh + bi) * lw + bj
                hi, lo = base[q], base[q_rows + q]
                for kb in range(192):
                    p = np.int64(hi[kb]) * 65536 + (np.int64(hi[192 + kb]) + lo[kb]) * 256 + lo[192 + kb]
                    pix[kb] = min(max(p * unit[kb] + base_bias[kb], -limit), limit)
                for sy in range(4):
                    r0 = (b * 4 * lh + 4 * bi + sy) * 4 * lw + 4 * bj
                    for sx in range(4):
                        a = acc[r0 + sx]
                        for k in range(12):
                            res[k] = ((np.int64(a[k]) + bias[k]) * mult[k]) << (PIXEL_BITS - MULT_BITS)
                        for dy in range(2):
                            dst = rows[b, 8 * bi + 2 * sy + dy, 24 * bj + 6 * sx : 24 * bj + 6 * sx + 6]
                            src = pix[(2 * sy + dy) * 24 + 6 * sx :]
                            for u in range(6):
                                v = _round_shift(src[u] + res[6 * dy + u], one, PIXEL_BITS)
                                dst[u] = min(max(v, 0), 255)


@numba.njit(cache=False, nogil=True)
def _im2col(xp: Any, out: Any) -> None:  # pragma: no cover - compiled
    """:func:`_window` into ``out``, compiled: each row is three contiguous runs of ``3C`` values of
    the padded input (about twice as fast as torch's strided copy of the same view)."""
    n, hp, wp, c = xp.shape
    run = 3 * c
    rows = xp.reshape(n, hp, wp * c)
    r = 0
    for b in range(n):
        for i in range(hp - 2):
            for j in range(wp - 2):
                for dy in range(3):
                    src = rows[b, i + dy, j * c : j * c + run]
                    dst = out[r, dy * run : (dy + 1) * run]
                    for k in range(run):
                        dst[k] = src[k]
                r += 1


def _conv(xp: Any, w: Tensor) -> Any:
    """3x3 convolution of padded int8 ``xp`` (numpy) with im2col weights ``w``: int32 ``(N*H*W) x C_out``."""
    n, hp, wp, c = xp.shape
    cols = np.empty((n * (hp - 2) * (wp - 2), 9 * c), np.int8)
    _im2col(xp, cols)
    return _mm(torch.from_numpy(cols), w).numpy()


def synthesizer(model: KLTPS, device: torch.device) -> Callable[[Tensor], Tensor]:
    """The integer synthesis as ``exact_synthesizer`` returns it: float64 ``B x M x h x w`` -> uint8
    ``B x 3 x 8h x 8w``.  CPU: int8 GEMMs and numba kernels; other devices: :func:`reference`."""
    q = int8_layers(model)
    if device.type != "cpu":
        return lambda y_hat: reference(model, y_hat, q)
    base_w = torch.cat([q.base_w[:, _BASE_ORDER], q.base_w[:, 192 + _BASE_ORDER]], 1).contiguous()
    base_unit, base_bias = q.base_unit.numpy()[_BASE_ORDER], q.base_bias.numpy()[_BASE_ORDER]
    orders = [_shuffle_order(x.w.shape[1] // 4) for x in q.layers]
    (w1, w2, w3) = (x.w[:, o].contiguous() for x, o in zip(q.layers, orders, strict=True))
    (b1, b2, b3) = (x.bias.numpy()[o] for x, o in zip(q.layers, orders, strict=True))
    (m1, m2, m3) = (x.mult.numpy()[o] for x, o in zip(q.layers, orders, strict=True))

    def run(y_hat: Tensor) -> Tensor:
        y = np.ascontiguousarray(y_hat.detach().cpu().double().numpy())
        n, m, h, w = y.shape
        planes = np.zeros((2, n, h + 2, w + 2, m), np.int8)
        _latent_planes(y, planes)
        rows = np.ascontiguousarray(planes[:, :, 1:-1, 1:-1]).reshape(-1, m)  # unpadded: a faster shape
        base = _mm(torch.from_numpy(rows), base_w).numpy()
        acc = _conv(planes.reshape(2 * n, h + 2, w + 2, m), w1)
        x1 = np.full((n, 2 * h + 2, 2 * w + 2, acc.shape[1] // 4), -128, np.int8)
        _requant(acc, True, b1, m1, n, h, w, x1)
        acc = _conv(x1, w2)
        x2 = np.full((n, 4 * h + 2, 4 * w + 2, acc.shape[1] // 4), -128, np.int8)
        _requant(acc, False, b2, m2, n, 2 * h, 2 * w, x2)
        acc = _conv(x2, w3)
        out = np.empty((n, 8 * h, 8 * w, 3), np.uint8)
        _final(acc, b3, m3, base, base_unit, base_bias, n, h, w, out)
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    run(torch.zeros(1, model.M, 2, 2, dtype=torch.float64))  # compile the kernels now, not in a request
    return run


# -- the entropy model's small layers: hyper-synthesis and context ---------------------------------
#
# Built from the same pieces in plain torch (they are small: one 256² tile's hyper-synthesis and
# context make ~30 M multiply-adds, against ~190 M in the synthesis), with the same exactness:
# integer products and sums, integer rescaling, outputs that are integers over 2**VALUE_BITS.

#: means, log-scales and context corrections are multiples of 2**-VALUE_BITS
VALUE_BITS = 10


def _on_cpu(name: str, *tensors: Tensor) -> None:
    """Integer layers are built on the CPU for every device (``klt.exact_weights`` returns CPU
    tensors): CUDA divides a tensor by a scalar as a product with the scalar's reciprocal, which
    rounds differently, and layers built there once decoded 5 of 16 q4 tiles differently."""
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"int8 {name}: integer layers are built from CPU tensors, got one on {t.device}")


def quantize_conv(w: Tensor, b: Tensor, *, in_unit: float, halves: bool, out_unit: float, name: str) -> QConv:
    """Quantize float64 grid weights ``w`` (``C_out x C_in x k x k``) and bias ``b`` for inputs in
    units of ``in_unit`` and outputs in units of ``out_unit``; raises ``ValueError`` if a worst-case
    sum could overflow, or for weights off the CPU (see :func:`_on_cpu`)."""
    _on_cpu(name, w, b)
    s = weight_scale(w)
    wq = torch.round(w / s[:, None, None, None])
    unit = s * in_unit
    bias = torch.round(b / unit) + (0 if halves else 128) * wq.sum(dim=(1, 2, 3))
    mult = torch.round(unit / out_unit * 2.0**MULT_BITS)
    if bool((mult <= 0).any()):
        raise ValueError(f"int8 {name}: a multiplier underflows 2**-{MULT_BITS}")
    w_mat = wq.permute(2, 3, 1, 0).reshape(-1, wq.shape[0]).to(torch.int8).contiguous()
    layer = QConv(w_mat, bias.long(), mult.long(), w.shape[-1], halves)
    if float(layer.w.double().abs().sum(dim=0).max()) * 128 >= 2.0**31 or float(_rescaled_max(layer).max()) >= 2.0**62:
        raise ValueError(f"int8 {name}: a sum could overflow")
    return layer


def _rescaled_max(layer: QConv) -> Tensor:
    """Per output channel, the worst case of ``|acc + B| * m`` over any input (integers over ``2**MULT_BITS``)."""
    in_max = _LATENT_MAX if layer.halves else 255
    return (layer.w.double().abs().sum(dim=0) * in_max + layer.bias.abs()) * layer.mult


def accumulate(x: Tensor, w: Tensor, kernel: int, halves: bool) -> Tensor:
    """The int64 sums ``(N*H*W) x C_out`` of a quantized convolution without its bias (reference).

    ``x``: ``N x H x W x C``; int16 latent-grid values as int64 when ``halves``, else int8 ``a - 128``."""
    if not halves:
        return _matmul_ref(_columns(x, kernel, -128), w)
    hi, lo = _halves(x)
    both = _matmul_ref(_columns(torch.cat([hi, lo]).to(torch.int8), kernel, 0), w)
    rows = both.shape[0] // 2
    return both[:rows] * 256 + both[rows:]


def activation(acc: Tensor, layer: QConv) -> Tensor:
    """ReLU output on uint8, held as int8 ``a - 128``: ``clamp(round((acc + B) * m), 0, 255) - 128``."""
    return (_rescale(acc + layer.bias, layer.mult, MULT_BITS).clamp_(0, 255) - 128).to(torch.int8)


def values(acc: Tensor, layer: QConv) -> Tensor:
    """Outputs as float64 multiples of ``2**-VALUE_BITS`` (exact: integers below 2**53 scaled by a power of 2)."""
    return _rescale(acc + layer.bias, layer.mult, MULT_BITS).double() * 2.0**-VALUE_BITS


def small_conv_reference(
    x: Tensor, first: QConv, second: QConv, *, limit: float = math.inf, shuffle: bool = False
) -> Tensor:
    """Float64 ``N x C x H x W`` latent-grid input -> quantized 3x3 -> uint8 -> quantized 1x1 ->
    float64 ``N x C' x H x W`` values clamped to +-``limit``, in plain torch (any device): the
    context network, and with ``shuffle`` (a 2x pixel shuffle after each layer) the hyper-synthesis."""
    n, c, h, w = x.shape
    width = first.w.shape[1]
    if c:
        acc = accumulate(latent_nhwc(x), first.w, 3, True)
    else:  # nothing decoded yet: the layer is its bias
        acc = torch.zeros(n * h * w, width, dtype=torch.int64, device=x.device)
    a = activation(acc, first).reshape(n, h, w, width)
    if shuffle:
        a, h, w = _shuffle_ref(a, 2), 2 * h, 2 * w
    out = values(accumulate(a, second.w, 1, False), second).clamp_(-limit, limit)
    out = out.reshape(n, h, w, -1).permute(0, 3, 1, 2)
    return F.pixel_shuffle(out, 2) if shuffle else out


@numba.njit(cache=False, nogil=True)
def _hidden(acc: Any, bias: Any, mult: Any, out: Any) -> None:  # pragma: no cover - compiled
    """``acc``: ``2R x C`` int32 sums of the high and low latent halves -> ``R x C`` int8 ``a - 128``."""
    rows, c = out.shape
    for r in range(rows):
        for k in range(c):
            v = _round_shift(np.int64(acc[r, k]) * 256 + acc[rows + r, k] + bias[k], mult[k], MULT_BITS)
            out[r, k] = min(max(v, 0), 255) - 128


@numba.njit(cache=False, nogil=True, inline="always")
def _value(acc: Any, bias: Any, mult: Any, limit: float) -> Any:  # pragma: no cover - compiled
    """One int32 sum -> its output on the ``2**-VALUE_BITS`` grid, clamped to +-``limit`` (as :func:`values`)."""
    v = _round_shift(np.int64(acc) + bias, mult, MULT_BITS)
    return min(max(v * 2.0**-VALUE_BITS, -limit), limit)


@numba.njit(cache=False, nogil=True)
def _values(acc: Any, bias: Any, mult: Any, limit: float, shuffle: bool, out: Any) -> None:  # pragma: no cover
    """``acc``: ``C x (N*h*w)`` int32 (channel-major) -> float64 multiples of 2**-VALUE_BITS, clamped to
    +-``limit``, into ``out``: ``N x C x h x w``, or with ``shuffle`` ``N x C/4 x 2h x 2w`` (a 2x pixel shuffle)."""
    n = out.shape[0]
    c = acc.shape[0]
    hw = acc.shape[1] // n
    w = out.shape[3] // 2 if shuffle else out.shape[3]
    h = hw // w if w else 0
    for b in range(n):
        for k in range(c):
            bk, mk = bias[k], mult[k]
            src = acc[k, b * hw : (b + 1) * hw]
            if shuffle:
                dst = out[b, k >> 2]
                di, dj = (k >> 1) & 1, k & 1
                for i in range(h):
                    for j in range(w):
                        dst[2 * i + di, 2 * j + dj] = _value(src[i * w + j], bk, mk, limit)
            else:
                plane = out[b, k]
                for i in range(h):
                    for j in range(w):
                        plane[i, j] = _value(src[i * w + j], bk, mk, limit)


def small_conv(x: Tensor, first: QConv, second: QConv, *, limit: float = math.inf, shuffle: bool = False) -> Tensor:
    """:func:`small_conv_reference`, on CPU as numba kernels around two int8 products (other devices
    run the reference itself).  ``shuffle``: a 2x pixel shuffle after each layer (the hyper-synthesis)."""
    if x.device.type != "cpu":
        return small_conv_reference(x, first, second, limit=limit, shuffle=shuffle)
    y = np.ascontiguousarray(x.numpy())
    n, c, h, w = y.shape
    width = first.w.shape[1]
    if c:
        planes = np.zeros((2, n, h + 2, w + 2, c), np.int8)
        _latent_planes(y, planes)
        acc = _conv(planes.reshape(2 * n, h + 2, w + 2, c), first.w)
    else:  # nothing decoded yet: the layer is its bias
        acc = np.zeros((2 * n * h * w, width), np.int32)
    hidden = np.empty((n * h * w, width), np.int8)
    _hidden(acc, first.bias.numpy(), first.mult.numpy(), hidden)
    a = torch.from_numpy(hidden)
    if shuffle:
        a = _shuffle_ref(a.reshape(n, h, w, width), 2).reshape(-1, width // 4)
        h, w = 2 * h, 2 * w
    # The second layer's sums channel-major (its weights times the hidden layer, transposed), so
    # that _values reads each output channel contiguously.
    acc = _mm(second.w_t, a.T).numpy()
    c_out = second.w.shape[1]
    out = np.empty((n, c_out // 4, 2 * h, 2 * w) if shuffle else (n, c_out, h, w))
    _values(acc, second.bias.numpy(), second.mult.numpy(), limit, shuffle, out)
    return torch.from_numpy(out)


def latent_nhwc(x: Tensor) -> Tensor:
    """Float64 ``N x C x H x W`` -> int16 latent-grid values as int64, ``N x H x W x C``."""
    return _latent_int(x).permute(0, 2, 3, 1)
