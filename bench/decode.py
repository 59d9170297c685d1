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
``--parity-rounds`` rounds, each decoding the tiles with JPEG 2000 q34-q37 and then with the
default neural quality in batches of 8; the median of the per-round ratios is reported, against
q34 (the issue's yardstick) and against JPEG 2000 at the neural tiles' SSIM.  JPEG 2000 decodes
more slowly the more bits it keeps, so the bench also times it at q30-q44 and reads its time off
at each neural quality's SSIM (``jpeg2000_equal_ssim_ms``).
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
#: JPEG 2000 qualities timed for decode time against SSIM (q30: SSIM about 0.88 on these tiles, q44: about 0.99)
J2K_SWEEP = (30, 32, 34, 35, 36, 37, 38, 40, 42, 44)
#: JPEG 2000 qualities decoded in each back-to-back round: q34 is issue 5's yardstick (SSIM about 0.94
#: here); q35-q37 bracket the default neural quality's SSIM (about 0.956) for the equal-quality ratio
PARITY_J2K = (34, 35, 36, 37)


def measure_classic(codec: Any, tiles: np.ndarray, reps: int) -> dict[str, float]:
    """A classic codec on ``tiles``: mean bpp, PSNR and SSIM, and the median over tiles of the best of
    ``reps`` single-threaded decodes (ms)."""
    blobs = [codec.encode(t) for t in tiles]
    decoded = np.stack([codec.decode(b) for b in blobs])
    per_tile = [best_of(functools.partial(codec.decode, b), reps) * 1000 for b in blobs]
    return {
        "bpp": float(np.mean([len(b) * 8 / (t.shape[0] * t.shape[1]) for b, t in zip(blobs, tiles, strict=True)])),
        "psnr": float(psnr_batch(tiles, decoded).mean()),
        "ssim": float(ssim_batch(tiles, decoded).mean()),
        "decode_ms": float(np.median(per_tile)),
    }


def bench_classic(tiles: np.ndarray, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, params in CLASSIC:
        label = name + ("-" + params["subsampling"] if "subsampling" in params else "")
        label += f"-q{params['quality']}" if "quality" in params else f"-d{params['distance']}"
        out[label] = {"params": params, **measure_classic(codecs.get(name, **params), tiles, reps)}
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


def bench_jpeg2000_sweep(tiles: np.ndarray, reps: int) -> list[dict[str, Any]]:
    """JPEG 2000 (``numthreads=1``) at the qualities of ``J2K_SWEEP`` (:func:`measure_classic`), so that
    its decode time can be read off at another codec's SSIM (:func:`at_ssim`)."""
    return [{"quality": q, **measure_classic(codecs.get("jpeg2000", quality=q), tiles, reps)} for q in J2K_SWEEP]


def at_ssim(points: list[tuple[float, float]], ssim: float) -> float | None:
    """A value read off ``(ssim, value)`` points at ``ssim``, linearly between its neighbours; ``None``
    outside the points' span (no extrapolation)."""
    pts = sorted(points)
    if not pts or not pts[0][0] <= ssim <= pts[-1][0]:
        return None
    return float(np.interp(ssim, [p[0] for p in pts], [p[1] for p in pts]))


def bench_parity(tiles: np.ndarray, rounds: int, quality: int = 3) -> dict[str, Any]:
    """Issue 5's ratio measured back to back: each round decodes the tiles with JPEG 2000 (one thread)
    at each quality of ``PARITY_J2K`` and then with the default neural quality (``decode_batch`` of 8,
    one thread), so all see the same machine.  Returns each round's ms per tile, and the median and
    best of the per-round ratios against q34 (issue 5's own yardstick, SSIM about 0.94 on these tiles)
    and against JPEG 2000 at the neural tiles' SSIM (each round's times read off between the
    qualities that bracket it: equal quality, where JPEG 2000 decodes more bits)."""
    import torch

    j2k = {q: codecs.get("jpeg2000", quality=q) for q in PARITY_J2K}
    neural = codecs.get("neural", quality=quality, device="cpu")
    j2k_blobs = {q: [c.encode(t) for t in tiles] for q, c in j2k.items()}
    j2k_ssim = {
        q: float(ssim_batch(tiles, np.stack([j2k[q].decode(b) for b in blobs])).mean())
        for q, blobs in j2k_blobs.items()
    }
    neural_blobs = neural.encode_batch(list(tiles))  # type: ignore[attr-defined]
    neural_ssim = float(ssim_batch(tiles, np.stack(neural.decode_batch(neural_blobs))).mean())  # type: ignore[arg-type]
    n8 = 8 * (len(tiles) // 8)
    if not n8:
        raise ValueError("the parity measure needs at least 8 tiles")
    torch.set_num_threads(1)
    neural.decode_batch(neural_blobs[:8])  # warm
    j2k_ms: dict[int, list[float]] = {q: [] for q in PARITY_J2K}
    neural_ms = []
    for _ in range(rounds):
        for q, c in j2k.items():
            t0 = time.perf_counter()
            for b in j2k_blobs[q][:n8]:
                c.decode(b)
            j2k_ms[q].append((time.perf_counter() - t0) / n8 * 1000)
        t0 = time.perf_counter()
        for i in range(0, n8, 8):
            neural.decode_batch(neural_blobs[i : i + 8])
        neural_ms.append((time.perf_counter() - t0) / n8 * 1000)
    ratios = [n / j for n, j in zip(neural_ms, j2k_ms[34], strict=True)]
    equal = [at_ssim([(j2k_ssim[q], j2k_ms[q][r]) for q in PARITY_J2K], neural_ssim) for r in range(rounds)]
    out = {
        "quality": quality,
        "tiles": n8,
        "neural_ssim": neural_ssim,
        "jpeg2000_ssim": {str(q): v for q, v in j2k_ssim.items()},
        "jpeg2000_q34_ms": j2k_ms[34],
        "jpeg2000_ms": {str(q): v for q, v in j2k_ms.items()},
        "neural_b8_ms": neural_ms,
        "ratio_median": float(np.median(ratios)),
        "ratio_min": float(min(ratios)),
    }
    if all(e is not None for e in equal):
        eq = [n / e for n, e in zip(neural_ms, equal, strict=True) if e is not None]
        out["jpeg2000_equal_ssim_ms"] = equal
        out["ratio_equal_ssim_median"] = float(np.median(eq))
        out["ratio_equal_ssim_min"] = float(min(eq))
    return out


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
        if "ratio_equal_ssim_median" in parity:
            print(
                f"at equal SSIM ({parity['neural_ssim']:.4f}; JPEG 2000 read off between "
                f"q{PARITY_J2K[0]}-q{PARITY_J2K[-1]}): "
                f"{parity['ratio_equal_ssim_median']:.2f}x (best round {parity['ratio_equal_ssim_min']:.2f}x)"
            )
    sweep = result.get("jpeg2000_sweep")
    if sweep:
        print("\nJPEG 2000 (numthreads=1) decode time against SSIM")
        for p in sweep:
            print(f"  q{p['quality']:<4}{p['bpp']:>7.3f} bpp{p['ssim']:>8.4f} SSIM{p['decode_ms']:>7.2f} ms")
        print("neural decode_b8 (1 thread) against JPEG 2000 at the same SSIM (read off the sweep):")
        for q, r in result["neural"].items():
            eq = r.get("jpeg2000_equal_ssim_ms")
            b8 = r["threads"][1]["decode_ms_b8"]
            if eq:
                print(f"  q{q}: SSIM {r['ssim']:.4f}: {b8:.2f} vs {eq:.2f} ms = {b8 / eq:.2f}x")
            else:
                print(f"  q{q}: SSIM {r['ssim']:.4f}: outside the sweep")
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
    result["jpeg2000_sweep"] = bench_jpeg2000_sweep(tiles, args.reps)
    result["parity"] = bench_parity(tiles, args.parity_rounds)
    j2k_points = [(p["ssim"], p["decode_ms"]) for p in result["jpeg2000_sweep"]]
    for q in args.qualities or available_qualities():
        result["neural"][str(q)] = r = bench_neural(q, tiles, args.reps)
        r["jpeg2000_equal_ssim_ms"] = at_ssim(j2k_points, r["ssim"])
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
