"""Glass/tissue detector speed per 256² tile on the shared slides' level-0 tiles.

.venv/bin/python bench/tissue.py      # writes bench/results/tissue.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine
from _tiles import DATA

import tileserver
from tileserver import tissue

RESULTS = Path(__file__).resolve().parent / "results"
SLIDES = ["slides/CMU-1-Small-Region.svs", "slides/test3-TRITC 2 (560).ndpi"]


def main() -> int:
    rows = []
    for rel in SLIDES:
        with tileserver.open_slide(DATA / rel) as slide:
            background = tissue.estimate_background(slide)
            w, h = slide.dimensions
            img = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
        tiles = [
            np.ascontiguousarray(img[y : y + 256, x : x + 256])
            for y in range(0, h - 255, 256)
            for x in range(0, w - 255, 256)
        ]
        for name in ("classic", "cnn"):
            detector = tissue.get_detector(name)
            detector.glass_flags(tiles[:4], background)  # load lazily-built state outside the timing
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                flags = detector.glass_flags(tiles, background)
                best = min(best, time.perf_counter() - t0)
            rows.append(
                {
                    "slide": Path(rel).name,
                    "kind": background.kind,
                    "detector": name,
                    "tiles": len(tiles),
                    "glass_tiles": int(sum(flags)),
                    "ms_per_tile": round(best / len(tiles) * 1000, 3),
                }
            )
    print("| slide | kind | detector | tiles | glass | ms/tile (best of 5, 1 process) |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['slide']} | {r['kind']} | {r['detector']} | {r['tiles']} | {r['glass_tiles']} | {r['ms_per_tile']} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tissue.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
