"""Inputs shared by the neural codec's tests: a real H&E patch, nine 64² crops of it, and
the float batch the models take."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from ..conftest import PATCHES

TISSUE_PATCH = PATCHES / "tissue" / "TissueImageAnalytics+tiatoolbox__target_image.png"


@pytest.fixture(scope="session")
def image() -> np.ndarray:
    """The H&E patch, ``H x W x 3`` uint8."""
    return np.asarray(Image.open(TISSUE_PATCH).convert("RGB"))


def crops_of(image: np.ndarray) -> np.ndarray:
    """Nine 64² crops spread over ``image`` (``9 x 64 x 64 x 3``)."""
    return np.stack([image[y : y + 64, x : x + 64] for y in (0, 128, 256) for x in (0, 192, 320)])


@pytest.fixture(scope="session")
def crops(image: np.ndarray) -> np.ndarray:
    """:func:`crops_of` the patch."""
    return crops_of(image)


def as_batch(images: np.ndarray) -> Any:
    """``B x H x W x 3`` uint8 -> the float ``B x 3 x H x W`` tensor in [0, 1] the models take."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


#: tiny random-weight builds of every architecture: the mechanics tests run on each
TINY_ARCHS = {
    "factorized-ps": {"N": 8, "M": 8, "widths": [8, 8, 8]},
    "klt-ps8": {"M": 8, "N": 8, "widths": [8, 8], "step": 0.05},
    "klt-hp8": {"M": 8, "N": 8, "widths": [8, 8], "step": 0.05, "H": 8},
    "klt-cx8": {"M": 8, "N": 8, "widths": [8, 8], "step": 0.05, "H": 8, "slices": [2, 4], "checkerboard": 2},
}


def tiny_model(arch: str, seed: int) -> Any:
    """A random-weight :data:`TINY_ARCHS` model whose latents (and, with a hyperprior, their
    predicted densities) are spread so the entropy coder sees a range of symbols and scale tables."""
    import torch

    from tileserver.codecs.models import build

    torch.manual_seed(seed)
    model = build(arch, **TINY_ARCHS[arch])
    with torch.no_grad():
        if arch == "factorized-ps":
            model.g_a[-1].weight.mul_(20.0)
            model.g_s[-1].conv.weight.mul_(10.0)
            model.g_s[-1].bias.fill_(0.5)
        else:
            for conv in [model.inverse, *(stage.conv for stage in model.g_s)]:
                torch.nn.init.normal_(conv.weight, std=0.05)
        if arch in ("klt-hp8", "klt-cx8"):
            torch.nn.init.normal_(model.h_s2.weight, std=0.5)
            torch.nn.init.normal_(model.h_s2.bias, std=1.0)
        if arch == "klt-cx8":
            for conv in model.ctx_out:
                torch.nn.init.normal_(conv.weight, std=0.3)
                torch.nn.init.normal_(conv.bias, std=0.3)
    return model
