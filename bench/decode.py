"""Per-tile decode speed: each neural quality beside JPEG, JPEG-XL and JPEG 2000, same tiles, same run.

For the neural codec it splits the time into entropy decoding (side latent,
hyper-synthesis, context passes and our rANS decoder, per tile) and synthesis
(the exact transform: integer, or float64 for older models), at 1 and 2 torch
threads, for synthesis passes of 1, 4, 8 and 16 tiles (the best is reported),
and ``decode_batch`` of 8 tiles as the server calls it (``decode_ms_b8``: issue 5's
measure).  It also times the float synthesis of the training forward (for int8
models with their quantization simulated; not a decode path).  Classic codecs
decode single-threaded (``numthreads=1``).

    .venv/bin/python bench/decode.py            # prints JSON + a table, writes bench/results/decode.json
    .venv/bin/python bench/decode.py --retired  # and the retired neural models (the ones replaced)

Timings are medians over tiles of the best of ``--reps`` repetitions; the
machine's load at the time is recorded with them.  On a shared machine timings drift
between the parts of a run, so issue 5's ratio is also measured back to back (``parity``):
``--parity-rounds`` rounds, each decoding the tiles with JPEG 2000 q34 and then with the
default neural quality in batches of 8; the median of the per-round ratios is reported.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import best_of, psnr_batch, ssim_batch
from _tiles import decode_tiles

from tileserver import codecs

OUT = Path(__file__).resolve().parent / "results" / "decode.json"
CLASSIC: list[tuple[str, dict[str, Any]]] = [
    ("jpeg", {"quality": 90, "subsampling": "444"}),
    ("jpeg", {"quality": 90, "subsampling": "420"}),
    ("jpegxl", {"distance": 1.0, "effort": 7}),
    ("jpeg2000", {"quality": 40}),
    ("jpeg2000", {"quality": 34}),  # near SSIM 0.95 on these tiles (bench/compress.py)
    ("avif", {"quality": 60, "speed": 6}),
]
BATCHES = (1, 4, 8, 16)


def bench_classic(tiles: np.ndarray, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, params in CLASSIC:
        codec = codecs.get(name, **params)
        blobs = [codec.encode(t) for t in tiles]
        decoded = np.stack([codec.decode(b) for b in blobs])
        per_tile = [best_of(functools.partial(codec.decode, b), reps) * 1000 for b in blobs]
        label = name + ("-" + params["subsampling"] if "subsampling" in params else "")
        label += f"-q{params['quality']}" if "quality" in params else f"-d{params['distance']}"
        out[label] = {
            "params": params,
            "bpp": float(np.mean([len(b) * 8 / (t.shape[0] * t.shape[1]) for b, t in zip(blobs, tiles, strict=True)])),
            "psnr": float(psnr_batch(tiles, decoded).mean()),
            "ssim": float(ssim_batch(tiles, decoded).mean()),
            "decode_ms": float(np.median(per_tile)),
        }
    return out


def bench_neural(q: int, tiles: np.ndarray, reps: int, model_sha: str | None = None) -> dict[str, Any]:
    import torch

    codec = codecs.get("neural", quality=q, device="cpu", model=model_sha)
    blobs = codec.encode_batch(list(tiles))  # type: ignore[attr-defined]
    decoded = np.stack(codec.decode_batch(blobs))  # type: ignore[arg-type]
    model = codec._load()  # type: ignore[attr-defined]  # internal: to time the two stages apart
    res: dict[str, Any] = {
        "architecture": codec.model_info["architecture"],  # type: ignore[attr-defined]
        "bpp": float(np.mean([len(b) * 8 / (t.shape[0] * t.shape[1]) for b, t in zip(blobs, tiles, strict=True)])),
        "psnr": float(psnr_batch(tiles, decoded).mean()),
        "ssim": float(ssim_batch(tiles, decoded).mean()),
        "threads": {},
    }
    n = len(blobs)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        entropy = [best_of(lambda b=b: codec._latent(model, b), reps) * 1000 for b in blobs]  # type: ignore[attr-defined,misc]
        latents = [codec._latent(model, b)[0] for b in blobs]  # type: ignore[attr-defined]
        y_all = torch.from_numpy(np.stack(latents))
        by_batch: dict[int, dict[str, float]] = {}
        with torch.inference_mode():
            for bs in [b for b in BATCHES if b <= n]:
                chunks = [y_all[i : i + bs] for i in range(0, n - bs + 1, bs)]
                synth = best_of(lambda chunks=chunks: [model.synthesize(c) for c in chunks], reps)
                codec._synthesis_batch = bs  # type: ignore[attr-defined]  # one synthesis pass per batch
                full = best_of(
                    lambda bs=bs: [codec.decode_batch(blobs[i : i + bs]) for i in range(0, n - bs + 1, bs)], reps
                )
                count = bs * len(chunks)
                by_batch[bs] = {"synthesis_ms": synth / count * 1000, "decode_ms": full / count * 1000}
            fp32 = best_of(
                lambda y_all=y_all: [model.model.synthesize(y_all[i : i + 1].float()) for i in range(n)], reps
            )
        codec._synthesis_batch = None  # type: ignore[attr-defined]
        # A batch of 8 as the server's batcher hands it over (default synthesis passes).
        b8 = (
            best_of(lambda: [codec.decode_batch(blobs[i : i + 8]) for i in range(0, n - 7, 8)], reps)
            / (8 * (n // 8))
            * 1000
            if n >= 8
            else None
        )
        best = min(by_batch, key=lambda b: by_batch[b]["decode_ms"])
        res["threads"][threads] = {
            "entropy_ms": float(np.median(entropy)),
            "synthesis_ms_b1": by_batch[1]["synthesis_ms"],
            "decode_ms_b1": by_batch[1]["decode_ms"],
            "decode_ms_b8": b8,
            "best_batch": best,
            "decode_ms_best": by_batch[best]["decode_ms"],
            "by_batch": {str(k): v for k, v in by_batch.items()},
            "synthesis_fp32_ms_b1": fp32 / n * 1000,
        }
    return res


def bench_parity(tiles: np.ndarray, rounds: int, quality: int = 3) -> dict[str, Any]:
    """Issue 5's ratio measured back to back: each round decodes the tiles with JPEG 2000 q34 (one
    thread) and then with the default neural quality (``decode_batch`` of 8, one thread), so both
    see the same machine; returns each round's ms per tile and the median of the per-round ratios."""
    import torch

    j2k = codecs.get("jpeg2000", quality=34)
    neural = codecs.get("neural", quality=quality, device="cpu")
    j2k_blobs = [j2k.encode(t) for t in tiles]
    neural_blobs = neural.encode_batch(list(tiles))  # type: ignore[attr-defined]
    n8 = 8 * (len(tiles) // 8)
    if not n8:
        raise ValueError("the parity measure needs at least 8 tiles")
    torch.set_num_threads(1)
    neural.decode_batch(neural_blobs[:8])  # warm
    j2k_ms, neural_ms = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for b in j2k_blobs[:n8]:
            j2k.decode(b)
        j2k_ms.append((time.perf_counter() - t0) / n8 * 1000)
        t0 = time.perf_counter()
        for i in range(0, n8, 8):
            neural.decode_batch(neural_blobs[i : i + 8])
        neural_ms.append((time.perf_counter() - t0) / n8 * 1000)
    ratios = [n / j for n, j in zip(neural_ms, j2k_ms, strict=True)]
    return {
        "quality": quality,
        "tiles": n8,
        "jpeg2000_q34_ms": j2k_ms,
        "neural_b8_ms": neural_ms,
        "ratio_median": float(np.median(ratios)),
        "ratio_min": float(min(ratios)),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['tiles']} tissue tiles of 256x256; load average at start {result['machine']['loadavg']}")
    print(f"{'codec':<22}{'bpp':>7}{'PSNR':>7}{'SSIM':>7}  {'decode ms/tile (1 thread)':<28}")
    for label, r in result["classic"].items():
        print(f"{label:<22}{r['bpp']:>7.3f}{r['psnr']:>7.2f}{r['ssim']:>7.4f}  {r['decode_ms']:.2f}")
    parity = result.get("parity")
    if parity:
        print(
            f"\nback to back, {parity['tiles']} tiles x {len(parity['neural_b8_ms'])} rounds: "
            f"neural q{parity['quality']} batch of 8 / JPEG 2000 q34 = {parity['ratio_median']:.2f}x "
            f"(median of the rounds; best round {parity['ratio_min']:.2f}x)"
        )
    print(
        f"\n{'neural':<10}{'bpp':>7}{'PSNR':>7}{'SSIM':>7}{'thr':>5}{'entropy':>9}{'synth b1':>10}"
        f"{'total b1':>10}{'total b8':>10}{'best b':>8}{'total best':>12}{'float synth':>12}"
    )
    rows = [(f"q{q}", r) for q, r in result["neural"].items()]
    rows += [(f"q{q} ret.", r) for q, r in result.get("neural_retired", {}).items()]
    for name, r in rows:
        for thr, t in r["threads"].items():
            print(
                f"{name:<10}{r['bpp']:>7.3f}{r['psnr']:>7.2f}{r['ssim']:>7.4f}{thr:>5}{t['entropy_ms']:>9.2f}"
                f"{t['synthesis_ms_b1']:>10.2f}{t['decode_ms_b1']:>10.2f}{t['decode_ms_b8'] or float('nan'):>10.2f}"
                f"{t['best_batch']:>8}"
                f"{t['decode_ms_best']:>12.2f}{t['synthesis_fp32_ms_b1']:>12.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=int, default=16, help="number of tissue tiles (default 16)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions per timing, best kept")
    ap.add_argument("--qualities", type=int, nargs="*", help="neural qualities (default: all installed)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--retired", action="store_true", help="also time the retired neural models")
    ap.add_argument(
        "--parity-rounds", type=int, default=9, help="back-to-back JPEG 2000 / neural rounds (issue 5's ratio)"
    )
    args = ap.parse_args(argv)

    from tileserver.codecs.neural import available_qualities, retired_models

    tiles = decode_tiles(args.tiles)
    t0 = time.time()
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
        "tiles": len(tiles),
        "classic": bench_classic(tiles, args.reps),
        "neural": {},
    }
    result["parity"] = bench_parity(tiles, args.parity_rounds)
    for q in args.qualities or available_qualities():
        result["neural"][str(q)] = bench_neural(q, tiles, args.reps)
    if args.retired:
        retired = retired_models()
        result["neural_retired"] = {
            str(q): bench_neural(q, tiles, args.reps, retired[q])
            for q in args.qualities or available_qualities()
            if q in retired
        }
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
