"""Conversion at scale: megapixels per second and peak memory on a large synthetic slide.

    .venv/bin/python bench/convert.py                 # 40,000 x 40,000; writes bench/results/convert.json
    .venv/bin/python bench/convert.py --size 8000 --out /tmp/convert-small.json   # a quick run

1. Builds a synthetic tiled pyramidal TIFF (JPEG tiles, generic-TIFF layout that
   OpenSlide reads) of ``--size`` x ``--size`` pixels in a temporary folder (never
   committed): tissue tiles are 256x256 crops of the real patches in
   ``shared/data/patches/tissue``, laid out as a few elliptical tissue sections on
   glass (light background with sensor-like noise).  Levels: 1, 8 and 64.
2. Converts it with ``tileserver convert --codec jpeg --glass drop`` in a child
   process, and reads that process's peak resident set size (``ru_maxrss``).
3. Prints JSON and a table, and writes the JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("TILESERVER_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TILE = 256
GLASS = (241, 239, 243)


def tissue_crops(limit: int = 400) -> list[np.ndarray]:
    """256x256 crops of the shared tissue patches that are mostly tissue."""
    crops: list[np.ndarray] = []
    for path in sorted((DATA / "patches" / "tissue").iterdir()):
        img = np.asarray(Image.open(path).convert("RGB"))
        h, w = img.shape[:2]
        for y in range(0, h - TILE + 1, TILE):
            for x in range(0, w - TILE + 1, TILE):
                t = np.ascontiguousarray(img[y : y + TILE, x : x + TILE])
                if (t.mean(axis=2) < 215).mean() > 0.5:
                    crops.append(t)
    if not crops:
        raise SystemExit(f"no tissue patches under {DATA / 'patches' / 'tissue'}")
    return crops[:limit]


def glass_tiles(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Clean glass: the background colour with a little sensor noise."""
    return [
        np.clip(np.asarray(GLASS, np.float32) + rng.normal(0, 1.5, (TILE, TILE, 3)), 0, 255).astype(np.uint8)
        for _ in range(n)
    ]


