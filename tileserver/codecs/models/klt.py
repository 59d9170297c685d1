"""Transform coder started from the KLT of 8x8 RGB blocks, refined by training.

At the rates where pathology tiles keep SSIM 0.93-0.98 (2-4 bits per pixel) a
codec needs a nearly complete latent: the stride-16 factorized model could not
pass SSIM 0.89 even with unquantized latents.  This architecture therefore
keeps a stride-8 latent of ``M`` channels and starts from the closed-form
optimum for a linear coder, the Karhunen-Loève transform (PCA) of 8x8x3 blocks
of the training tissue, scaled by the quantization step ``step``:

* analysis ``g_a``: ``y = (K x + r_a(K x)) / step``; ``K`` is an 8x8 stride-8
  convolution initialised to the top ``M`` principal directions, ``r_a`` two
  3x3 convolutions at latent resolution whose output starts at zero;
* entropy model: CompressAI's factorized ``EntropyBottleneck``;
* synthesis: ``x = P(step * y) + r_s(step * y)``; ``P`` is a 1x1 convolution to
  192 channels and an 8x pixel shuffle (the inverse KLT at initialisation),
  ``r_s`` three 3x3 convolution + 2x pixel shuffle stages with ReLU (as in
  ``factorized.py``) whose last layer starts at zero.

Training from that point (``python -m tileserver.train``, ``init = "pca"``)
starts from a codec already between JPEG and JPEG-XL on held-out tissue and
only has to learn the non-linear part, which on two CPU cores is the
difference between minutes and days.

Exact decoding.  As in ``factorized.py`` the synthesis runs in float64 on
fixed grids, with finer weights (the KLT basis times a small step needs them):
weights and biases are multiples of ``2**-WEIGHT_BITS``, activations multiples of
``2**-ACT_BITS`` with ``|a| < 2**ACT_RANGE_BITS``, so every product is a multiple
of ``2**-30``.  A layer whose outputs sum ``T`` products may have weights
``|w| < 2**(12 - ceil(log2 T))`` and biases ``|b| < 2**BIAS_RANGE_BITS``: every
partial sum then stays below ``2**22 + 2**12 < 2**23`` and needs at most 53
significant bits, which float64 holds exactly whatever the summation order.
So batch, threads and device cannot change a pixel, nor a scale index.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from torch import Tensor, nn

from .factorized import FactorizedPrior, _SubPixel, _to_grid
from .int8 import LATENT_FRAC_BITS, weight_scale

__all__ = [
    "ACT_BITS",
    "ACT_RANGE_BITS",
    "BIAS_RANGE_BITS",
    "BLOCK",
    "KLTPS",
    "SCALE_LEVELS",
    "SCALE_LOG_MIN",
    "SCALE_LOG_STEP",
    "SCALE_LOG_TABLE",
    "WEIGHT_BITS",
    "KLTHyper",
    "exact_weights",
    "fit_klt",
    "image_blocks",
    "round_about",
    "scale_indexes",
]

#: block side of the transform (the latent stride)
BLOCK = 8
WEIGHT_BITS = 20
ACT_BITS = 10
ACT_RANGE_BITS = 10
BIAS_RANGE_BITS = 12
_B_MAX = 2.0**BIAS_RANGE_BITS - 2.0**-WEIGHT_BITS
_A_MAX = 2.0**ACT_RANGE_BITS - 2.0**-ACT_BITS
_MAX_TERMS = 2**11


def _w_max(conv: nn.Conv2d) -> float:
    """Largest exact weight of ``conv`` (see the module docstring): 2**(12 - ceil(log2 T)), T terms per sum."""
    terms = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return 2.0 ** (12 - math.ceil(math.log2(terms))) - 2.0**-WEIGHT_BITS


class _Analysis(nn.Module):
    def __init__(self, M: int, N: int, step: float) -> None:
        super().__init__()
        self.step = step
        self.klt = nn.Conv2d(3, M, BLOCK, stride=BLOCK)
        self.r1 = nn.Conv2d(M, N, 3, padding=1)
        self.r2 = nn.Conv2d(N, M, 3, padding=1)
        nn.init.zeros_(self.r2.weight)
        nn.init.zeros_(_bias(self.r2))

    def features(self, x: Tensor) -> Tensor:
        """The analysis before its division by the quantization step (``models/encoder.py`` adds to it)."""
        c: Tensor = self.klt(x)
        out: Tensor = c + self.r2(F.relu(self.r1(c)))
        return out

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.features(x) / self.step
        return out


class KLTPS(FactorizedPrior, nn.Module):
    """KLT-initialised stride-8 transform coder (see the module docstring).

    ``M``: latent channels (at most 192); ``N``: width of the analysis refinement;
    ``widths``: widths of the synthesis refinement's first two stages; ``step``:
    quantization step in KLT units (smaller is higher quality); ``int8``: decode the
    refinement in int8 (``int8.py``; training and evaluation then see that quantization).
    """

    stride = BLOCK
    #: the int8 synthesis's two activation ranges (a buffer; only in models built with ``int8``)
    int8_act_max: Tensor

    def __init__(
        self,
        M: int = 96,
        N: int = 64,
        widths: tuple[int, ...] | list[int] = (24, 16),
        step: float = 0.1,
        int8: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 2:
            raise ValueError(f"widths must have 2 entries, got {widths}")
        if not 1 <= M <= 3 * BLOCK * BLOCK:
            raise ValueError(f"M must be 1..{3 * BLOCK * BLOCK}, got {M}")
        if 9 * max(M, N, *widths) > _MAX_TERMS:
            raise ValueError("too many channels for exact float64 synthesis")
        self.config: dict[str, Any] = {"M": int(M), "N": int(N), "widths": list(widths), "step": float(step)}
        self.M = int(M)
        self.step = float(step)
        self.g_a: _Analysis = _Analysis(self.M, int(N), self.step)
        self.entropy_bottleneck = EntropyBottleneck(self.M)
        self.inverse = nn.Conv2d(self.M, 3 * BLOCK * BLOCK, 1)
        chans = [self.M, *widths, 3]
        self.g_s = nn.ModuleList(_SubPixel(chans[i], chans[i + 1]) for i in range(3))
        last = self.g_s[-1]
        assert isinstance(last, _SubPixel)
        nn.init.zeros_(last.conv.weight)
        nn.init.zeros_(last.bias)
        self.int8 = bool(int8)
        if self.int8:
            # Older models' configs and state dicts stay as they were: the key exists only when set.
            self.config["int8"] = True
            self.register_buffer("int8_act_max", torch.zeros(2))

    # -- initialisation ---------------------------------------------------
    @torch.no_grad()
    def init_klt(self, mean: npt.NDArray[np.float64], basis: npt.NDArray[np.float64]) -> None:
        """Set the analysis and inverse to the KLT ``basis`` (``192 x >=M`` columns) about ``mean``."""
        v = torch.from_numpy(np.ascontiguousarray(basis[:, : self.M])).float()  # 192 x M
        mu = torch.from_numpy(mean).float()
        # Block vectors are ordered (row, column, channel); convolution weights are (channel, row, column).
        self.g_a.klt.weight.copy_(v.T.reshape(self.M, BLOCK, BLOCK, 3).permute(0, 3, 1, 2))
        _bias(self.g_a.klt).copy_(-(mu @ v))
        # pixel_shuffle(8) reads channel c * 64 + row * 8 + column.
        w = v.reshape(BLOCK, BLOCK, 3, self.M).permute(2, 0, 1, 3).reshape(3 * BLOCK * BLOCK, self.M)
        self.inverse.weight.copy_(w[:, :, None, None])
        _bias(self.inverse).copy_(mu.reshape(BLOCK, BLOCK, 3).permute(2, 0, 1).reshape(-1))

    # -- training ---------------------------------------------------------
    def synthesize(self, y_hat: Tensor) -> Tensor:
        """Float synthesis used in training: latents -> image in [0, 1] (unclamped).

        An ``int8`` model, once calibrated, sees its decoder's quantization here (rounded
        inputs, int8 weights per channel, uint8 activations; straight-through gradients).
        """
        u = y_hat * self.step
        quant = self.int8 and self._int8_ready()
        r = _fake_quant(y_hat, 2.0**-LATENT_FRAC_BITS) * self.step if quant else u
        for i, stage in enumerate(self.g_s):
            assert isinstance(stage, _SubPixel)
            r = F.pixel_shuffle(self._conv_q(stage.conv, r, quant), 2)
            if i < len(self.g_s) - 1:
                r = self._act_q(F.relu(r), "int8_act_max", i) if self.int8 else F.relu(r)
        return F.pixel_shuffle(self.inverse(u), BLOCK) + r

    # -- int8 decoding, as training sees it ---------------------------------
    _calibrating = False
    _ready: bool | None = None  # cached: reading the buffers would sync a GPU in every layer

    def _int8_ranges(self) -> list[tuple[Tensor, list[int]]]:
        """Each int8 activation-range buffer and the entries of it that decoding uses."""
        return [(self.int8_act_max, [0, 1])] if self.int8 else []

    def _int8_ready(self) -> bool:
        """Whether every range decoding uses is calibrated (never while calibrating: the float model
        is measured then)."""
        if self._calibrating:
            return False
        if self._ready is None:
            ranges = self._int8_ranges()
            self._ready = bool(ranges) and all(bool((buf[used] > 0).all()) for buf, used in ranges)
        return self._ready

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._ready = None  # the ranges may change with the state
        super()._load_from_state_dict(*args, **kwargs)

    @staticmethod
    def _conv_q(conv: nn.Conv2d, x: Tensor, quant: bool) -> Tensor:
        """``conv(x)``, with its weights fake-quantized to int8 per output channel when ``quant``."""
        if not quant:
            out: Tensor = conv(x)
            return out
        return F.conv2d(x, _fake_quant_weight(conv.weight), conv.bias, padding=conv.padding)

    def _act_q(self, x: Tensor, buffer: str, i: int) -> Tensor:
        """A ReLU output: its maximum recorded (calibration), or rounded to uint8 on ``[0, max]``."""
        a_max = getattr(self, buffer)
        if self._calibrating:
            a_max[i] = torch.maximum(a_max[i], x.detach().max())
            return x
        if not self._int8_ready():
            return x
        return _fake_quant(torch.minimum(x, a_max[i]), a_max[i] / 255.0)

    @torch.no_grad()
    def calibrate_int8_(self, images: Tensor, chunk: int = 4) -> None:
        """Set every int8 activation range to the largest value the float model produces on
        ``images`` (``B x 3 x H x W`` in [0, 1]), latents rounded as coding rounds them."""
        ranges = self._int8_ranges()
        if not ranges:
            raise ValueError("calibrate_int8_ needs a model built with int8 (or int8_entropy) = true")
        for buf, _ in ranges:
            buf.zero_()
        was_training = self.training
        self.eval()
        self._calibrating = True
        try:
            for i in range(0, images.shape[0], chunk):
                self.forward(images[i : i + chunk])
        finally:
            self._calibrating = False
            self._ready = None
            self.train(was_training)
        if not self._int8_ready():
            raise ValueError("int8 calibration: a layer's activations were all zero on these images")

    def forward(self, x: Tensor) -> dict[str, Any]:
        """Training pass: noisy latents, reconstruction and likelihoods."""
        y = self.g_a(x)
        _, likelihoods = self.entropy_bottleneck(y)
        # The rate sees additive noise, the synthesis the rounded latent (straight-through
        # gradient), as decoding will: at these rates most channels round to their median,
        # which noise would not show (Minnen & Singh 2020, "mixed" quantization).
        medians = self.entropy_bottleneck._get_medians().detach()
        y_hat = y + (torch.round(y - medians) + medians - y).detach()
        return {"x_hat": self.synthesize(y_hat), "likelihoods": likelihoods}

    # -- exact inference --------------------------------------------------
    def _grid_layers(self) -> list[tuple[Tensor, Tensor]]:
        # The step is folded into the first layers, whose input is then the latent itself.
        return [exact_weights(conv, scale) for conv, scale in KLTPS._exact_convs(self)]

    def _synthesis_convs(self) -> list[nn.Conv2d]:
        return [self.inverse] + [s.conv for s in self.g_s if isinstance(s, _SubPixel)]

    def _exact_convs(self) -> list[tuple[nn.Conv2d, float]]:
        """Every convolution the exact decoder runs, with the scale folded into its weights.

        Subclasses add theirs: range checks and snapping at export cover exactly this list.
        """
        return [(c, self.step if i <= 1 else 1.0) for i, c in enumerate(self._synthesis_convs())]

    def _check_ranges(self) -> None:
        # Snapping clamps silently; a trained weight outside the grid's range would decode
        # differently from the float model, so refuse to export it.
        for conv, scale in self._exact_convs():
            w_limit = _w_max(conv)
            if float(conv.weight.detach().abs().max()) * scale > w_limit:
                raise ValueError(f"a {tuple(conv.weight.shape)} weight exceeds the exact-decoding range {w_limit:g}")
            if float(_bias(conv).detach().abs().max()) > _B_MAX:
                raise ValueError(f"a {tuple(conv.weight.shape)} bias exceeds the exact-decoding range {_B_MAX:g}")

    @torch.no_grad()
    def snap_synthesis_(self) -> None:
        """Put every exactly decoded convolution's weights on its grid, in place (export)."""
        self._check_ranges()
        self._check_int8()
        for conv, scale in self._exact_convs():
            w, b = exact_weights(conv, scale)
            conv.weight.copy_((w / scale).float())
            _bias(conv).copy_(b.float())

    def _check_int8(self) -> None:
        """Build the integer layers once: they refuse an uncalibrated model or a sum that could overflow."""
        if self.int8:
            from .int8 import int8_layers

            int8_layers(self)

    def exact_synthesizer(self, device: torch.device) -> Callable[[Tensor], Tensor]:
        """Order-independent synthesis: float64 latents ``B x M x h x w`` -> uint8 ``B x 3 x 8h x 8w``."""
        if self.int8:
            from .int8 import synthesizer

            return synthesizer(self, device)
        layers = [(w.to(device), b.to(device)) for w, b in self._grid_layers()]
        # The inverse's 8x shuffle, re-ordered so that a 4x shuffle lands it in the layout of the
        # last stage before its 2x shuffle: the sum, rounding and uint8 conversion then happen
        # before the final shuffle, which moves bytes instead of doubles.
        perm = torch.tensor(
            [
                c * 64 + (2 * i + a) * 8 + (2 * j + b)
                for c in range(3)
                for a in range(2)
                for b in range(2)
                for i in range(4)
                for j in range(4)
            ],
            device=device,
        )
        w0, b0 = layers[0][0][perm], layers[0][1][perm]

        def run(y_hat: Tensor) -> Tensor:
            y = _to_grid(y_hat.double(), ACT_BITS, _A_MAX)
            base = F.pixel_shuffle(_conv(y, w0, b0, 0), BLOCK // 2)
            r = y
            for i, (w, b) in enumerate(layers[1:]):
                r = _conv(r, w, b, 1)
                if i < 2:
                    r = F.pixel_shuffle(_relu_grid_(r), 2)
            # One correctly rounded multiply per pixel: identical on every IEEE-754 machine.
            out = base.add_(r).mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
            return F.pixel_shuffle(out, 2)

        return run


def round_about(y: Tensor, means: Tensor, rounding: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``y`` rounded about ``means`` as the coder rounds it, with a straight-through gradient; or,
    given a relaxed ``rounding`` of the residuals (``refine.py``), ``means + rounding(y - means)``."""
    if rounding is None:
        return y + (torch.round(y - means) + means - y).detach()
    return means + rounding(y - means)


def _fake_quant_weight(w: Tensor) -> Tensor:
    """``w`` rounded to int8 per output channel as ``int8.quantize_conv`` rounds it (straight-through)."""
    return _fake_quant(w, weight_scale(w)[:, None, None, None])


def _fake_quant(x: Tensor, unit: Tensor | float) -> Tensor:
    """``x`` rounded to multiples of ``unit``, with a straight-through gradient."""
    return x + (torch.round(x / unit) * unit - x).detach()


def exact_weights(conv: nn.Conv2d, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``conv``'s weights (times ``scale``) and bias on the exact-decoding grid, float64, on the CPU.

    On the CPU whatever the model's device, so that everything built from them (the integer
    layers' scales, biases and multipliers) is the same arithmetic everywhere: CUDA divides a
    tensor by a scalar as a product with the scalar's reciprocal, which rounds differently, and
    a multiplier built there differed by one in a quality-4 channel, enough to change 5 of 16 tiles'
    pixels (bench/decode_gpu.py on an H200).  Callers move what they build to their device."""
    w = conv.weight.detach().cpu().double() * scale
    b = _bias(conv).detach().cpu().double()
    return _to_grid(w, WEIGHT_BITS, _w_max(conv)), _to_grid(b, WEIGHT_BITS, _B_MAX)


def _relu_grid_(x: Tensor) -> Tensor:
    """In place: ReLU, clamp to the activation range, round onto the activation grid (all exact)."""
    return x.clamp_(0.0, _A_MAX).mul_(2.0**ACT_BITS).round_().mul_(2.0**-ACT_BITS)


def _bias(conv: nn.Conv2d) -> Tensor:
    b = conv.bias
    if b is None:  # pragma: no cover - every convolution here has a bias
        raise RuntimeError("convolution without bias")
    return b


def _conv(x: Tensor, w: Tensor, b: Tensor | None, padding: int) -> Tensor:
    n, _, h, wd = x.shape
    if w.shape[-1] == 1:
        # A 1x1 convolution is one matrix product (about twice as fast as conv2d on CPU here).
        out = torch.matmul(w.reshape(w.shape[0], -1), x.reshape(n, x.shape[1], h * wd))
        return (out if b is None else out + b[:, None]).reshape(n, -1, h, wd)
    if x.device.type == "cpu":
        # CPU float64 convolution is im2col + GEMM, exact on these grids in any summation order;
        # channels-last input runs the synthesis's 3x3 layers about 25 % faster here
        # (bench/decode.py); the context's small layers (<= 32 channels at 32x32) run faster as they are.
        if x.shape[1] >= 64 or x.shape[2] * x.shape[3] >= 4096:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, w, b, padding=padding)
    # cuDNN may pick FFT/Winograd algorithms, which are not exact; im2col + GEMM is.
    k = w.shape[-1]
    cols = F.unfold(x, k, padding=padding)
    out = torch.matmul(w.reshape(w.shape[0], -1), cols)
    return (out if b is None else out + b[:, None]).reshape(n, -1, h, wd)


def fit_klt(
    blocks: npt.NDArray[np.floating[Any]],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """KLT of ``n x 192`` block vectors in [0, 1]: (mean, basis columns by falling variance, variances)."""
    p = np.asarray(blocks, dtype=np.float64)
    mean = p.mean(axis=0)
    cov = np.cov((p - mean).T)
    var, vec = np.linalg.eigh(cov)
    order = np.argsort(var)[::-1]
    return mean, vec[:, order], var[order]


def image_blocks(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """``n x H x W x 3`` uint8 (H, W multiples of 8) -> block vectors ordered (row, column, channel)."""
    n, h, w, c = images.shape
    a = images.astype(np.float64) / 255.0
    blocks = a.reshape(n, h // BLOCK, BLOCK, w // BLOCK, BLOCK, c).transpose(0, 1, 3, 2, 4, 5)
    return blocks.reshape(-1, BLOCK * BLOCK * c)


#: the Gaussian scale table: scale i is exp(SCALE_LOG_MIN + i * SCALE_LOG_STEP), i < SCALE_LEVELS
SCALE_LOG_MIN = round(math.log(0.11) * 2**16) / 2**16
SCALE_LOG_STEP = 0.125
SCALE_LEVELS = 58  # up to 0.11 * exp(57 / 8) = 137
SCALE_LOG_TABLE: tuple[float, ...] = tuple(SCALE_LOG_MIN + i * SCALE_LOG_STEP for i in range(SCALE_LEVELS))


def scale_indexes(log_scales: Any) -> Any:
    """Table index of each float64 log-scale: the smallest table scale not below it (exact arithmetic).

    Takes a tensor or a numpy array (the same IEEE operations, so the same indexes).
    """
    if isinstance(log_scales, np.ndarray):
        idx_np = np.ceil((log_scales - SCALE_LOG_MIN) * (1.0 / SCALE_LOG_STEP))
        return np.clip(idx_np, 0, SCALE_LEVELS - 1).astype(np.int32)
    idx = torch.ceil((log_scales - SCALE_LOG_MIN) * (1.0 / SCALE_LOG_STEP))
    return idx.clamp_(0, SCALE_LEVELS - 1).to(torch.int32)


class KLTHyper(KLTPS):
    """:class:`KLTPS` with a mean-scale hyperprior (Ballé et al. 2018, Minnen et al. 2018).

    The latent is coded as Gaussians whose means and scales a small hyper-synthesis
    predicts from a side latent ``z`` at stride 32 (coded by a factorized prior):
    glass, stroma and nuclei get their own densities instead of one per channel.
    The hyper-synthesis runs on the same exact grids as the synthesis, so the
    scale index of every symbol is identical on every machine.  ``H`` is the
    side latent's width; ``int8_entropy``: decode the hyper-synthesis (and a context model's
    networks) in integers (``int8.py``; training then sees that quantization).
    """

    #: the int8 hyper-synthesis's activation range (a buffer; only with ``int8_entropy``)
    int8_hyper_max: Tensor

    def __init__(
        self,
        M: int = 96,
        N: int = 64,
        widths: tuple[int, ...] | list[int] = (24, 16),
        step: float = 0.1,
        H: int = 64,
        int8: bool = False,
        int8_entropy: bool = False,
    ) -> None:
        super().__init__(M=M, N=N, widths=widths, step=step, int8=int8)
        del self.entropy_bottleneck  # the latent is coded by the Gaussian conditional instead
        if 9 * H > _MAX_TERMS:
            raise ValueError("too many side channels for exact float64 synthesis")
        self.config["H"] = int(H)
        self.H = int(H)
        hw = 48
        self.h_a = nn.Sequential(
            nn.Conv2d(self.M, H, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(H, H, 5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(H, H, 5, stride=2, padding=2),
        )
        self.hyper_bottleneck = EntropyBottleneck(H)
        self.h_s1 = nn.Conv2d(H, 4 * hw, 3, padding=1)
        self.h_s2 = nn.Conv2d(hw, 4 * 2 * self.M, 1)
        nn.init.zeros_(self.h_s2.weight)
        nn.init.zeros_(_bias(self.h_s2))
        table = [math.exp(t) for t in SCALE_LOG_TABLE]
        self.gaussian_conditional = GaussianConditional(table, scale_bound=table[0])
        self.int8_entropy = bool(int8_entropy)
        if self.int8_entropy:
            self.config["int8_entropy"] = True
            self.register_buffer("int8_hyper_max", torch.zeros(1))

    # -- initialisation ---------------------------------------------------
    @torch.no_grad()
    def init_prior(self, y: Tensor) -> None:
        """Start the hyper-synthesis at one Gaussian per channel fitted to latents ``y``."""
        mean = y.mean(dim=(0, 2, 3))
        log_std = torch.log(y.std(dim=(0, 2, 3)).clamp(min=0.11))
        # Output channel c * 4 + k becomes channel c at sub-pixel k after the shuffle.
        _bias(self.h_s2).copy_(torch.cat([mean, log_std]).repeat_interleave(4))

    # -- training ---------------------------------------------------------
    def hyper_synthesize(self, z_hat: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Side latent -> (means, log-scales) of a latent of ``size`` (float, training; an
        ``int8_entropy`` model sees its decoder's quantization once calibrated)."""
        quant = self.int8_entropy and self._int8_ready()
        if quant:
            z_hat = _fake_quant(z_hat, 2.0**-LATENT_FRAC_BITS)
        h = F.relu(F.pixel_shuffle(self._conv_q(self.h_s1, z_hat, quant), 2))
        if self.int8_entropy:
            h = self._act_q(h, "int8_hyper_max", 0)
        p = F.pixel_shuffle(self._conv_q(self.h_s2, h, quant), 2)[:, :, : size[0], : size[1]]
        return p[:, : self.M], p[:, self.M :]

    def _int8_ranges(self) -> list[tuple[Tensor, list[int]]]:
        hyper = [(self.int8_hyper_max, [0])] if self.int8_entropy else []
        return super()._int8_ranges() + hyper

    def latent_params(
        self, y: Tensor, means: Tensor, log_scales: Tensor, rounding: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Training: the (means, log-scales) ``y`` is coded under, and ``y`` rounded about those
        means with a straight-through gradient, or ``means + rounding(y - means)`` (a relaxed
        rounding of the residuals: ``refine.py``).  Here the hyperprior's own; a context model
        refines them (``context.py``)."""
        return means, log_scales, round_about(y, means, rounding)

    def forward(self, x: Tensor) -> dict[str, Any]:
        """Training pass: rates from noisy latents, synthesis from rounded ones (straight-through).

        When nothing that shapes the image can learn (analysis and synthesis frozen: rate-only
        fine-tuning, ``freeze`` in a training config) training skips the synthesis: ``x_hat`` is
        then ``None``.  (The entropy models cannot move the image: the rounding's straight-through
        gradient does not reach the means.)
        """
        y = self.g_a(x)
        z = self.h_a(y * self.step)
        z_hat, z_lik = self.hyper_bottleneck(z)
        means, log_scales = self.hyper_synthesize(z_hat, (y.shape[2], y.shape[3]))
        means, log_scales, y_hat = self.latent_params(y, means, log_scales)
        lo, hi = SCALE_LOG_TABLE[0], SCALE_LOG_TABLE[-1]
        _, y_lik = self.gaussian_conditional(y, torch.exp(log_scales.clamp(lo, hi)), means)
        shaping = (self.g_a, self.inverse, self.g_s)
        frozen = self.training and not any(p.requires_grad for m in shaping for p in m.parameters())
        x_hat = None if frozen else self.synthesize(y_hat)
        return {"x_hat": x_hat, "likelihoods": torch.cat([y_lik.flatten(), z_lik.flatten()])}

    def aux_loss(self) -> Tensor:
        """The side latent's quantile loss."""
        loss: Tensor = self.hyper_bottleneck.loss()
        return loss

    @torch.no_grad()
    def update_entropy_models(self) -> None:
        """Compute the CDF tables coding uses (export, and evaluation during training)."""
        self.hyper_bottleneck.update(force=True, update_quantiles=True)
        self.gaussian_conditional.update_scale_table([math.exp(t) for t in SCALE_LOG_TABLE], force=True)

    # -- exact inference --------------------------------------------------
    def _exact_convs(self) -> list[tuple[nn.Conv2d, float]]:
        return [*super()._exact_convs(), (self.h_s1, 1.0), (self.h_s2, 1.0)]

    def exact_hyper_params(self, device: torch.device) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """Order-independent hyper-synthesis: float64 ``z_hat`` -> float64 (means, log-scales)."""
        if self.int8_entropy:
            return self._int8_hyper_params(device)
        (w1, b1), (w2, b2) = [(w.to(device), b.to(device)) for w, b in map(exact_weights, (self.h_s1, self.h_s2))]

        def run(z_hat: Tensor) -> tuple[Tensor, Tensor]:
            z = _to_grid(z_hat.double(), ACT_BITS, _A_MAX)
            h = _relu_grid_(F.pixel_shuffle(_conv(z, w1, b1, 1), 2))
            p = F.pixel_shuffle(_conv(h, w2, b2, 0), 2)
            return p[:, : self.M], p[:, self.M :]

        return run

    def _check_int8(self) -> None:
        super()._check_int8()
        if self.int8_entropy:
            self._int8_hyper_params(torch.device("cpu"))

    def _int8_hyper_params(self, device: torch.device) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """The hyper-synthesis in integers (``int8.py``): int8 products, uint8 hidden layer,
        means and log-scales on the ``2**-VALUE_BITS`` grid."""
        from . import int8 as q8

        if not self._int8_ready():
            raise ValueError("int8 hyper-synthesis is not calibrated (act_max is zero)")
        unit = float(self.int8_hyper_max[0]) / 255.0
        (w1, b1), (w2, b2) = map(exact_weights, (self.h_s1, self.h_s2))
        l1 = q8.quantize_conv(w1, b1, in_unit=2.0**-LATENT_FRAC_BITS, halves=True, out_unit=unit, name="h_s1")
        l2 = q8.quantize_conv(w2, b2, in_unit=unit, halves=False, out_unit=2.0**-q8.VALUE_BITS, name="h_s2")
        l1, l2 = l1.to(device), l2.to(device)

        def run(z_hat: Tensor) -> tuple[Tensor, Tensor]:
            p = q8.small_conv(z_hat.double(), l1, l2, shuffle=True)
            return p[:, : self.M], p[:, self.M :]

        # Compile the kernels now, not in a request (the context's layers use the same ones).
        run(torch.zeros(1, self.H, 1, 1, dtype=torch.float64, device=device))
        return run

    def exact_hyper(self, device: torch.device) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """Order-independent hyper-synthesis: float64 ``z_hat`` -> (scale indexes int32, means float64)."""
        params = self.exact_hyper_params(device)

        def run(z_hat: Tensor) -> tuple[Tensor, Tensor]:
            means, log_scales = params(z_hat)
            return scale_indexes(log_scales), means

        return run
