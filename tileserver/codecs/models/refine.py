"""Encoder-side latent refinement: spend encode time to save bits, at no cost to decoding.

The analysis ``g_a`` is a small network trained to give good latents on average; for any one
tile the latent that minimises the model's own rate–distortion objective is elsewhere (the
"amortization gap": Campos et al. 2019, "Content adaptive optimization for neural image
compression"; Yang et al. 2020, "Improving inference for neural image compression").
:func:`refine_latents` starts at ``g_a(x)`` and takes a few Adam steps on the latent itself,
the weights frozen, minimising what training minimised (``objective.rd_objective`` with the
model's ``lambda`` and distortion):

* the rates of the latent and of its side latent ``z = h_a(y)`` come from additive uniform
  noise (as in training), drawn per tile from a generator seeded by the tile's own pixels,
  so a tile encodes the same way again (and, but for float rounding, in any batch: the
  objective is a mean over tiles, and Adam's steps do not depend on that scale);
* the hyper-synthesis sees ``z`` rounded as the coder rounds it and the synthesis sees the
  latent rounded about the context's means as the coder rounds it (straight-through
  gradients, the model's ``latent_params``), with the integer decoder's quantization
  simulated exactly as training simulates it;
* the learning rate falls from ``lr`` to zero along a half cosine.

The bitstream is an ordinary one: the coder codes the refined latent exactly as it codes
``g_a(x)``, so decoders, formats and decode speed are untouched.  What it buys is measured
by ``bench/compress.py --refine`` (README, Results).
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .objective import rd_objective

if TYPE_CHECKING:  # pragma: no cover
    from .klt import KLTHyper

__all__ = ["MIN_SIDE", "REFINE_LR", "refine_latents"]

#: the first step's learning rate, in latent units (one quantization step = 1)
REFINE_LR = 0.004
#: images smaller than this on a side are not refined (SSIM's 11-pixel window needs room)
MIN_SIDE = 16


def refine_latents(
    model: KLTHyper,
    x: Tensor,
    *,
    steps: int,
    lmbda: float,
    distortion: str,
    lambda_mse: float = 0.0,
    lr: float = REFINE_LR,
    seed: int = 0,
) -> Tensor:
    """Latents for images ``x`` (``B x 3 x H x W`` in [0, 1], padded to the model's stride) after
    ``steps`` steps on the model's objective; ``g_a(x)`` itself when ``steps`` is 0 or the images
    are smaller than :data:`MIN_SIDE`.  The model is not changed (no gradients reach it)."""
    from .klt import SCALE_LOG_TABLE

    with torch.no_grad():
        y0: Tensor = model.g_a(x)
    if steps <= 0 or min(x.shape[2], x.shape[3]) < MIN_SIDE:
        return y0
    with torch.inference_mode(False), torch.enable_grad():  # whatever mode the caller is in
        x = x.clone()
        y: Tensor = y0.clone().requires_grad_(True)
        opt = torch.optim.Adam([y], lr=lr)
        gens = [torch.Generator(device=x.device).manual_seed(seed ^ zlib.crc32(t.cpu().numpy().tobytes())) for t in x]

        def noise(like: Tensor) -> Tensor:
            """Uniform noise in [-0.5, 0.5) shaped like ``like``, each tile from its own generator."""
            draws = [torch.rand(like.shape[1:], generator=g, device=like.device) for g in gens]
            return torch.stack(draws) - 0.5

        side, gauss = model.hyper_bottleneck, model.gaussian_conditional
        n_pix = x.shape[0] * x.shape[2] * x.shape[3]
        lo, hi = SCALE_LOG_TABLE[0], SCALE_LOG_TABLE[-1]
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            z = model.h_a(y * model.step)
            medians = side._get_medians().detach()
            z_hat = z + (torch.round(z - medians) + medians - z).detach()
            z_noisy = z + noise(z)
            # The side latent's factorized density takes channels first (as EntropyBottleneck.forward).
            z_lik = side._likelihood(z_noisy.transpose(0, 1).reshape(z.shape[1], 1, -1))[0]
            means, log_scales = model.hyper_synthesize(z_hat, (y.shape[2], y.shape[3]))
            means, log_scales, y_hat = model.latent_params(y, means, log_scales)
            y_noisy = y + noise(y)
            y_lik = gauss._likelihood(y_noisy, torch.exp(log_scales.clamp(lo, hi)), means)
            bits = -(torch.log2(gauss.likelihood_lower_bound(y_lik)).sum())
            bits = bits - torch.log2(side.likelihood_lower_bound(z_lik)).sum()
            loss, _, _ = rd_objective(
                x, model.synthesize(y_hat), bits / n_pix, lmbda=lmbda, distortion=distortion, lambda_mse=lambda_mse
            )
            (grad,) = torch.autograd.grad(loss, [y])
            y.grad = grad
            opt.step()
        return y.detach()
