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
