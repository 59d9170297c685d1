"""Factorized-prior codec with a light convolution + pixel-shuffle synthesis.

Analysis (encoder) is the four-layer GDN transform of Ballé et al. 2018 (as in
CompressAI's ``FactorizedPrior``); the latent is coded by CompressAI's
``EntropyBottleneck`` (fixed CDF tables, so entropy decoding is identical on
every device).  The synthesis is deliberately light (after Yang & Mandt 2023):
each stage is a 3x3 convolution to ``4 * c_out`` channels followed by a 2x
pixel shuffle and ReLU — the sub-pixel form of a transposed convolution, which
runs several times faster than ``ConvTranspose2d`` with large kernels on CPU.

Exact decoding.  ``synthesize_exact`` runs the synthesis in float64 on fixed
grids: weights are multiples of ``2**-WEIGHT_BITS`` with ``|w| < 2``, activations
multiples of ``2**-ACT_BITS`` with ``|a| < 2**ACT_RANGE_BITS``.  Every product then
needs at most 33 significant bits and every partial sum of up to 2**14 terms at
most 47, so float64 represents all of them exactly and the result does not
depend on summation order: batch size, batch composition, thread count and
device (CPU or CUDA) cannot change a single output pixel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from compressai.layers import GDN
from torch import Tensor, nn

__all__ = [
    "ACT_BITS",
    "ACT_RANGE_BITS",
    "STRIDE",
    "WEIGHT_BITS",
    "FactorizedPS",
    "FactorizedPrior",
    "quantize_weights_",
]

#: spatial downsampling factor between pixels and latents
STRIDE = 16
#: synthesis weights and biases are multiples of 2**-WEIGHT_BITS (and |w| < 2)
WEIGHT_BITS = 14
#: synthesis activations are rounded to multiples of 2**-ACT_BITS ...
ACT_BITS = 10
#: ... and clamped to |a| < 2**ACT_RANGE_BITS
ACT_RANGE_BITS = 8
_W_MAX = 2.0 - 2.0**-WEIGHT_BITS
_A_MAX = 2.0**ACT_RANGE_BITS - 2.0**-ACT_BITS


def _conv(c_in: int, c_out: int, kernel: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)


class _SubPixel(nn.Module):
    """3x3 convolution to ``4 * c_out`` channels, then a 2x pixel shuffle."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4 * c_out, 3, padding=1)
        # ICNR initialisation: the four sub-pixels start equal, so the shuffle
        # starts as nearest-neighbour upsampling without checkerboard artefacts.
        w = torch.empty(c_out, c_in, 3, 3)
        nn.init.kaiming_uniform_(w, a=5**0.5)
        with torch.no_grad():
            self.conv.weight.copy_(w.repeat_interleave(4, dim=0))
            self.bias.zero_()

    @property
    def bias(self) -> Tensor:
        """The convolution's bias (always present)."""
        b = self.conv.bias
        if b is None:  # pragma: no cover - built with bias=True
            raise RuntimeError("sub-pixel convolution has no bias")
        return b

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


class FactorizedPrior:
    """The latent coded by one ``EntropyBottleneck`` (a density per channel): its losses and tables."""

    entropy_bottleneck: EntropyBottleneck

    def aux_loss(self) -> Tensor:
        """The entropy bottleneck's quantile loss."""
        loss: Tensor = self.entropy_bottleneck.loss()
        return loss

    @torch.no_grad()
    def update_entropy_models(self) -> None:
        """Compute the CDF tables coding uses (export, and evaluation during training)."""
        self.entropy_bottleneck.update(force=True, update_quantiles=True)


