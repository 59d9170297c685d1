"""Experiment: a deeper analysis (encoder only) trained against an installed model's frozen decoder.

Encoder-side refinement (``models/refine.py``) shows that the analysis leaves bits on the table
(11 % at SSIM 0.95 in 60 steps per tile).  An analysis with more capacity could take part of that
back at no cost to decoding: this script appends residual blocks at the latent resolution to a
shipped model's analysis (the first also sees the raw pixels of each 8x8 block, which the KLT's
channels leave out), each starting at zero so the start is the shipped encoder, and trains them
with the model's own objective while the synthesis, hyper-synthesis, context and entropy models
stay frozen (``h_a``, the side latent's analysis, learns too: it is encode-only as well).

Every ``--eval-every`` steps it codes 16 tissue tiles of ``bench/compress.py``'s set with the real
codec (bitstreams and the integer decoder) and prints the rate change at equal SSIM against the
unrefined q1-q5 curve of the same tiles (``bench/compress.py``'s ``interp_bpp``), as JSON lines.

    .venv/bin/python scripts/encoder_probe.py --quality 3 --minutes 28          # CPU, docs/training.md
    python3 scripts/encoder_probe.py --quality 3 --minutes 8 --device cuda      # a GPU, larger batches

Not a product path yet: the blocks are not part of any architecture, so nothing here can be
exported.  The weights of the trained encoder parts are saved to ``--out`` for inspection.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _tiles import load_tiles  # noqa: E402
from compress import interp_bpp, run_codec  # noqa: E402

from tileserver import codecs  # noqa: E402
from tileserver.train import CropSampler, load_config, load_images, rd_loss  # noqa: E402


def tiles16() -> np.ndarray:
    """The 16 tiles of the refinement tuning: ``np.linspace`` over ``bench/compress.py``'s 58."""
    tiles = load_tiles()
    pick = np.linspace(0, len(tiles) - 1, 16).round().astype(int)
    return np.stack([tiles[i].pixels for i in pick])


def code(codec: Any, tiles: np.ndarray) -> dict[str, float]:
    """Mean bpp and SSIM of ``tiles`` through ``codec``'s real bitstreams and decoder (as the benchmark codes them)."""
    got = run_codec("neural", codec, tiles)
    return {"bpp": float(np.mean(got["bpp_per_tile"])), "ssim": float(np.mean(got["ssim_per_tile"]))}


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=2, help="residual blocks appended to the analysis")
    ap.add_argument("--width", type=int, default=128, help="hidden width of each block")
    ap.add_argument("--lr", type=float, default=3e-4, help="the blocks' first step size (the shipped parts: a tenth)")
    ap.add_argument("--minutes", type=float, default=28.0, help="training time (cosine schedule over it)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    data = os.environ.get("TILESERVER_TEST_DATA", ROOT.parent / "shared" / "data")
    ap.add_argument("--data", type=Path, default=Path(data))
    ap.add_argument("--out", type=Path, default=Path("encoder_probe.pt"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tiles = tiles16()
    curve = [code(codecs.get("neural", quality=q, device=args.device), tiles) for q in (1, 2, 3, 4, 5)]
    codec = codecs.get("neural", quality=args.quality, device=args.device)
    entry = codec._entry  # type: ignore[attr-defined]
    cfg = load_config(ROOT / entry["config"])
    model = codec._load().model  # type: ignore[attr-defined]  # trained in place: the codec encodes with it

    class Block(nn.Module):
        def __init__(self, channels: int, width: int, extra: int = 0) -> None:
            super().__init__()
            self.a = nn.Conv2d(channels + extra, width, 3, padding=1)
            self.b = nn.Conv2d(width, channels, 3, padding=1)
            nn.init.zeros_(self.b.weight)
            nn.init.zeros_(self.b.bias)

        def forward(self, c: Tensor, extra: Tensor | None = None) -> Tensor:
            inp = c if extra is None else torch.cat([c, extra], 1)
            out: Tensor = c + self.b(F.relu(self.a(inp)))
            return out

    class Deeper(nn.Module):
        def __init__(self, g: Any) -> None:
            super().__init__()
            self.g = g
            pixels = 3 * 8 * 8
            self.more = nn.ModuleList(Block(model.M, args.width, pixels if i == 0 else 0) for i in range(args.blocks))

        def forward(self, x: Tensor) -> Tensor:
            c = self.g.klt(x)
            c = c + self.g.r2(F.relu(self.g.r1(c)))
            for i, block in enumerate(self.more):
                c = block(c, F.pixel_unshuffle(x - 0.5, 8) if i == 0 else None)
            out: Tensor = c / self.g.step
            return out

    model.g_a = Deeper(model.g_a).to(args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    new = list(model.g_a.more.parameters())
    shipped = [*model.g_a.g.parameters(), *model.h_a.parameters()]
    for p in [*new, *shipped]:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": new, "base": args.lr}, {"params": shipped, "base": args.lr / 10}])

    def evaluate(step: int, **extra: Any) -> None:
        model.eval()
        got = code(codec, tiles)
        model.train()
        on_curve = interp_bpp(curve, got["ssim"])  # None outside the curve's SSIM range
        change = got["bpp"] / on_curve - 1 if on_curve else None
        print(json.dumps({"step": step, **got, "rate_change": change, **extra}), flush=True)

    evaluate(0, curve=curve)
    images, _ = load_images(cfg, args.data)
    sampler = CropSampler(images, args.crop, 1)
    model.train()
    started, step, losses = time.monotonic(), 0, []
    while (elapsed := time.monotonic() - started) < args.minutes * 60:
        scale = 0.5 * (1 + math.cos(math.pi * elapsed / (args.minutes * 60)))
        for group in opt.param_groups:
            group["lr"] = group["base"] * scale
        x = torch.from_numpy(sampler.batch(args.batch)).to(args.device).permute(0, 3, 1, 2).float() / 255.0
        loss, _ = rd_loss(cfg, x, model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*new, *shipped], 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % args.eval_every == 0:
            evaluate(step, loss=float(np.mean(losses)), s_per_step=(time.monotonic() - started) / step)
            losses = []
    evaluate(step, minutes=(time.monotonic() - started) / 60)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("g_a.", "h_a."))}
    torch.save({"args": vars(args) | {"data": str(args.data), "out": str(args.out)}, "state": state}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
