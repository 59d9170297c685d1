"""The rate–distortion objective the models are trained for, shared by training and by the
encoder's latent refinement (``refine.py``), so the two can never optimise different things."""

from __future__ import annotations

import math

import torch
from pytorch_msssim import ssim
from torch import Tensor

__all__ = ["bits_per_pixel", "rd_objective"]


def bits_per_pixel(likelihoods: Tensor, x: Tensor) -> Tensor:
    """Bits per pixel of images ``x`` (``B x 3 x H x W``) coded at ``likelihoods``."""
    n_pix = x.shape[0] * x.shape[2] * x.shape[3]
    return torch.log(likelihoods).sum() / (-math.log(2) * n_pix)


def rd_objective(
    x: Tensor, x_hat: Tensor, bpp: Tensor, *, lmbda: float, distortion: str, lambda_mse: float = 0.0
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(loss, mse, ssim)``: ``"mse"``: lambda * 255² * MSE + bpp; ``"ssim"``: lambda * (1 - SSIM)
    + lambda_mse * 255² * MSE + bpp, SSIM as the benchmark measures it (11x11 Gaussian window, per
    RGB channel; data range 1 here).  ``ssim`` is ``None`` for an MSE objective."""
    if distortion not in ("mse", "ssim"):  # train.DISTORTIONS
        raise ValueError(f"distortion must be 'mse' or 'ssim', got {distortion!r}")
    mse = torch.mean((x_hat - x) ** 2)
    if distortion == "ssim":
        s = ssim(x_hat, x, data_range=1.0, size_average=True)
        return lmbda * (1.0 - s) + lambda_mse * 255.0**2 * mse + bpp, mse, s
    return lmbda * 255.0**2 * mse + bpp, mse, None
