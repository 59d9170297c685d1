"""Rate–distortion benchmark: every codec on the same tissue tiles, in one run.

    .venv/bin/python bench/compress.py            # writes bench/results/compress.json and compress.png
    .venv/bin/python bench/compress.py --retired  # and the retired neural models beside the current ones
    .venv/bin/python bench/compress.py --retired --refine 60   # and the current ones with 60 refinement steps

Current models with an encoder add-on (``models/encoder.py``) code with it, as ``convert`` does;
the row ``neural-base`` codes the same models with their own analyses, for comparison.

For each codec and quality setting: mean bits per pixel, mean SSIM (design §8:
pytorch_msssim, 11-px Gaussian window, data_range 255) and PSNR over the tiles, the PSNR of their
mean squared error (``psnr``; a tile that a codec reproduces almost exactly, as JPEG can recode a
JPEG at its own quantisation, would otherwise lift a mean of per-tile PSNRs by whole decibels) beside
the mean of per-tile PSNRs (``psnr_tile_mean``).
Then per codec: bpp at SSIM 0.95 and 0.97 (log-bpp interpolated along the curve),
the saving against JPEG (the better of 4:2:0 and 4:4:4 at that SSIM), BD-rate
against JPEG 4:4:4 (Bjøntegaard, cubic fit of log-rate over PSNR), and the mean
single-thread encode and decode time per tile at the setting nearest SSIM 0.95 (neural
tiles decode in batches of 8, as the server decodes them).  Results are
reported for all tiles, per group (``slides`` / ``patches``), per codec that coded
the source before us (``jpeg_sourced`` / ``jpeg2000_sourced`` / ``unknown_sourced``,
see ``_tiles.source_codec``) and, for neural models, split into the files the
model trained on and what it held out (``HeldOut``: files no training config reads, such as the
Camelyon slide, the configs' evaluation files and the CMU slide's bottom rows).  The main set takes
at most 12 tiles per slide and 2 per patch file; ``held_out_all`` adds every other held-out tissue
tile (coded in the same run, in no other subset), since a handful of tiles is few to judge
generalisation by; ``held_out_all_slides`` / ``held_out_all_patches`` against ``trained_on_slides`` /
``trained_on_patches`` compare the two within each group.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import psnr_batch, ssim_batch
from _tiles import EvalTile, data_files, load_tiles

RESULTS = Path(__file__).resolve().parent / "results"

SWEEPS: dict[str, tuple[str, dict[str, Any], list[Any]]] = {
    # label: (codec name, fixed params, values of the swept param "quality"/"distance").  Dense from
    # about SSIM 0.93 to 0.985: bpp at 0.95 and 0.97 is interpolated between neighbouring points, and
    # along a convex curve a chord over a wide gap overstates a codec's bits (AVIF's 45 -> 60 step,
    # SSIM 0.930 -> 0.968, overstated its bpp at 0.95 by 3 %).
    "jpeg-420": ("jpeg", {"subsampling": "420"}, [30, 50, 65, 75, *range(80, 99, 2)]),
    "jpeg-444": ("jpeg", {"subsampling": "444"}, [30, 50, 65, *range(70, 97, 2)]),
    "jpegxl-e7": ("jpegxl", {"effort": 7}, [40, 55, 70, 75, *range(78, 97, 2), 97]),
    "jpeg2000": ("jpeg2000", {}, [28, *range(30, 43), 44]),
    "webp": ("webp", {}, [30, 50, 70, 74, *range(76, 99, 2)]),
    "avif": ("avif", {"speed": 6}, [30, 40, *range(44, 73, 2), 75, 80, 90]),
}
TARGETS = (0.95, 0.97)


def interp_bpp(points: list[dict[str, Any]], target: float, key: str = "ssim") -> float | None:
    """bpp at ``target`` quality, interpolating log-bpp linearly between sweep points."""
    pts = sorted((p[key], np.log(p["bpp"])) for p in points)
    xs = [p[0] for p in pts]
    if not pts or target < xs[0] or target > xs[-1]:
        return None
    return float(np.exp(np.interp(target, xs, [p[1] for p in pts])))


def bd_rate(ref: list[dict[str, Any]], test: list[dict[str, Any]], key: str = "psnr") -> float | None:
    """Bjøntegaard delta rate (%) of ``test`` against ``ref`` over their overlapping quality range."""
    if len(ref) < 4 or len(test) < 4:
        return None
    r = sorted((p[key], np.log(p["bpp"])) for p in ref)
    t = sorted((p[key], np.log(p["bpp"])) for p in test)
    lo, hi = max(r[0][0], t[0][0]), min(r[-1][0], t[-1][0])
    if hi <= lo:
        return None
    pr = np.polyfit([p[0] for p in r], [p[1] for p in r], 3)
    pt = np.polyfit([p[0] for p in t], [p[1] for p in t], 3)
    ir, it = np.polyint(pr), np.polyint(pt)
    avg = ((np.polyval(it, hi) - np.polyval(it, lo)) - (np.polyval(ir, hi) - np.polyval(ir, lo))) / (hi - lo)
    return float((np.exp(avg) - 1) * 100)


def neural_qualities() -> list[int]:
    from tileserver import codecs

    if "neural" not in codecs.available():
        return []
    qs = []
    for q in range(1, 17):
        try:
            codecs.get("neural", quality=q)
        except ValueError:
            continue
        qs.append(q)
    return qs


@dataclass(frozen=True)
class HeldOut:
    """What the neural models never trained on, from their configs' ``[data]`` sections: the files
    that no ``sources`` glob reads (the Camelyon slide), the ``eval`` files, and the bottom
    ``exclude_rows`` rows of a file (the CMU slide's last 512).  A tile is held out when none of its
    pixels was trained on; one that straddles the CMU slide's cut counts as trained on."""

    sources: frozenset[str] = frozenset()  # globs under the data directory, read by some config
    files: frozenset[str] = frozenset()  # evaluation files of every config
    rows: tuple[tuple[str, int], ...] = ()  # (file, rows at its bottom that no config trained on)

    def __call__(self, t: EvalTile) -> bool:
        if not self.sources:  # no configs: nothing is known to be held out
            return False
        if t.rel in self.files or self.unread(t.rel):
            return True
        return any(t.rel == f and t.y >= t.height - n for f, n in self.rows)

    def unread(self, rel: str) -> bool:
        """Whether no config's ``sources`` reads the file ``rel`` (False when there are no configs)."""
        return bool(self.sources) and not any(fnmatch.fnmatch(rel, g) for g in self.sources)

    def files_with_held_out_tiles(self) -> list[str]:
        return [rel for rel in data_files() if rel in self.files or rel in dict(self.rows) or self.unread(rel)]


def held_out() -> HeldOut:
    """From the neural models' configs (all of them read the same data today): a file is trained on if
    any config reads it, an evaluation file is held out if every config holds it out, and the rows
    held out at a file's bottom are the fewest any config holds out."""
    import tomllib

    cfg_dir = Path(__file__).resolve().parents[1] / "tileserver" / "codecs" / "configs"
    configs = [tomllib.loads(c.read_text()).get("data", {}) for c in sorted(cfg_dir.glob("*.toml"))]
    if not configs:
        return HeldOut()
    sources = {str(g) for data in configs for g in data.get("sources", [])}
    files = set.intersection(*({str(f) for f in data.get("eval", [])} for data in configs))
    rows: dict[str, int] = {}
    for f in {str(f) for data in configs for f in data.get("exclude_rows", {})}:
        rows[f] = min(int(data.get("exclude_rows", {}).get(f, 0)) for data in configs)
    return HeldOut(frozenset(sources), frozenset(files), tuple(sorted((f, n) for f, n in rows.items() if n > 0)))


def run_codec(label: str, codec: Any, tiles: np.ndarray) -> dict[str, Any]:
    getattr(codec, "load", lambda: None)()  # a neural model loads before the clock starts
    t0 = time.perf_counter()
    blobs = [codec.encode(t) for t in tiles]
    encode_ms = (time.perf_counter() - t0) / len(blobs) * 1000
    batch = getattr(codec, "decode_batch", None)
    t0 = time.perf_counter()
    if label.startswith("neural") and batch is not None:
        decoded = []
        for i in range(0, len(blobs), 8):
            decoded.extend(batch(blobs[i : i + 8]))
    else:
        decoded = [codec.decode(b) for b in blobs]
    dt = (time.perf_counter() - t0) / len(blobs)
    out = np.stack([np.asarray(d) for d in decoded])
    bits = np.array([len(b) * 8 for b in blobs], dtype=np.float64)
    npx = tiles.shape[1] * tiles.shape[2]
    return {
        "bpp_per_tile": (bits / npx).tolist(),
        "ssim_per_tile": ssim_batch(tiles, out).tolist(),
        "psnr_per_tile": psnr_batch(tiles, out).tolist(),
        "decode_ms": dt * 1000,
        "encode_ms": encode_ms,
    }


def psnr_of_mean_mse(psnr: np.ndarray) -> float:
    """PSNR of the tiles' mean squared error, from their PSNRs (8-bit peak)."""
    mse = np.mean(255.0**2 * 10.0 ** (-np.asarray(psnr, dtype=np.float64) / 10))
    return float(10 * np.log10(255.0**2 / mse))


def summarise(points: list[dict[str, Any]], mask: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for p in points:
        out.append(
            {
                "param": p["param"],
                "bpp": float(np.mean(np.asarray(p["bpp_per_tile"])[mask])),
                "ssim": float(np.mean(np.asarray(p["ssim_per_tile"])[mask])),
                "psnr": psnr_of_mean_mse(np.asarray(p["psnr_per_tile"])[mask]),
                "psnr_tile_mean": float(np.mean(np.asarray(p["psnr_per_tile"])[mask])),
                "decode_ms": p["decode_ms"],
                "encode_ms": p.get("encode_ms"),
            }
        )
    return out


def report(curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    jpeg_at = {
        t: min(
            (v for v in (interp_bpp(curves.get("jpeg-420", []), t), interp_bpp(curves.get("jpeg-444", []), t)) if v),
            default=None,
        )
        for t in TARGETS
    }
    table: dict[str, Any] = {}
    for label, pts in curves.items():
        row: dict[str, Any] = {}
        for t in TARGETS:
            bpp = interp_bpp(pts, t)
            row[f"bpp@{t}"] = bpp
            ref = jpeg_at[t]
            row[f"x_jpeg@{t}"] = bpp / ref if bpp and ref else None
        row["bd_rate_vs_jpeg444_psnr_%"] = bd_rate(curves.get("jpeg-444", []), pts)
        near = min(pts, key=lambda p: abs(p["ssim"] - 0.95))
        row["decode_ms_near_0.95"] = near["decode_ms"]
        row["encode_ms_near_0.95"] = near.get("encode_ms")
        table[label] = row
    # best classic codec at each target, for the neural ratio
    for t in TARGETS:
        classic = [table[k][f"bpp@{t}"] for k in table if not k.startswith("neural") and table[k][f"bpp@{t}"]]
        best = min(classic) if classic else None
        for k in table:
            bpp = table[k][f"bpp@{t}"]
            table[k][f"x_best_classic@{t}"] = bpp / best if bpp and best else None
    return table


def plot(curves: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for label, pts in curves.items():
        pts = sorted(pts, key=lambda p: p["bpp"])
        style = "o-" if label.startswith("neural") else ".--"
        axes[0].plot([p["bpp"] for p in pts], [p["ssim"] for p in pts], style, label=label)
        axes[1].plot([p["bpp"] for p in pts], [p["psnr"] for p in pts], style, label=label)
    for t in TARGETS:
        axes[0].axhline(t, color="grey", lw=0.5)
    axes[0].set(xlabel="bits per pixel", ylabel="SSIM", title=f"{title}: SSIM", ylim=(0.85, 1.0))
    axes[1].set(xlabel="bits per pixel", ylabel="PSNR (dB)", title=f"{title}: PSNR")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(name: str, table: dict[str, Any]) -> None:
    print(f"\n## {name}")
    hdr = (
        "| codec | bpp@0.95 | ×JPEG | ×best classic | bpp@0.97 | ×JPEG | ×best classic "
        "| BD-rate vs JPEG 4:4:4 | encode ms | decode ms |"
    )
    print(hdr)
    print("|---" * (hdr.count("|") - 1) + "|")

    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, float) else "–"

    for label, r in table.items():
        print(
            f"| {label} | {f(r['bpp@0.95'], '.3f')} | {f(r['x_jpeg@0.95'], '.2f')} | "
            f"{f(r['x_best_classic@0.95'], '.2f')} | {f(r['bpp@0.97'], '.3f')} | {f(r['x_jpeg@0.97'], '.2f')} | "
            f"{f(r['x_best_classic@0.97'], '.2f')} | {f(r['bd_rate_vs_jpeg444_psnr_%'], '+.1f')}% | "
            f"{f(r.get('encode_ms_near_0.95'), '.1f')} | {f(r['decode_ms_near_0.95'], '.2f')} |"
        )


def subset_masks(groups: np.ndarray, sourced: np.ndarray, held: np.ndarray, extra: np.ndarray) -> dict[str, np.ndarray]:
    """The tile subsets reported, as masks over the coded tiles: ``groups`` ("slides" / "patches"),
    ``sourced`` (the codec that coded each tile's source), ``held`` (held out from training) and
    ``extra`` (held-out tiles beyond the main set, in ``held_out_all*`` only)."""
    in_main = ~extra
    subsets = {"all": in_main, "slides": in_main & (groups == "slides"), "patches": in_main & (groups == "patches")}
    for codec_name in ("jpeg", "jpeg2000", "unknown"):
        if (in_main & (sourced == codec_name)).any():
            subsets[f"{codec_name}_sourced"] = in_main & (sourced == codec_name)
    if (in_main & held).any():
        subsets["held_out"] = in_main & held
        subsets["trained_on"] = in_main & ~held
    if extra.any():
        subsets["held_out_all"] = held
    # Slides and patches apart: whether a held-out gap comes with unseen files or with what a group holds.
    for group in ("slides", "patches"):
        if (held & (groups == group)).any() and (in_main & ~held & (groups == group)).any():
            subsets[f"held_out_all_{group}"] = held & (groups == group)
            subsets[f"trained_on_{group}"] = in_main & ~held & (groups == group)
    return subsets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "compress.json")
    ap.add_argument("--per-slide", type=int, default=12)
    ap.add_argument("--per-patch", type=int, default=2)
    ap.add_argument("--no-neural", action="store_true")
    ap.add_argument(
        "--no-held-out-all", action="store_true", help="skip the held-out files' other tiles (subset held_out_all)"
    )
    ap.add_argument(
        "--retired", action="store_true", help="also run the retired neural models (the ones the current replaced)"
    )
    ap.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="STEPS",
        help="also run the current neural models with encoder-side latent refinement of STEPS steps",
    )
    args = ap.parse_args(argv)
    if not 0 <= args.refine <= 1000:
        ap.error(f"--refine must be 0..1000 steps, got {args.refine}")

    import torch

    torch.set_num_threads(1)
    from tileserver import codecs

    t_start = time.time()
    tiles: list[EvalTile] = load_tiles(args.per_slide, args.per_patch)
    held = held_out()
    main_count = len(tiles)
    files = held.files_with_held_out_tiles()
    if files and not args.no_held_out_all:  # every other held-out tissue tile of those files
        have = {(t.source, t.x, t.y) for t in tiles}
        more = load_tiles(10**6, 10**6, only={Path(f).name for f in files})
        tiles += [t for t in more if held(t) and (t.source, t.x, t.y) not in have]
    extra = np.arange(len(tiles)) >= main_count
    pixels = np.stack([t.pixels for t in tiles])
    groups = np.array([t.group for t in tiles])
    held_mask = np.array([held(t) for t in tiles])
    print(
        f"{main_count} tiles ({int((groups[~extra] == 'slides').sum())} slide, "
        f"{int((groups[~extra] == 'patches').sum())} patch; {int(held_mask[~extra].sum())} held out), "
        f"and {int(extra.sum())} more held-out tiles"
    )

    raw: dict[str, list[dict[str, Any]]] = {}
    for label, (name, fixed, values) in SWEEPS.items():
        raw[label] = []
        for v in values:
            codec = codecs.get(name, **fixed, quality=v)
            raw[label].append({"param": v, **run_codec(label, codec, pixels)})
        print(f"  {label}: done ({time.time() - t_start:.0f} s)")
    encoders: dict[int, str | None] = {}
    if not args.no_neural:
        for q in neural_qualities():
            codec = codecs.get("neural", quality=q)
            encoders[q] = codec.params.get("encoder")
            raw.setdefault("neural", []).append({"param": q, **run_codec("neural", codec, pixels)})
        if "neural" in raw:
            print(f"  neural: done ({time.time() - t_start:.0f} s)")
    if any(encoders.values()):
        for q in encoders:
            codec = codecs.get("neural", quality=q, encoder="base")
            raw.setdefault("neural-base", []).append({"param": q, **run_codec("neural", codec, pixels)})
        print(f"  neural-base (the models' own analyses): done ({time.time() - t_start:.0f} s)")
    if args.refine and not args.no_neural:
        for q in neural_qualities():
            codec = codecs.get("neural", quality=q, refine=args.refine)
            raw.setdefault("neural-refined", []).append({"param": q, **run_codec("neural", codec, pixels)})
        if "neural-refined" in raw:
            print(f"  neural-refined ({args.refine} steps): done ({time.time() - t_start:.0f} s)")
    if args.retired and not args.no_neural:
        from tileserver.codecs.neural import retired_models

        for q, sha in sorted(retired_models().items()):
            codec = codecs.get("neural", quality=q, model=sha)
            raw.setdefault("neural-retired", []).append({"param": q, **run_codec("neural", codec, pixels)})
        if "neural-retired" in raw:
            print(f"  neural-retired: done ({time.time() - t_start:.0f} s)")

    subsets = subset_masks(groups, np.array([t.source_codec for t in tiles]), held_mask, extra)
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch_threads": 1},
        "tiles": {k: int(m.sum()) for k, m in subsets.items()},
        "sources": sorted({t.source for t in tiles}),
        "psnr": "PSNR of the tiles' mean squared error; psnr_tile_mean: the mean of per-tile PSNRs",
        "source_codecs": {t.source: t.source_codec for t in tiles},
        "refine_steps": args.refine,
        "encoder_add_ons": {str(q): sha for q, sha in encoders.items()},
        "held_out": {
            "eval_files": sorted(held.files),
            "files_not_trained_on": [f for f in files if held.unread(f)],
            "bottom_rows": dict(held.rows),
        },
        "subsets": {},
        "wall_s": None,
    }
    for name, mask in subsets.items():
        curves = {label: summarise(pts, mask) for label, pts in raw.items()}
        results["subsets"][name] = {"curves": curves, "table": report(curves)}
        print_table(f"{name} ({int(mask.sum())} tiles)", results["subsets"][name]["table"])
    results["wall_s"] = round(time.time() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results["subsets"]["all"]["curves"], args.out.with_suffix(".png"), f"all tiles ({main_count})")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {results['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
