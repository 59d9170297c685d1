"""Where a neural tile's decode time goes, stage by stage: one thread, batches of 8 as the server decodes.

    .venv/bin/python bench/decode_profile.py              # q3: JSON + a table, bench/results/decode_profile.json
    .venv/bin/python bench/decode_profile.py --quality 5

Decodes ``bench/decode.py``'s 16 tissue tiles ``--reps`` times under ``cProfile`` and attributes
the time to stages by function: the compiled kernels' own time (numba's, timed as calls from
Python) and the cumulative time of the steps around the int8 products.  The profiler adds to
every Python-level call, so the per-stage figures are for comparing stages; the unprofiled
``decode_ms`` (best of ``--reps``) is the real total, and ``interpreter`` is what the stages
leave of the profiled total.  ``bench/decode_ab.py`` measures a change; this says where to look.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import best_of
from _tiles import decode_tiles

OUT = Path(__file__).resolve().parent / "results" / "decode_profile.json"

#: stage -> how its time is read from the profile: ("own" | "total", module file, function[, caller function])
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("entropy: side latent (factorized)", ("total", "neural.py", "_side")),
    ("entropy: hyper-synthesis (int8)", ("total", "int8.py", "small_conv", "run")),
    ("entropy: context network (int8)", ("total", "int8.py", "_mm", "gaussians")),
    ("entropy: context windows", ("own", "context.py", "_window_q8")),
    ("entropy: context hidden layer", ("own", "int8.py", "_hidden")),
    ("entropy: Gaussians from the context", ("own", "context.py", "_gaussians_q8")),
    ("entropy: rANS", ("own", "rans.py", "_decode")),
    ("entropy: record (latent, context input)", ("own", "context.py", "_update_q8")),
    ("synthesis: latent halves", ("own", "int8.py", "_latent_planes", "run")),
    ("synthesis: inverse KLT product", ("total", "int8.py", "_mm", "run")),
    ("synthesis: 3x3 layers (im2col + products)", ("total", "int8.py", "_conv", "run")),
    ("synthesis: rescale + shuffle", ("own", "int8.py", "_requant")),
    ("synthesis: base + residual -> pixels", ("own", "int8.py", "_final")),
]


def _seconds(stats: pstats.Stats, how: tuple[str, ...]) -> float:
    """A stage's seconds: the function's own or total time, from one caller if one is named."""
    kind, module, name, *caller = how
    total = 0.0
    for (path, _, func), (_, _, own, cum, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func != name or not path.endswith(os.sep + module):
            continue
        if not caller:
            total += own if kind == "own" else cum
            continue
        for (_, _, caller_func), (_, _, c_own, c_cum) in callers.items():
            if caller_func == caller[0]:
                total += c_own if kind == "own" else c_cum
    return total


def profile(quality: int, tiles: np.ndarray, reps: int) -> dict[str, Any]:
    import torch

    from tileserver import codecs

    torch.set_num_threads(1)
    codec = codecs.get("neural", quality=quality, device="cpu")
    blobs = codec.encode_batch(list(tiles))  # type: ignore[attr-defined]

    def decode() -> None:
        for i in range(0, len(blobs) - 7, 8):
            codec.decode_batch(blobs[i : i + 8])  # type: ignore[attr-defined]

    decode()
    n = 8 * (len(blobs) // 8)
    wall = best_of(decode, reps) / n * 1000
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        decode()
    prof.disable()
    stats = pstats.Stats(prof)
    per_tile = 1000 / (n * reps)
    stages = {name: _seconds(stats, how) * per_tile for name, how in STAGES}
    profiled = stats.total_tt * per_tile  # type: ignore[attr-defined]
    stages["interpreter and the rest (profiled)"] = profiled - sum(stages.values())
    return {
        "quality": quality,
        "architecture": codec.model_info["architecture"],  # type: ignore[attr-defined]
        "tiles": n,
        "decode_ms": wall,
        "profiled_ms": profiled,
        "stages_ms": stages,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiles", type=int, default=16)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    tiles = decode_tiles(args.tiles)  # bench/decode.py's
    t0 = time.time()
    result = {"loadavg": [round(x, 2) for x in os.getloadavg()], **profile(args.quality, tiles, args.reps)}
    result["wall_s"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    q, wall, profiled = result["quality"], result["decode_ms"], result["profiled_ms"]
    print(f"\nq{q}: {wall:.2f} ms per tile unprofiled, {profiled:.2f} profiled")
    for name, ms in result["stages_ms"].items():
        print(f"{name:<45}{ms:>7.2f} ms {ms / profiled:>6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