class FactorizedPS(FactorizedPrior, nn.Module):
    """Factorized prior, GDN analysis, ReLU sub-pixel synthesis; latent stride 16.

    ``N``: analysis width; ``M``: latent channels; ``widths``: synthesis widths
    after each of the first three 2x stages (the fourth stage outputs RGB).
    """

    stride = STRIDE

    def __init__(self, N: int = 64, M: int = 128, widths: tuple[int, ...] | list[int] = (64, 32, 16)) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3:
            raise ValueError(f"widths must have 3 entries, got {widths}")
        self.config: dict[str, Any] = {"N": int(N), "M": int(M), "widths": list(widths)}
        self.M = int(M)
        self.g_a = nn.Sequential(_conv(3, N), GDN(N), _conv(N, N), GDN(N), _conv(N, N), GDN(N), _conv(N, M))
        self.entropy_bottleneck = EntropyBottleneck(M)
        chans = [M, *widths, 3]
        self.g_s = nn.ModuleList(_SubPixel(chans[i], chans[i + 1]) for i in range(4))

    # -- training ---------------------------------------------------------
    def synthesize(self, y_hat: Tensor) -> Tensor:
        """Float synthesis used in training: latents -> image in [0, 1] (unclamped)."""
        x = y_hat
        for i, stage in enumerate(self.g_s):
            x = stage(x)
            if i < len(self.g_s) - 1:
                x = F.relu(x)
        return x

    def forward(self, x: Tensor) -> dict[str, Any]:
        """Training pass: noisy latents, reconstruction and likelihoods."""
        y = self.g_a(x)
        y_hat, likelihoods = self.entropy_bottleneck(y)
        return {"x_hat": self.synthesize(y_hat), "likelihoods": likelihoods}

    # -- exact inference --------------------------------------------------
    def synthesis_layers(self) -> list[tuple[Tensor, Tensor]]:
        """(weight, bias) per synthesis stage, as float64 tensors on their fixed grid."""
        out = []
        for stage in self.g_s:
            assert isinstance(stage, _SubPixel)
            w = _to_grid(stage.conv.weight.detach().double(), WEIGHT_BITS, _W_MAX)
            b = _to_grid(stage.bias.detach().double(), WEIGHT_BITS, _W_MAX)
            out.append((w, b))
        return out

    @torch.no_grad()
    def snap_synthesis_(self) -> None:
        """Put the synthesis weights on the exact-decoding grid, in place (export)."""
        quantize_weights_(self)

    def exact_synthesizer(self, device: torch.device) -> Callable[[Tensor], Tensor]:
        """:func:`synthesize_exact` with this model's layers prepared on ``device``."""
        layers = [(w.to(device), b.to(device)) for w, b in self.synthesis_layers()]
        return lambda y_hat: synthesize_exact(layers, y_hat)


def _to_grid(t: Tensor, bits: int, limit: float) -> Tensor:
    scale = float(2**bits)
    return torch.clamp(torch.round(t * scale) / scale, -limit, limit)


@torch.no_grad()
def quantize_weights_(model: FactorizedPS) -> None:
    """Snap the synthesis weights onto the exact-decoding grid, in place (export)."""
    for stage in model.g_s:
        assert isinstance(stage, _SubPixel)
        stage.conv.weight.copy_(_to_grid(stage.conv.weight.double(), WEIGHT_BITS, _W_MAX).float())
        stage.bias.copy_(_to_grid(stage.bias.double(), WEIGHT_BITS, _W_MAX).float())


def _conv3x3(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    if x.device.type == "cpu":
        # CPU float64 convolution is im2col + GEMM (oneDNN, NNPACK and Winograd are float32-only).
        return F.conv2d(x, w, b, padding=1)
    # On CUDA, cuDNN may pick FFT/Winograd algorithms, which are not exact; im2col + GEMM is.
    n, _, h, wd = x.shape
    cols = F.unfold(x, 3, padding=1)
    return (torch.matmul(w.reshape(w.shape[0], -1), cols) + b[:, None]).reshape(n, -1, h, wd)


def synthesize_exact(layers: list[tuple[Tensor, Tensor]], y_hat: Tensor) -> Tensor:
    """Order-independent synthesis: float64 latents ``B x M x h x w`` -> uint8 ``B x 3 x 16h x 16w``.

    ``layers`` come from :meth:`FactorizedPS.synthesis_layers` (on the device of
    ``y_hat``).  See the module docstring for why this is exact.
    """
    x = _to_grid(y_hat.double(), ACT_BITS, _A_MAX)
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        x = _conv3x3(x, w, b)
        if i < last:
            # ReLU, then back onto the activation grid; rounding an exact value is exact.
            x = _to_grid(torch.clamp_(x, min=0.0), ACT_BITS, _A_MAX)
        x = F.pixel_shuffle(x, 2)
    return torch.clamp(torch.round(x * 255.0), 0.0, 255.0).to(torch.uint8)
