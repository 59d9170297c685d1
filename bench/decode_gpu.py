"""Neural decoding on a CUDA device: the same pixels as on the CPU, and time per tile by batch size.

    .venv/bin/python bench/decode_gpu.py --prepare runs/gpu-blobs.pkl     # encode here, on the CPU
    python3 bench/decode_gpu.py --blobs runs/gpu-blobs.pkl --device cuda  # on the GPU machine

``--prepare`` codes the benchmark's tissue tiles (``bench/_tiles.py``) with every installed
quality on the CPU and records the SHA-256 of the CPU's decoded pixels of each tile.  The
timing run decodes those bitstreams on ``--device``:

* ``decode_batch`` of 1, 8, 32, 64 and 128 tiles (the tiles repeated to fill a batch), best of
  ``--reps``, reported per tile; every decoded tile is compared with the CPU's pixels;
* through the server's ``DecodeBatcher`` (``max_batch`` 32, 8 client threads), each tile again
  compared with the CPU's pixels;
* off the CPU, the same host's CPU decoder too (``cpu_b8``: ``decode_batch`` of 8), for comparison.

A mismatch is counted and reported, never hidden: exact decoding promises identical pixels on any
device.  Without ``--blobs`` the run encodes for itself (that needs CompressAI's compiled coder).
Prints JSON and a table; writes ``bench/results/decode_gpu.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import pickle
import platform
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import best_of

OUT = Path(__file__).resolve().parent / "results" / "decode_gpu.json"
BATCHES = (1, 8, 32, 64, 128)


def _digest(pixels: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def prepare(path: Path, tiles: int) -> None:
    """Code ``tiles`` benchmark tiles at every installed quality on the CPU; store blobs and pixel digests."""
    from _tiles import load_tiles

    from tileserver.codecs import neural

    pixels = [t.pixels for t in load_tiles()][:tiles]
    out: dict[str, Any] = {"tiles": len(pixels), "qualities": {}}
    for q in neural.available_qualities():
        codec = neural.NeuralCodec(q, device="cpu")
        blobs = codec.encode_batch(pixels)
        decoded = codec.decode_batch(blobs)
        out["qualities"][q] = {
            "model": codec.params["model"][:12],
            "blobs": blobs,
            "digests": [_digest(d) for d in decoded],
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(out))
    print(f"wrote {path}: {len(pixels)} tiles x {len(out['qualities'])} qualities")


def _through_batcher(codec: Any, blobs: list[bytes], clients: int = 8) -> tuple[list[Any], float]:
    from tileserver.batching import DecodeBatcher

    futures: list[Future[Any] | None] = [None] * len(blobs)
    gate = threading.Barrier(clients)
    t0 = time.perf_counter()
    with DecodeBatcher(codec.decode_batch, max_batch=32, max_delay_ms=5) as batcher:

        def client(k: int) -> None:
            gate.wait()
            for i in range(k, len(blobs), clients):
                futures[i] = batcher.submit(blobs[i])

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        results = [f.result(timeout=600) for f in futures if f is not None]
    return results, time.perf_counter() - t0


def run(data: dict[str, Any], device: str, reps: int) -> dict[str, Any]:
    import torch

    from tileserver.codecs import neural

    report: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "tiles": data["tiles"],
        "qualities": {},
    }
    for q, entry in sorted(data["qualities"].items()):
        codec = neural.NeuralCodec(int(q), device=device)
        installed = codec.params["model"][:12]
        if installed != entry["model"]:
            raise SystemExit(f"q{q}: installed model {installed} is not the one coded ({entry['model']})")
        blobs, digests = entry["blobs"], entry["digests"]
        codec.decode_batch(blobs[:2])  # load, compile, warm the device
        mismatches = 0
        rows: dict[str, Any] = {}
        for b in BATCHES:
            idx = [i % len(blobs) for i in range(b)]
            batch = [blobs[i] for i in idx]
            decoded = codec.decode_batch(batch)  # checked, and a warm-up at this batch size
            mismatches += sum(_digest(d) != digests[i] for d, i in zip(decoded, idx, strict=True))
            best = best_of(functools.partial(codec.decode_batch, batch), reps)  # pixels come back: synchronous
            rows[f"b{b}"] = {"ms_per_tile": best * 1000 / b, "batch_ms": best * 1000}
        if device != "cpu":  # the same host's CPU decoder, for comparison
            cpu = neural.NeuralCodec(int(q), device="cpu")
            cpu.decode_batch(blobs[:2])
            best = best_of(functools.partial(cpu.decode_batch, blobs[:8]), reps)
            rows["cpu_b8"] = {"ms_per_tile": best * 1000 / 8, "batch_ms": best * 1000}
        many = [blobs[i % len(blobs)] for i in range(4 * len(blobs))]
        results, wall = _through_batcher(codec, many)
        batcher_bad = sum(_digest(r) != digests[i % len(blobs)] for i, r in enumerate(results))
        report["qualities"][str(q)] = {
            "model": entry["model"],
            "batches": rows,
            "batcher": {"tiles": len(many), "ms_per_tile": wall * 1000 / len(many), "mismatches": batcher_bad},
            "mismatches": mismatches,
            "pixels_identical_to_cpu": mismatches == 0 and batcher_bad == 0,
        }
    return report


def _table(report: dict[str, Any]) -> str:
    lines = [f"{report['device_name']} ({report['device']}), torch {report['torch']}, {report['tiles']} tiles"]
    lines.append("q  " + "".join(f"{'b' + str(b):>9}" for b in BATCHES) + "  batcher   cpu b8  identical (ms per tile)")
    for q, r in report["qualities"].items():
        cells = "".join(f"{r['batches'][f'b{b}']['ms_per_tile']:9.2f}" for b in BATCHES)
        cpu = r["batches"].get("cpu_b8", {}).get("ms_per_tile", float("nan"))
        lines.append(f"{q:<3}{cells}{r['batcher']['ms_per_tile']:9.2f}{cpu:9.2f}  {r['pixels_identical_to_cpu']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", type=Path, help="encode on the CPU into this file and stop")
    ap.add_argument("--blobs", type=Path, help="bitstreams and CPU pixel digests from --prepare")
    ap.add_argument("--tiles", type=int, default=16, help="tiles to code with --prepare (default 16)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per timing, best kept")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare, args.tiles)
        return 0
    if args.blobs:
        data = pickle.loads(args.blobs.read_bytes())
    else:
        tmp = Path("runs") / "gpu-blobs.pkl"
        prepare(tmp, args.tiles)
        data = pickle.loads(tmp.read_bytes())
    report = run(data, args.device, args.reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(_table(report))
    bad = [q for q, r in report["qualities"].items() if not r["pixels_identical_to_cpu"]]
    if bad:
        print(f"PIXELS DIFFER from the CPU's at qualities {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
