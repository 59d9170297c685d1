"""What a neural model for issue 5's decode parity must look like: decode time and reachable quality
against the number of latent channels.

Two measurements:

- ``ceiling``: SSIM and PSNR of each tile rebuilt from its first K KLT coefficients per block,
  *unquantized*, at strides 8 and 16, the KLT fitted on these same tiles (``bench/compress.py``'s
  main set).  The shipped models are a KLT plus small non-linear refinements, so this bounds what K
  channels can carry before a single bit is spent; ``lift`` measures what the shipped refinement
  adds on top (below).
- ``speed``: the installed default-quality model cut to its first K latent channels (its analysis,
  hyperprior, inverse KLT, first synthesis layer and context slices cut at K: ``truncate``), coded
  and decoded by the real decoder (``decode_batch`` of 8, one thread) back to back with JPEG 2000
  q34 (``numthreads=1``), ``--rounds`` rounds on ``bench/decode.py``'s 16 tiles.  The cut models are
  not retrained: their timings are what a K-channel model of this architecture costs, their pixels
  are not what one would reach (their bpp and SSIM are recorded, flagged as untrained).
- ``lift``: on the same rounded latents of the default model, the SSIM of its full synthesis against
  its inverse KLT alone: how far the non-linear part goes beyond the linear one.

    .venv/bin/python bench/symbols.py   # prints JSON + a table, writes bench/results/symbols.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, psnr_batch, ssim_batch
from _tiles import decode_tiles, load_tiles
from decode import at_ssim, bench_jpeg2000_sweep

from tileserver import codecs

OUT = Path(__file__).resolve().parent / "results" / "symbols.json"
CEILING_K = {8: (16, 24, 32, 40, 48, 64, 96), 16: (64, 96, 128, 160, 192, 256)}
SPEED_K = (32, 48, 64, 96)


# -- the linear ceiling ------------------------------------------------------------------
def blocks(tiles: np.ndarray, b: int) -> np.ndarray:
    """``N x H x W x 3`` -> one row per ``b x b`` block, ordered (row, column, channel)."""
    n, h, w, _ = tiles.shape
    return tiles.reshape(n, h // b, b, w // b, b, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, b * b * 3)


def unblocks(rows: np.ndarray, shape: tuple[int, ...], b: int) -> np.ndarray:
    """Inverse of :func:`blocks`."""
    n, h, w, _ = shape
    return rows.reshape(n, h // b, w // b, b, b, 3).transpose(0, 1, 3, 2, 4, 5).reshape(shape)


def klt_ceiling(fit: np.ndarray, tiles: np.ndarray, b: int, ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """SSIM / PSNR of ``tiles`` rebuilt from their first K coefficients (no quantization) of the KLT of
    ``fit``'s ``b x b`` blocks."""
    x = blocks(fit.astype(np.float64), b)
    mean = x.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(np.cov((x - mean).T))
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    t = blocks(tiles.astype(np.float64), b)
    out: dict[str, dict[str, float]] = {}
    for k in ks:
        v = eigvec[:, :k]
        rebuilt = unblocks((t - mean) @ v @ v.T + mean, tiles.shape, b)
        rebuilt = np.clip(np.round(rebuilt), 0, 255).astype(np.uint8)
        out[str(k)] = {
            "symbols_per_tile": k * (tiles.shape[1] // b) * (tiles.shape[2] // b),
            "variance": float(eigval[:k].sum() / eigval.sum()),
            "ssim": float(ssim_batch(tiles, rebuilt).mean()),
            "psnr": float(psnr_batch(tiles, rebuilt).mean()),
        }
    return out


# -- cutting a model to its first K channels ---------------------------------------------
def truncate(payload: dict[str, Any], k: int) -> Any:
    """The ``klt-cx8`` model of weights file ``payload`` cut to its first ``k`` latent channels.

    The KLT channels are ordered by variance, so the cut keeps the analysis's first ``k`` outputs,
    the inverse KLT's and the first synthesis layer's first ``k`` inputs, the hyper-synthesis's
    means and log-scales of those channels (output ``c * 4 + s`` is channel ``c`` at sub-pixel
    ``s``), and the context slices below ``k`` (the last kept slice's outputs cut to its channels).
    """
    from tileserver.codecs.models import build, load_state
    from tileserver.codecs.neural import weights_state

    if payload["architecture"] != "klt-cx8":
        raise ValueError(f"only klt-cx8 models can be cut, not {payload['architecture']}")
    args = dict(payload["args"])
    m = int(args["M"])
    if not 1 < k <= m:
        raise ValueError(f"k must be 2..{m}, got {k}")
    bounds = [0, *args["slices"], m]
    args["M"] = k
    args["slices"] = [s for s in args["slices"] if s < k]
    kept = len(args["slices"]) + 1  # context slices left
    last_lo = bounds[kept - 1]
    state: dict[str, Any] = {}
    for key, v in weights_state(payload).items():
        slice_no = int(key.split(".")[1]) if key.startswith(("ctx_in.", "ctx_out.")) else -1
        if slice_no >= kept:
            continue
        if key.startswith(("g_a.klt.", "g_a.r2.")):
            v = v[:k]
        elif key in ("g_a.r1.weight", "h_a.0.weight", "inverse.weight", "g_s.0.conv.weight"):
            v = v[:, :k]
        elif key.startswith("h_s2."):
            v = v[np.r_[0 : 4 * k, 4 * m : 4 * m + 4 * k]]
        elif key.startswith(f"ctx_out.{kept - 1}."):
            n_old, n_new = bounds[kept] - last_lo, k - last_lo
            v = v[np.r_[0:n_new, n_old : n_old + n_new]]
        elif key == "int8_ctx_max":
            v = v[:kept]
        state[key] = v.clone()
    model = build(payload["architecture"], **args)
    load_state(model, state)
    return model


def bench_speed(quality: int, ks: tuple[int, ...], rounds: int) -> dict[str, Any]:
    import torch

    from tileserver.codecs.neural import WEIGHTS_DIR, NeuralCodec, save_weights

    tiles = decode_tiles(16)
    entry = json.loads((WEIGHTS_DIR / "manifest.json").read_text())["models"][str(quality)]
    payload = torch.load(WEIGHTS_DIR / entry["file"], map_location="cpu", weights_only=True)
    torch.set_num_threads(1)
    j2k = codecs.get("jpeg2000", quality=34)
    j2k_blobs = [j2k.encode(t) for t in tiles]
    out: dict[str, Any] = {"quality": quality, "model": entry["sha256"], "tiles": len(tiles), "by_k": {}}
    with tempfile.TemporaryDirectory() as tmp:
        coders: dict[int, Any] = {}
        blobs: dict[int, list[bytes]] = {}
        for i, k in enumerate(ks, start=1):
            save_weights(truncate(payload, k), name=f"cut-{k}", quality=i, weights_dir=Path(tmp))
            # The model's own analysis (no add-on): the cut changes what an add-on would feed it.
            coders[k] = NeuralCodec(i, weights_dir=Path(tmp), threads=1, encoder="base")
            blobs[k] = coders[k].encode_batch(list(tiles))
            decoded = np.stack(coders[k].decode_batch(blobs[k]))
            coders[k].decode_batch(blobs[k][:8])  # warm
            out["by_k"][str(k)] = {
                "symbols_per_tile": k * 32 * 32,
                "bpp_untrained": float(np.mean([len(b) * 8 / tiles[0, :, :, 0].size for b in blobs[k]])),
                "ssim_untrained": float(ssim_batch(tiles, decoded).mean()),
                "decode_ms": [],
            }
        j2k_ms = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for b in j2k_blobs:
                j2k.decode(b)
            j2k_ms.append((time.perf_counter() - t0) / len(tiles) * 1000)
            for k in ks:
                t0 = time.perf_counter()
                for i in range(0, len(tiles) - 7, 8):
                    coders[k].decode_batch(blobs[k][i : i + 8])
                out["by_k"][str(k)]["decode_ms"].append((time.perf_counter() - t0) / len(tiles) * 1000)
    out["jpeg2000_q34_ms"] = j2k_ms
    for r in out["by_k"].values():
        ratios = [n / j for n, j in zip(r["decode_ms"], j2k_ms, strict=True)]
        r["ratio_median"] = float(np.median(ratios))
        r["ratio_min"] = float(min(ratios))
    return out


def bench_lift(quality: int, tiles: np.ndarray) -> dict[str, float]:
    """SSIM of the default model's full synthesis and of its inverse KLT alone, same rounded latents."""
    import torch
    import torch.nn.functional as F

    codec = codecs.get("neural", quality=quality, device="cpu", encoder="base")
    model = codec._load().model  # type: ignore[attr-defined]  # internal: the float model's parts
    full, linear = [], []
    with torch.inference_mode():
        for i in range(0, len(tiles), 8):
            x = torch.from_numpy(tiles[i : i + 8]).permute(0, 3, 1, 2).float() / 255
            y = model.g_a(x)
            z_hat = model.hyper_bottleneck.quantize(
                model.h_a(y * model.step), "dequantize", model.hyper_bottleneck._get_medians()
            )
            means, log_scales = model.hyper_synthesize(z_hat, (y.shape[2], y.shape[3]))
            _, _, y_hat = model.latent_params(y, means, log_scales)
            full.append(model.synthesize(y_hat))
            linear.append(F.pixel_shuffle(model.inverse(y_hat * model.step), 8))

    def pixels(ts: list[Any]) -> np.ndarray:
        x = torch.cat(ts).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return np.round(x * 255).astype(np.uint8)

    return {
        "ssim_full_synthesis": float(ssim_batch(tiles, pixels(full)).mean()),
        "ssim_inverse_klt_only": float(ssim_batch(tiles, pixels(linear)).mean()),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\nlinear ceiling on {result['tiles']} tiles (rank-K KLT, no quantization)")
    print(f"{'stride':>6}{'K':>5}{'symbols':>9}{'variance':>10}{'SSIM':>8}{'PSNR':>7}")
    for b, rows in result["ceiling"].items():
        for k, r in rows.items():
            print(f"{b:>6}{k:>5}{r['symbols_per_tile']:>9}{r['variance']:>10.4f}{r['ssim']:>8.4f}{r['psnr']:>7.2f}")
    s = result["speed"]
    print(
        f"\nq{s['quality']} cut to K channels, decode_batch of 8, one thread; JPEG 2000 q34 "
        f"{np.median(s['jpeg2000_q34_ms']):.2f} ms (median of {len(s['jpeg2000_q34_ms'])} rounds)"
    )
    print(
        f"{'K':>5}{'symbols':>9}{'ms/tile':>9}{'x q34':>7}{'best':>7}{'bpp*':>7}{'SSIM*':>8}"
        f"{'ceiling':>9}{'J2K there':>10}{'x':>6}   (* untrained cut)"
    )
    for k, r in s["by_k"].items():
        j2k, best = r["jpeg2000_ms_at_ceiling"], r["best_case_ratio"]
        print(
            f"{k:>5}{r['symbols_per_tile']:>9}{np.median(r['decode_ms']):>9.2f}{r['ratio_median']:>7.2f}"
            f"{r['ratio_min']:>7.2f}{r['bpp_untrained']:>7.3f}{r['ssim_untrained']:>8.4f}"
            f"{r['ceiling_ssim_timed_tiles']:>9.4f}{j2k or float('nan'):>10.2f}{best or float('nan'):>6.2f}"
        )
    lift = result["lift"]
    print(
        f"\nq{s['quality']} on the same rounded latents: full synthesis SSIM {lift['ssim_full_synthesis']:.4f}, "
        f"inverse KLT alone {lift['ssim_inverse_klt_only']:.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", type=int, default=3, help="the model to cut and time (default 3)")
    ap.add_argument("--rounds", type=int, default=9, help="back-to-back rounds of the speed measure")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.time()
    tiles = np.stack([t.pixels for t in load_tiles()])
    result: dict[str, Any] = {"machine": machine(), "tiles": len(tiles)}
    result["ceiling"] = {str(b): klt_ceiling(tiles, tiles, b, ks) for b, ks in CEILING_K.items()}
    result["lift"] = bench_lift(args.quality, tiles)
    result["speed"] = speed = bench_speed(args.quality, SPEED_K, args.rounds)
    # The best case of each cut: a model of K channels that reached the linear ceiling on the timed
    # tiles, against JPEG 2000 decoding those tiles at that SSIM.
    timed = decode_tiles(16)
    ceiling = klt_ceiling(tiles, timed, 8, SPEED_K)
    sweep = bench_jpeg2000_sweep(timed, reps=5)
    result["jpeg2000_sweep"] = sweep
    points = [(p["ssim"], p["decode_ms"]) for p in sweep]
    for k, r in speed["by_k"].items():
        r["ceiling_ssim_timed_tiles"] = ceiling[k]["ssim"]
        r["jpeg2000_ms_at_ceiling"] = j2k = at_ssim(points, ceiling[k]["ssim"])
        r["best_case_ratio"] = float(np.median(r["decode_ms"]) / j2k) if j2k else None
    result["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=1))
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
