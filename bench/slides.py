"""Whole-slide benchmark: pyramid bytes and tissue fidelity per storage choice, for each shared slide.

    .venv/bin/python bench/slides.py              # writes bench/results/slides.json and slides.png

Each shared slide (CMU SVS, NDPI, DICOM folder) is converted with ``tileserver.convert``
into a temporary folder with each of:

=====================  ==============================================================
JPEG q80 keep          the usual scanner output: every tile JPEG-coded (the reference row)
JPEG q80 fill          glass tiles replaced by the glass colour, then coded
JPEG q80 drop          glass tiles stored as zero-byte entries (sparse index)
JPEG-XL keep / drop    libjxl at quality 80, effort 7
neural keep / drop     our neural codec at a middle quality (skipped with a note when absent)
=====================  ==============================================================

Reported per row: total pyramid bytes (the sum of every level's stored tile bytes,
i.e. the TIFF's TileByteCounts; associated images and metadata excluded, they are
the same in every row), the file size, the percentage saved against the first row,
and mean SSIM / PSNR over *all* level-0 tissue tiles against the source's pixels
(the converter decodes the bytes it wrote; SSIM as design §8).  The tissue tiles
are the same set in every row (the same detector on the same source pixels).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, neural_model_info

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("TILESERVER_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SLIDES = {
    "CMU-1-Small-Region.svs": DATA / "slides" / "CMU-1-Small-Region.svs",
    "test3-TRITC 2 (560).ndpi": DATA / "slides" / "test3-TRITC 2 (560).ndpi",
    "camelyon-dicom": DATA / "slides" / "camelyon-dicom",
}
JPEG_QUALITY = 80
JPEG_SUBSAMPLING = "420"  # what scanners and libjpeg write by default
JPEGXL_QUALITY = 80


def neural_quality(requested: int | None) -> tuple[int | None, str | None]:
    """The neural quality to use (the middle of the shipped ones), or None with the reason."""
    try:
        from tileserver.codecs import neural
    except ImportError as exc:
        return None, f"neural codec not importable: {exc}"
    qs = neural.available_qualities()
    if not qs:
        return None, "no neural weights installed"
    if requested is not None:
        if requested not in qs:
            return None, f"neural quality {requested} not installed (have {qs})"
        return requested, None
    return qs[len(qs) // 2], None  # 1..4 -> 3


def configs(nq: int | None) -> list[tuple[str, str, dict[str, Any], str]]:
    """(label, codec, params, glass) rows; the first row is the reference."""
    jpeg: dict[str, Any] = {"quality": JPEG_QUALITY, "subsampling": JPEG_SUBSAMPLING}
    jxl: dict[str, Any] = {"quality": JPEGXL_QUALITY, "effort": 7}
    rows: list[tuple[str, str, dict[str, Any], str]] = [
        (f"JPEG q{JPEG_QUALITY}, glass keep", "jpeg", jpeg, "keep"),
        (f"JPEG q{JPEG_QUALITY}, glass fill", "jpeg", jpeg, "fill"),
        (f"JPEG q{JPEG_QUALITY}, glass drop", "jpeg", jpeg, "drop"),
        (f"JPEG-XL q{JPEGXL_QUALITY}, glass keep", "jpegxl", jxl, "keep"),
        (f"JPEG-XL q{JPEGXL_QUALITY}, glass drop", "jpegxl", jxl, "drop"),
    ]
    if nq is not None:
        rows += [
            (f"neural q{nq}, glass keep", "neural", {"quality": nq}, "keep"),
            (f"neural q{nq}, glass drop", "neural", {"quality": nq}, "drop"),
        ]
    return rows


def run_slide(name: str, src: Path, rows: list[tuple[str, str, dict[str, Any], str]], tmp: Path) -> dict[str, Any]:
    from tileserver.codecs import get as get_codec
    from tileserver.convert import convert

    out: dict[str, Any] = {"source": str(src), "rows": []}
    for label, codec_name, params, glass in rows:
        dst = tmp / f"{len(out['rows'])}.tiff"
        s = convert(
            src,
            dst,
            codec=get_codec(codec_name, **params),
            glass=glass,
            progress=False,
            workers=2,
            quality_samples=10**9,  # measure every level-0 tissue tile
            any_modality=True,  # measure the neural codec on fluorescence too, to show why convert refuses it
        )
        pyramid = sum(s.level_bytes)
        out["rows"].append(
            {
                "label": label,
                "codec": s.codec,
                "params": s.codec_params,
                "glass": glass,
                "pyramid_bytes": pyramid,
                "file_bytes": s.output_bytes,
                "dropped_tiles": s.dropped_tiles,
                "tissue_ssim": s.mean_ssim,
                "tissue_psnr": s.mean_psnr,
                "tissue_tiles_measured": s.quality_samples,
                "seconds": round(s.seconds, 2),
            }
        )
        out.update(
            dimensions=[s.width, s.height],
            levels=s.levels,
            source_bytes=s.source_bytes,
            tissue_fraction=s.tissue_fraction,
            level0_tiles=s.tiles,
            glass_tiles=s.glass_tiles,
        )
        dst.unlink()
        print(f"  {name}: {label}: {pyramid:,} bytes, SSIM {s.mean_ssim or float('nan'):.4f} ({s.seconds:.1f} s)")
    ref = out["rows"][0]["pyramid_bytes"]
    for r in out["rows"]:
        r["saved_vs_first_%"] = 100 * (1 - r["pyramid_bytes"] / ref) if ref else None
    return out


def print_table(name: str, res: dict[str, Any]) -> None:
    w, h = res["dimensions"]
    print(
        f"\n### {name}: {w} x {h}, {res['levels']} levels, source {res['source_bytes']:,} bytes, "
        f"tissue {res['tissue_fraction']:.1%} of level 0 ({res['level0_tiles'] - res['glass_tiles']} of "
        f"{res['level0_tiles']} tiles)\n"
    )
    print("| storage | pyramid bytes | saved vs first row | tissue SSIM | tissue PSNR (dB) | file bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        ssim = "–" if r["tissue_ssim"] is None else f"{r['tissue_ssim']:.4f}"
        psnr = "–" if r["tissue_psnr"] is None else f"{r['tissue_psnr']:.2f}"
        print(
            f"| {r['label']} | {r['pyramid_bytes']:,} | {r['saved_vs_first_%']:.1f}% | {ssim} | {psnr} "
            f"| {r['file_bytes']:,} |"
        )


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per slide: pyramid bytes of each row against the first, labelled with tissue SSIM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slides = results["slides"]
    fig, axes = plt.subplots(1, len(slides), figsize=(5.5 * len(slides), 4.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], slides.items(), strict=True):
        rows = res["rows"]
        ref = rows[0]["pyramid_bytes"]
        vals = [100 * r["pyramid_bytes"] / ref for r in rows]
        colors = [
            "#4c72b0" if r["codec"] == "jpeg" else "#55a868" if r["codec"] == "jpegxl" else "#c44e52" for r in rows
        ]
        bars = ax.barh(range(len(rows)), vals, color=colors)
        for bar, r in zip(bars, rows, strict=True):
            ssim = "–" if r["tissue_ssim"] is None else f"{r['tissue_ssim']:.3f}"
            ax.annotate(f" SSIM {ssim}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(100, color="grey", lw=0.6)
        ax.set(xlabel="pyramid bytes, % of the first row", title=name)
        ax.margins(x=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "slides.json")
    ap.add_argument("--neural-quality", type=int, default=None, help="default: the middle shipped quality")
    ap.add_argument("--no-neural", action="store_true")
    ap.add_argument("--slide", action="append", choices=sorted(SLIDES), help="only these slides (repeatable)")
    args = ap.parse_args(argv)

    t0 = time.time()
    notes: list[str] = []
    nq, why = (None, "skipped (--no-neural)") if args.no_neural else neural_quality(args.neural_quality)
    if why:
        notes.append(f"neural rows left out: {why}")
        print(f"note: neural rows left out: {why}")
    rows = configs(nq)
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "jpeg": {"quality": JPEG_QUALITY, "subsampling": JPEG_SUBSAMPLING},
            "jpegxl": {"quality": JPEGXL_QUALITY, "effort": 7},
            "neural_quality": nq,
            "neural_model": neural_model_info(nq),
            "convert_workers": 2,
        },
        "slides": {},
        "notes": notes,
    }
    with tempfile.TemporaryDirectory(prefix="tileserver-bench-slides-") as tmp:
        for name, src in SLIDES.items():
            if args.slide and name not in args.slide:
                continue
            if not src.exists():
                notes.append(f"{name}: not found at {src}")
                continue
            results["slides"][name] = run_slide(name, src, rows, Path(tmp))
    results["wall_s"] = round(time.time() - t0, 1)
    for name, res in results["slides"].items():
        print_table(name, res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    if results["slides"]:
        plot(results, args.out.with_suffix(".png"))
    print(json.dumps({k: results[k] for k in ("machine", "settings", "notes", "wall_s")}, indent=1))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {results['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
