"""Encoder add-ons: a deeper analysis trained against a shipped model's frozen decoder.

A model's identity (the SHA-256 that slides record, the tag in every tile) covers its whole
weights file, yet only the synthesis, the hyper-synthesis, the context and the entropy tables
decide how a bitstream decodes.  The analysis ``g_a`` and the side analysis ``h_a`` only choose
*which* latent to code, and encoder-side refinement (``refine.py``: 11 % fewer bits at SSIM 0.95
in 60 steps per tile) shows how much a better choice saves.  An *encoder add-on* is therefore a
separate file, listed under its model's manifest entry, holding a new ``g_a`` and ``h_a``:

* ``g_a`` is the model's analysis followed by ``blocks`` residual blocks at the latent resolution
  (two 3x3 convolutions each, ``width`` channels between them); the first block also sees the raw
  pixels of each 8x8 block (``pixel_unshuffle``), which the KLT's ``M`` channels leave out.  Each
  block's last convolution starts at zero, so training starts at the shipped encoder.
* training (``scripts/train_encoder.py``) uses the model's own objective with everything that
  decodes frozen, so bitstreams from the add-on decode with the unchanged model, bit for bit as
  any other bitstream of that model, and slides coded with it record the same model.

The add-on's weights are stored in float16, as the shipped analyses are: encoding needs no
bit-exactness.  q1-q5 have one, trained with the model's objective, a weak MSE term and the rate
held at the shipped encoder's (``train_encoder.py --hold-rate``): 1.6-3.4 % fewer bits at equal SSIM and
2-6 % at equal PSNR.  The first ones, on SSIM alone, had bought their rate with 0.55-0.8 dB of PSNR;
the second, with a stronger MSE term, moved q2 past SSIM 0.95 (``docs/training.md``,
"Encoder add-ons").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .klt import BLOCK, KLTHyper, _Analysis

__all__ = ["ENCODER_FORMAT", "ENCODER_PREFIXES", "DeepAnalysis", "deepen", "encoder_state", "load_encoder"]

#: version of the add-on file's layout
ENCODER_FORMAT = 1
#: the state an add-on replaces: everything that only encoding uses
ENCODER_PREFIXES = ("g_a.", "h_a.")


class _Block(nn.Module):
    """``c + b(relu(a([c, extra])))`` with ``b`` starting at zero."""

    def __init__(self, channels: int, width: int, extra: int = 0) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels + extra, width, 3, padding=1)
        self.b = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.b.weight)
        nn.init.zeros_(self.b.bias)  # type: ignore[arg-type]

    def forward(self, c: Tensor, extra: Tensor | None = None) -> Tensor:
        inp = c if extra is None else torch.cat([c, extra], 1)
        out: Tensor = c + self.b(F.relu(self.a(inp)))
        return out


class DeepAnalysis(nn.Module):
    """A KLT model's analysis ``base`` followed by ``blocks`` residual blocks (module docstring)."""

    def __init__(self, base: _Analysis, channels: int, blocks: int, width: int) -> None:
        super().__init__()
        if blocks < 1 or width < 1:
            raise ValueError(f"a deeper analysis needs blocks >= 1 and width >= 1, got {blocks}, {width}")
        self.base = base
        pixels = 3 * BLOCK * BLOCK
        self.blocks = nn.ModuleList(_Block(channels, width, pixels if i == 0 else 0) for i in range(blocks))

    def forward(self, x: Tensor) -> Tensor:
        c: Tensor = self.base.features(x)
        for i, block in enumerate(self.blocks):
            c = block(c, F.pixel_unshuffle(x - 0.5, BLOCK) if i == 0 else None)
        out: Tensor = c / self.base.step
        return out


def _deeper(model: nn.Module, blocks: int, width: int) -> DeepAnalysis:
    if not isinstance(model, KLTHyper):
        raise ValueError(f"encoder add-ons need a hyperprior KLT model, not {type(model).__name__}")
    if not isinstance(model.g_a, _Analysis):
        raise ValueError("the model's analysis is already deepened")
    return DeepAnalysis(model.g_a, model.M, blocks, width).to(next(model.parameters()).device)


def deepen(model: nn.Module, blocks: int, width: int) -> DeepAnalysis:
    """Replace ``model.g_a`` by a :class:`DeepAnalysis` of it (new blocks at zero: the same latents)."""
    deep = _deeper(model, blocks, width)
    model.g_a = deep  # type: ignore[assignment]
    return deep


def encoder_state(model: nn.Module) -> dict[str, Tensor]:
    """The add-on's state of a deepened ``model``: its ``g_a`` and ``h_a``, floats as float16."""
    if not isinstance(model.g_a, DeepAnalysis):
        raise ValueError("the model's analysis is not deepened; nothing to add on")
    return {
        k: (v.half() if v.is_floating_point() else v).detach().cpu().clone()
        for k, v in model.state_dict().items()
        if k.startswith(ENCODER_PREFIXES)
    }


def load_encoder(model: nn.Module, payload: dict[str, Any]) -> None:
    """Deepen ``model`` as an add-on file's ``payload`` says and load its ``g_a`` and ``h_a``.

    Raises ``ValueError``, leaving the model as it was, if the payload does not fit it; the
    decoding parts are never touched.
    """
    if not isinstance(payload, dict) or payload.get("format") != ENCODER_FORMAT or payload.get("kind") != "encoder":
        raise ValueError(f"not an encoder add-on of format {ENCODER_FORMAT}")
    deep = _deeper(model, int(payload["blocks"]), int(payload["width"]))
    own = {f"g_a.{k}": v for k, v in deep.state_dict().items()}
    own |= {k: v for k, v in model.state_dict().items() if k.startswith("h_a.")}
    state = payload["state_dict"]
    if set(state) != set(own):
        wrong = sorted(set(state) ^ set(own))
        raise ValueError(f"encoder add-on does not fit the model: {', '.join(wrong[:6])}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"encoder add-on: {key} is {tuple(value.shape)}, the model's {tuple(own[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))
    model.g_a = deep  # type: ignore[assignment]
