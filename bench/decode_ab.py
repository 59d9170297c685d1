"""A/B decode speed of two or more checkouts of this repository, in alternating runs on the same tiles.

On a shared machine absolute timings drift by tens of percent from one minute to the next
(``bench/decode.py`` records the load average for that reason); alternating short runs of each
checkout, several rounds, shows a change that one run of each would hide.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/decode_ab.py /tmp/before . --rounds 3   # prints JSON + a table

Each run is a fresh process that imports ``tileserver`` from that checkout only, codes the same
16 tissue tiles with neural quality ``--quality`` (default 3; the checkout's own models and encoder)
and times ``decode_batch`` of 8 tiles, one thread, best of ``--reps``: ms per tile.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent

# Run inside each checkout's process: only that checkout's tileserver on the path (the tiles come
# from this bench directory's _tiles.py, the same for every checkout).
_CHILD = """
import sys, time
root, bench, quality, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path[:0] = [root, bench]
import numpy as np, torch
torch.set_num_threads(1)
import tileserver
assert tileserver.__file__.startswith(root), tileserver.__file__
from tileserver import codecs
from _tiles import spread_tiles
codec = codecs.get("neural", quality=quality, device="cpu")
blobs = codec.encode_batch(list(spread_tiles(16)))
codec.decode_batch(blobs[:8])
best = float("inf")
for _ in range(reps):
    t0 = time.perf_counter()
    for i in range(0, 16, 8):
        codec.decode_batch(blobs[i : i + 8])
    best = min(best, (time.perf_counter() - t0) / 16)
print(best * 1000)
"""


def run_once(root: Path, quality: int, reps: int) -> float:
    """One fresh process decoding with ``root``'s tileserver: ms per tile."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), str(BENCH), str(quality), str(reps)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", type=Path, nargs="+", help="checkouts to compare (at least two)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--reps", type=int, default=7, help="repetitions per run, best kept (default 7)")
    ap.add_argument("--quality", type=int, default=3)
    args = ap.parse_args(argv)
    if len(args.roots) < 2:
        ap.error("give at least two checkouts")
    roots = [r.resolve() for r in args.roots]
    times: dict[str, list[float]] = {str(r): [] for r in roots}
    for _ in range(args.rounds):
        for r in roots:
            times[str(r)].append(run_once(r, args.quality, args.reps))
    result: dict[str, Any] = {"quality": args.quality, "reps": args.reps, "ms_per_tile": times}
    print(json.dumps(result, indent=1))
    print(f"\n{'checkout':<40}{'ms per tile, decode_batch of 8, each round':>44}")
    for root, ts in times.items():
        print(f"{root:<40}{'  '.join(f'{t:6.2f}' for t in ts):>44}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
