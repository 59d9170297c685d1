"""Train the tiny tissue CNN (``tileserver.tissue.cnn``) on the shared patches, on one CPU thread.

    python -m tileserver.tissue_train [--data ../shared/data] [--out tileserver/tissue_weights]
    python -m tileserver.tissue_train --evaluate      # agreement with the classic detector only

Reproducible: fixed seeds, one torch thread, deterministic algorithms; the dataset is
built in a fixed order.  Takes a few minutes on one core.

Training set (64×64 optical-density inputs, see ``cnn.preprocess``):

* ``patches/tissue``: random crops of 128, 256 and 512 pixels (resized to 256 by area
  averaging, to cover several magnifications), each on a random light glass colour; the
  label is the classic detector's verdict, which keeps every tissue tile of these patches
  (tests/test_tissue.py) and drops only their few empty corners.
* ``patches/glass``: the images with no tissue at all (clean glass, bubbles, dust, pen on
  glass) give glass crops.  The whole-slide thumbnails give tissue crops where the classic
  detector sees tissue, and glass crops only where it sees glass in the crop *and* in a
  context twice its size around it (a conservative margin).
* Synthetic: glass of random tint, brightness and noise with dust and grey shading
  (glass), and the same with small faint pink or lilac blobs (tissue).

Flips and 90° rotations augment every epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from .tissue import Background, ClassicGlassDetector, estimate_background_from_image

SEED = 20260401
#: images of patches/glass that hold no tissue anywhere (looked at one by one)
NO_TISSUE = (
    "histolab+histolab__almost-white-1.png",
    "histolab+histolab__no-tissue-line.png",
    "histolab+histolab__no-tissue-green-pen.png",
    "histolab+histolab__no-tissue-red-pen.png",
    "choosehappy+HistoQC__pen_black.png",
)
CROPS_PER_IMAGE = 48
SYNTHETIC = 1200
EPOCHS = 12
BATCH = 64

Tile = npt.NDArray[np.uint8]


def default_data_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def load_rgb(path: Path) -> Tile:
    return np.asarray(Image.open(path).convert("RGB"))


def _resize256(crop: Tile) -> Tile:
    if crop.shape[0] == 256 and crop.shape[1] == 256:
        return crop
    h, w = crop.shape[:2]
    size = (max(1, round(w * 256 / max(h, w))), max(1, round(h * 256 / max(h, w))))
    return np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BOX))


def _crops(image: Tile, rng: np.random.Generator, n: int) -> Iterator[tuple[Tile, Tile]]:
    """``n`` random (crop resized to <=256, context around it) pairs at scales 128/256/512."""
    h, w = image.shape[:2]
    for _ in range(n):
        size = int(rng.choice([128, 256, 512]))
        ch, cw = min(size, h), min(size, w)
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        crop = image[y : y + ch, x : x + cw]
        m = size // 2
        context = image[max(0, y - m) : y + ch + m, max(0, x - m) : x + cw + m]
        yield _resize256(crop), _resize256(context)


def _random_glass_color(rng: np.random.Generator) -> tuple[int, int, int]:
    level = rng.uniform(228, 252)
    tint = rng.normal(0, 2.5, 3)
    c = np.clip(level + tint, 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def _synthetic(rng: np.random.Generator, tissue: bool) -> tuple[Tile, Background]:
    color = _random_glass_color(rng)
    sigma = rng.uniform(0.3, 6.0)
    tile = np.asarray(color, dtype=np.float64) + rng.normal(0, sigma, (256, 256, 3))
    yy, xx = np.mgrid[:256, :256]
    if rng.random() < 0.5:  # grey shading: a bubble edge or uneven light, equal in all channels
        tile -= rng.uniform(0, 30) * (xx > rng.integers(0, 256))[..., None]
    for _ in range(int(rng.integers(0, 6))):  # dust specks
        y, x, r = int(rng.integers(0, 250)), int(rng.integers(0, 250)), int(rng.integers(1, 4))
        tile[y : y + r, x : x + r] = rng.uniform(40, 200)
    if tissue:
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.integers(-20, 276, 2)
            radius = rng.uniform(8, 40)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            if not blob.any():
                blob = (yy - 250) ** 2 + (xx - 250) ** 2 <= 15**2
            # a stain's transmission: eosin (green absorbed) or haematoxylin (red and green)
            od = rng.uniform(0.04, 0.5) * (
                np.array([0.1, 1.0, 0.2]) if rng.random() < 0.5 else np.array([0.65, 0.7, 0.3])
            )
            tile[blob] *= np.exp(-od)
    out = np.clip(tile, 0, 255).astype(np.uint8)
    return out, Background(color, "brightfield")


def build_dataset(data_dir: Path, log: bool = True) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(inputs (N, 3, 64, 64), labels (N,), 1 = tissue) built deterministically from ``data_dir``."""
    from .tissue.cnn import preprocess

    rng = np.random.default_rng(SEED)
    classic = ClassicGlassDetector()
    xs: list[npt.NDArray[np.float32]] = []
    ys: list[float] = []
    patches = data_dir / "patches"
    for path in sorted((patches / "tissue").iterdir()):
        image = load_rgb(path)
        tiles = [c for c, _ in _crops(image, rng, CROPS_PER_IMAGE)]
        bgs = [Background(_random_glass_color(rng), "brightfield") for _ in tiles]
        for t, bg in zip(tiles, bgs, strict=True):
            label = 0.0 if classic.glass_flags([t], bg)[0] else 1.0
            xs.append(preprocess([t], bg))
            ys.append(label)
    for path in sorted((patches / "glass").iterdir()):
        image = load_rgb(path)
        bg = estimate_background_from_image(image)
        pairs = list(_crops(image, rng, CROPS_PER_IMAGE))
        crops = [c for c, _ in pairs]
        if path.name in NO_TISSUE:
            labels = [0.0] * len(crops)
        else:
            crop_glass = classic.glass_flags(crops, bg)
            context_glass = classic.glass_flags([c for _, c in pairs], bg)
            labels = []
            keep = []
            for i, (g, cg) in enumerate(zip(crop_glass, context_glass, strict=True)):
                if not g:
                    labels.append(1.0)
                    keep.append(i)
                elif cg:  # glass with a margin of glass around it
                    labels.append(0.0)
                    keep.append(i)
            crops = [crops[i] for i in keep]
        xs.append(preprocess(crops, bg))
        ys.extend(labels)
    for k in range(SYNTHETIC):  # two glass tiles for each tissue tile: glass is scarcer in the patches
        tissue = k % 3 == 0
        tile, bg = _synthetic(rng, tissue=tissue)
        xs.append(preprocess([tile], bg))
        ys.append(float(tissue))
    x = np.concatenate(xs).astype(np.float32)
    y = np.asarray(ys, dtype=np.float32)
    if log:
        print(f"dataset: {len(y)} tiles, {int(y.sum())} tissue, {int(len(y) - y.sum())} glass", file=sys.stderr)
    return x, y


