"""The linear starting point of the neural codec: KLT of 8x8x3 blocks, uniform steps, ideal histograms.

    .venv/bin/python bench/klt_baseline.py      # prints JSON + a table, writes bench/results/klt_baseline.json

No training: the KLT is fitted on 2,000 random 64² training crops (as ``init = "pca"``
does), every coefficient is quantized with the same step, and the rate is each
coefficient's ideal code length under a histogram of the training coefficients
(add-half smoothing) — a per-coefficient adaptive entropy coder, about what a
factorized prior achieves.  Tiles: the held-out evaluation tiles of the codec's
configs.  This is the number ``docs/training.md`` compares the trained models with.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import psnr_batch, ssim_batch

from tileserver.codecs.models.klt import BLOCK, fit_klt, image_blocks
from tileserver.train import DEFAULT_DATA, CropSampler, eval_tiles, load_config, load_images

CONFIG = Path(__file__).resolve().parents[1] / "tileserver" / "codecs" / "configs" / "klt-hp-s140.toml"
OUT = Path(__file__).resolve().parent / "results" / "klt_baseline.json"
STEPS = (0.28, 0.2, 0.14, 0.1, 0.08, 0.065)


def _bits(train: np.ndarray, test: np.ndarray) -> float:
    total = 0.0
    for j in range(train.shape[1]):
        values, counts = np.unique(train[:, j], return_counts=True)
        denom = counts.sum() + 0.5 * (len(values) + 50)
        table = dict(zip(values.tolist(), ((counts + 0.5) / denom).tolist(), strict=True))
        unseen = 0.5 / denom
        total -= sum(math.log2(table.get(v, unseen)) for v in test[:, j].tolist())
    return total


def main() -> int:
    cfg = load_config(CONFIG)
    images, _ = load_images(cfg, DEFAULT_DATA)
    crops = CropSampler(images, 64, cfg.seed + 1).batch(2000)
    mean, basis, _ = fit_klt(image_blocks(crops))
    tiles = np.stack(eval_tiles(cfg, DEFAULT_DATA))
    n, h, w, _ = tiles.shape
    coef_train = (image_blocks(crops) - mean) @ basis
    coef = (image_blocks(tiles) - mean) @ basis
    rows = []
    for step in STEPS:
        q = np.round(coef / step)
        bits = _bits(np.round(coef_train / step), q)
        rec = (q * step) @ basis.T + mean
        img = rec.reshape(n, h // BLOCK, w // BLOCK, BLOCK, BLOCK, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, 3)
        dec = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
        rows.append(
            {
                "step": step,
                "bpp": bits / (n * h * w),
                "psnr": float(psnr_batch(tiles, dec).mean()),
                "ssim": float(ssim_batch(tiles, dec).mean()),
            }
        )
    result = {"tiles": int(n), "config": CONFIG.name, "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\nKLT 8x8x3 + ideal histograms, {n} held-out tissue tiles")
    print(f"{'step':>6}{'bpp':>8}{'PSNR':>8}{'SSIM':>8}")
    for r in rows:
        print(f"{r['step']:>6}{r['bpp']:>8.3f}{r['psnr']:>8.2f}{r['ssim']:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
