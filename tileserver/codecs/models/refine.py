"""Encoder-side latent refinement: spend encode time to save bits, at no cost to decoding.

The analysis ``g_a`` is a small network trained to give good latents on average; for any one
tile the latent that minimises the model's own rate–distortion objective is elsewhere (the
"amortization gap": Campos et al. 2019, "Content adaptive optimization for neural image
compression"; Yang et al. 2020, "Improving inference for neural image compression").
:func:`refine_latents` starts at ``g_a(x)`` and takes a few Adam steps on the latent itself,
the weights frozen, minimising what training minimised (``objective.rd_objective`` with the
model's ``lambda`` and distortion):

* rounding is relaxed as Yang et al.'s stochastic Gumbel annealing (SGA): each pass's
  residual about its mean (the model's ``latent_params``, in the decoder's order, with the
  integer decoder's quantization simulated as training simulates it) becomes a Gumbel-softmax
  sample between its floor and its ceiling, likelier the nearer, at a temperature that falls
  from :data:`TAU_START` to :data:`TAU_END`, so the optimiser sees where rounding will take
  each value and the last steps see nearly hard rounding.  Straight-through rounding, used
  before, gained about a third as much (``docs/training.md``);
* the rates of the latent and of its side latent ``z = h_a(y)`` come from additive uniform
  noise (as in training), and the hyper-synthesis sees ``z`` rounded as the coder rounds it;
* every draw comes from a generator per tile seeded by the tile's own pixels, so a tile
  encodes the same way again (and, but for float rounding, in any batch: the objective is a
  mean over tiles, and Adam's steps do not depend on that scale);
* the learning rate falls from ``lr`` to zero along a half cosine.

The bitstream is an ordinary one: the coder codes the refined latent exactly as it codes
``g_a(x)`` (hard rounding about the decoder's means), so decoders, formats and decode speed
are untouched.  What it buys is measured by ``bench/compress.py --refine`` (README, Results).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .objective import rd_objective

if TYPE_CHECKING:  # pragma: no cover
    from .klt import KLTHyper

__all__ = ["MIN_SIDE", "REFINE_LR", "TAU_END", "TAU_START", "refine_latents", "soft_round"]

#: the first step's learning rate, in latent units (one quantization step = 1)
REFINE_LR = 0.02
#: the Gumbel-softmax temperature of the first and the last step (geometric in between)
TAU_START, TAU_END = 0.5, 0.15
_EPS = 1e-5  # keeps atanh finite at a distance of 0 or 1
#: images smaller than this on a side are not refined (SSIM's 11-pixel window needs room)
MIN_SIDE = 16


def soft_round(r: Tensor, tau: float, uniform: Tensor) -> Tensor:
    """SGA's relaxed rounding of residuals ``r`` (Yang et al. 2020): ``floor(r) + p``, ``p`` the
    ceiling's weight in a Gumbel-softmax sample at temperature ``tau`` over the two integers, with
    logits ``-atanh(distance to each) / tau``; ``uniform``: draws in (0, 1) shaped ``r.shape + (2,)``.
    As ``tau`` falls the sample becomes a hard, random choice that favours the nearer integer."""
    floor = torch.floor(r).detach()
    frac = r - floor
    distance = torch.stack([frac, 1 - frac], -1).clamp(_EPS, 1 - _EPS)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-10)))
    return floor + torch.softmax((gumbel - torch.atanh(distance) / tau) / tau, dim=-1)[..., 1]


def _sga(r: Tensor, *, tau: float, uniform: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
    """:func:`soft_round` of ``r`` with fresh draws from ``uniform`` (shape -> draws in [0, 1))."""
    return soft_round(r, tau, uniform((*r.shape, 2)))


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

        def uniform(shape: tuple[int, ...]) -> Tensor:
            """Uniform draws in [0, 1) shaped ``shape`` (batch first), each tile's from its own generator."""
            return torch.stack([torch.rand(shape[1:], generator=g, device=x.device) for g in gens])

        side, gauss = model.hyper_bottleneck, model.gaussian_conditional
        n_pix = x.shape[0] * x.shape[2] * x.shape[3]
        lo, hi = SCALE_LOG_TABLE[0], SCALE_LOG_TABLE[-1]
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            tau = TAU_START * (TAU_END / TAU_START) ** (step / max(steps - 1, 1))
            z = model.h_a(y * model.step)
            medians = side._get_medians().detach()
            z_hat = z + (torch.round(z - medians) + medians - z).detach()
            z_noisy = z + uniform(tuple(z.shape)) - 0.5
            # The side latent's factorized density takes channels first (as EntropyBottleneck.forward).
            z_lik = side._likelihood(z_noisy.transpose(0, 1).reshape(z.shape[1], 1, -1))[0]
            means, log_scales = model.hyper_synthesize(z_hat, (y.shape[2], y.shape[3]))
            means, log_scales, y_hat = model.latent_params(
                y, means, log_scales, rounding=functools.partial(_sga, tau=tau, uniform=uniform)
            )
            y_noisy = y + uniform(tuple(y.shape)) - 0.5
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