def tissue_layout(cols: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Tile-level map: -1 glass, else the index of the crop to use (a few elliptical sections)."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    mask = np.zeros((rows, cols), bool)
    for _ in range(5):
        cy, cx = rng.uniform(0.2, 0.8) * rows, rng.uniform(0.2, 0.8) * cols
        ry, rx = rng.uniform(0.12, 0.26) * rows, rng.uniform(0.12, 0.26) * cols
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return np.where(mask, rng.integers(0, 1 << 30, (rows, cols)), -1)


def _downsample(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[:2]
    img = img[: h - h % f, : w - w % f]
    return img.reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def _encoded_tiles(img: np.ndarray) -> Any:
    """JPEG (YCbCr, as level 0) tiles of ``img`` in row-major order, edge tiles padded."""
    h, w = img.shape[:2]
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            t = img[y : y + TILE, x : x + TILE]
            t = np.pad(t, ((0, TILE - t.shape[0]), (0, TILE - t.shape[1]), (0, 0)), mode="edge")
            yield bytes(imagecodecs.jpeg8_encode(t, level=85))


def build_source(path: Path, size: int, seed: int = 0) -> dict[str, Any]:
    """Write the synthetic slide; returns facts about it."""
    rng = np.random.default_rng(seed)
    crops = tissue_crops()
    glass = glass_tiles(8, rng)
    cols = rows = math.ceil(size / TILE)
    layout = tissue_layout(cols, rows, rng)
    # each distinct tile is coded once; the file repeats the bytes (the converter still decodes every tile)
    enc = {
        "tissue": [bytes(imagecodecs.jpeg8_encode(t, level=85)) for t in crops],
        "glass": [bytes(imagecodecs.jpeg8_encode(t, level=85)) for t in glass],
    }

    def pick(r: int, c: int) -> tuple[str, int]:
        v = int(layout[r, c])
        return ("glass", (r * 7 + c) % len(glass)) if v < 0 else ("tissue", v % len(crops))

    def level0() -> Any:
        for r in range(rows):
            for c in range(cols):
                kind, i = pick(r, c)
                yield enc[kind][i]

    # lower levels: exact area averages of the level-0 content, tile by tile (8x) then 8x again
    small = {"tissue": [_downsample(t, 8) for t in crops], "glass": [_downsample(t, 8) for t in glass]}
    lvl8 = np.empty((rows * TILE // 8, cols * TILE // 8, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            kind, i = pick(r, c)
            lvl8[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] = small[kind][i]
    lvl8 = lvl8[: math.ceil(size / 8), : math.ceil(size / 8)]
    lvl64 = _downsample(lvl8, 8)
    mpp = 0.25
    common: dict[str, Any] = {
        "tile": (TILE, TILE),
        "photometric": "ycbcr",
        "subsampling": (2, 2),
        "metadata": None,
        "resolutionunit": "CENTIMETER",
    }
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(
            level0(),
            shape=(size, size, 3),
            dtype=np.uint8,
            compression=7,
            resolution=(1e4 / mpp, 1e4 / mpp),
            description="synthetic slide for bench/convert.py",
            **common,
        )
        for ds, img in ((8, lvl8), (64, lvl64)):
            tw.write(
                _encoded_tiles(img),
                shape=img.shape,
                dtype=np.uint8,
                compression=7,
                subfiletype=1,
                resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                **common,
            )
    return {
        "width": size,
        "height": size,
        "tiles": rows * cols,
        "tissue_tiles": int((layout >= 0).sum()),
        "distinct_tissue_crops": len(crops),
        "bytes": path.stat().st_size,
    }


_CHILD = r"""
import json, resource, sys, time
from tileserver.convert import convert
t = time.perf_counter()
s = convert(sys.argv[1], sys.argv[2], codec="jpeg", glass="drop", progress=False, workers=int(sys.argv[3]))
out = s.to_dict()
out["wall_s"] = time.perf_counter() - t
out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def run(size: int, workers: int, workdir: Path) -> dict[str, Any]:
    src, dst = workdir / "synthetic.tiff", workdir / "synthetic-jpeg.tiff"
    t0 = time.perf_counter()
    facts = build_source(src, size)
    build_s = time.perf_counter() - t0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(dst), str(workers)], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"conversion failed:\n{proc.stderr}")
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    mp = size * size / 1e6
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "source": {**facts, "build_seconds": round(build_s, 1)},
        "convert": {
            "codec": s["codec"],
            "codec_params": s["codec_params"],
            "glass": s["glass"],
            "workers": workers,
            "megapixels": round(mp, 1),
            "seconds": round(s["wall_s"], 1),
            "megapixels_per_second": round(mp / s["wall_s"], 2),
            "peak_rss_mb": round(s["peak_rss_bytes"] / 2**20, 1),
            "output_bytes": s["output_bytes"],
            "ratio": round(s["ratio"], 2),
            "levels": s["levels"],
            "tissue_fraction": round(s["tissue_fraction"], 4),
            "glass_tiles": s["glass_tiles"],
            "dropped_tiles": s["dropped_tiles"],
            "mean_psnr": s["mean_psnr"] and round(s["mean_psnr"], 2),
            "mean_ssim": s["mean_ssim"] and round(s["mean_ssim"], 4),
            "quality_samples": s["quality_samples"],
        },
    }


def table(r: dict[str, Any]) -> str:
    c, src = r["convert"], r["source"]
    rows = [
        (
            "slide",
            f"{src['width']} x {src['height']} synthetic, {src['bytes'] / 2**20:.0f} MB, "
            f"{src['tissue_tiles']}/{src['tiles']} tissue tiles",
        ),
        ("codec", f"{c['codec']} {c['codec_params']}, glass {c['glass']}, {c['workers']} workers"),
        ("time", f"{c['seconds']} s for {c['megapixels']} MP"),
        ("speed", f"{c['megapixels_per_second']} MP/s"),
        ("peak RSS", f"{c['peak_rss_mb']} MB"),
        ("output", f"{c['output_bytes'] / 2**20:.0f} MB ({c['ratio']}x), {c['levels']} levels"),
        ("glass", f"{c['glass_tiles']} level-0 tiles, {c['dropped_tiles']} zero-byte entries"),
        ("quality", f"PSNR {c['mean_psnr']} dB, SSIM {c['mean_ssim']} ({c['quality_samples']} tiles)"),
        ("machine", f"{r['machine']['cpus']} CPUs, load {r['machine']['load_avg_1m_at_end']} at the end"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=40_000, help="slide width and height in pixels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "convert.json")
    ap.add_argument("--workdir", type=Path, default=None, help="where the synthetic files go (default: a temp dir)")
    ap.add_argument("--note", default="", help="free text stored with the results")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        result = run(args.size, args.workers, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.note:
        result["note"] = args.note
    print(json.dumps(result, indent=2))
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