def train(data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train, pick the decision threshold, save weights + manifest; returns the manifest."""
    import torch
    from torch import nn

    from .tissue.cnn import TinyTissueNet, save_model

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    x_np, y_np = build_dataset(data_dir)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    model = TinyTissueNet()
    # balance the classes (tissue crops outnumber glass ones); safety comes from the AND with classic
    pos_weight = torch.tensor([(len(y) - y.sum()) / max(1.0, float(y.sum()))])
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = EPOCHS * ((len(y) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for start in range(0, len(y), BATCH):
            idx = order[start : start + BATCH]
            xb = x[idx]
            k = int(torch.randint(0, 4, (1,), generator=gen))
            xb = torch.rot90(xb, k, dims=(2, 3))
            if int(torch.randint(0, 2, (1,), generator=gen)):
                xb = torch.flip(xb, dims=(3,))
            opt.zero_grad()
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(
            f"epoch {epoch + 1}/{EPOCHS} loss {total / len(y):.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr
        )
    model.eval()
    with torch.inference_mode():
        probs = torch.sigmoid(torch.cat([model(x[i : i + 512]) for i in range(0, len(y), 512)])).numpy()
    tissue_p = probs[y_np == 1]
    # the threshold keeps 99 % of the tissue-labelled training tiles (the labels carry some noise:
    # white holes inside tissue patches), and never exceeds 0.5
    threshold = float(min(0.5, max(0.01, float(np.quantile(tissue_p, 0.01)))))
    pred = probs >= threshold
    meta = {
        "arch": "TinyTissueNet",
        "width": 16,
        "input": "64x64 optical density vs glass colour (4x4 means of a 256x256 tile)",
        "threshold": round(threshold, 4),
        "seed": SEED,
        "epochs": EPOCHS,
        "train_tiles": len(y),
        "train_tissue": int(y_np.sum()),
        "train_accuracy": round(float((pred == (y_np == 1)).mean()), 4),
        "train_tissue_recall": round(float(pred[y_np == 1].mean()), 4),
        "train_glass_recall": round(float((~pred[y_np == 0]).mean()), 4),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    return save_model(model, meta, out_dir)


def evaluate(data_dir: Path) -> dict[str, Any]:
    """Classic vs CNN on every 256 tile of the patches and the CMU/NDPI slides (for docs/tissue.md)."""
    from .slides import open_slide
    from .tissue import estimate_background, get_detector, tissue_fraction

    classic = get_detector("classic")
    cnn = get_detector("cnn")
    report: dict[str, Any] = {}
    for folder in ("tissue", "glass"):
        n = both_glass = classic_only = 0
        for path in sorted((data_dir / "patches" / folder).iterdir()):
            image = load_rgb(path)
            bg = estimate_background_from_image(image)
            tiles = [
                image[y : y + 256, x : x + 256]
                for y in range(0, image.shape[0], 256)
                for x in range(0, image.shape[1], 256)
            ]
            a, b = classic.glass_flags(tiles, bg), cnn.glass_flags(tiles, bg)
            n += len(tiles)
            both_glass += sum(1 for p, q in zip(a, b, strict=True) if p and q)
            classic_only += sum(1 for p, q in zip(a, b, strict=True) if p and not q)
        report[f"patches/{folder}"] = {"tiles": n, "glass_both": both_glass, "glass_classic_kept_by_cnn": classic_only}
    for name in ("CMU-1-Small-Region.svs", "test3-TRITC 2 (560).ndpi"):
        with open_slide(data_dir / "slides" / name) as slide:
            bg = estimate_background(slide)
            w, h = slide.dimensions
            tiles = [
                np.asarray(slide.read_region((x, y), 0, (min(256, w - x), min(256, h - y))).convert("RGB"))
                for y in range(0, h, 256)
                for x in range(0, w, 256)
            ]
        a, b = classic.glass_flags(tiles, bg), cnn.glass_flags(tiles, bg)
        report[name] = {
            "background": list(bg.color),
            "kind": bg.kind,
            "tiles": len(tiles),
            "tissue_fraction_classic": round(tissue_fraction(a), 4),
            "tissue_fraction_cnn": round(tissue_fraction(b), 4),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tileserver.tissue_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="shared data folder (with patches/)")
    parser.add_argument("--out", type=Path, default=None, help="weights folder (default: the package's)")
    parser.add_argument("--evaluate", action="store_true", help="only compare the shipped CNN with classic")
    args = parser.parse_args(argv)
    if not (args.data / "patches").is_dir():
        print(f"error: {args.data}: no patches/ folder (pass --data)", file=sys.stderr)
        return 2
    if args.evaluate:
        print(json.dumps(evaluate(args.data), indent=2))
        return 0
    from .tissue.cnn import WEIGHTS_DIR

    manifest = train(args.data, args.out or WEIGHTS_DIR)
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
