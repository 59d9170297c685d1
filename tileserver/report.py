"""``tileserver report SLIDE_OR_DIR``: fidelity and savings report of converted slides (HTML + JSON).

For one compressed slide the report shows

* **bytes per level**, read from the TIFF's own ``TileByteCounts`` (tifffile), with
  the number of zero-byte (dropped glass) tiles per level;
* **tissue fraction** and a **tissue-mask overlay** on the thumbnail (glass tiles shaded);
* the **SSIM / PSNR distribution** of level-0 tissue tiles against the source slide
  (SSIM as design §8 defines it, computed by ``tileserver.convert.ssim``);
* the **worst tiles** side by side with the source (source | converted | difference x4);
* the **rate–distortion position against JPEG**: a JPEG curve (libjpeg-turbo 4:2:0
  and 4:4:4, the better at each SSIM, design §8) computed on a sample of the slide's
  full-size tissue tiles, and the slide's own point (its stored bytes and SSIM on
  the same tiles), with the saving against JPEG at equal SSIM.

The source slide is ``--source`` or, failing that, the file named in the
container's metadata (``source.name``) looked up beside the converted file and in
its parent folder.  Without a source the fidelity sections are left out and the
report says so.  Plots are matplotlib (Agg) PNGs written beside ``report.html``.

Coordinate names follow ``tileserver.deepzoom``: ``t_`` stored-tile column/row,
``l0_`` level-0 pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ConfigError, SlideNotFound, TileServerError, UnsupportedFormat

__all__ = ["REPORT_VERSION", "add_cli", "find_source", "make_report", "make_reports"]

Pixels = npt.NDArray[np.uint8]

#: bumped when a key of the JSON report changes meaning or disappears
REPORT_VERSION = 1
#: JPEG qualities swept for the rate-distortion reference curve
JPEG_QUALITIES = (10, 20, 30, 45, 60, 70, 80, 85, 90, 95, 98)
JPEG_SUBSAMPLINGS = ("420", "444")
#: longest side of the thumbnail the mask is drawn on
THUMBNAIL_SIZE = 1024
#: gain applied to |source - converted| in the worst-tile pictures, so small errors are visible
DIFF_GAIN = 4


@dataclass(frozen=True)
class _Tile:
    col: int
    row: int
    source: Pixels
    decoded: Pixels
    stored_bytes: int
    ssim: float
    psnr: float


# ---------------------------------------------------------------------------------------------
# Finding things
# ---------------------------------------------------------------------------------------------
def find_source(slide: str | Path, source_name: str | None, hint: str | Path | None = None) -> Path | None:
    """The source slide of the converted ``slide``, or None when it cannot be found.

    ``hint`` is a source slide (file or DICOM folder: used as is) or a folder searched,
    recursively, for an entry named ``source_name``.  Without a hint the converted
    file's folder and its parent are searched (not recursively).
    """
    slide = Path(slide)
    if hint is not None:
        h = Path(hint)
        if not h.exists():
            raise SlideNotFound(f"{h}: source not found")
        if h.is_file() or _is_dicom_dir(h):
            return h
        if not source_name:
            return None
        direct = h / source_name
        if direct.exists():
            return direct
        for found in sorted(h.rglob(source_name)):
            return found
        return None
    if not source_name:
        return None
    for folder in (slide.parent, slide.parent.parent):
        candidate = folder / source_name
        if candidate.exists() and candidate.resolve() != slide.resolve():
            return candidate
    return None


def _is_dicom_dir(p: Path) -> bool:
    return p.is_dir() and any(c.suffix.lower() == ".dcm" for c in p.iterdir())


def _compressed_slides(root: Path) -> list[Path]:
    from .slides.compressed import is_compressed_slide

    return [p for p in sorted(root.rglob("*")) if p.is_file() and is_compressed_slide(p)]


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def _level_bytes(path: Path, metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level: size, tile count, zero-byte tiles and bytes, from the TIFF's TileByteCounts."""
    import tifffile

    out = []
    with tifffile.TiffFile(path) as tif:
        for i, lv in enumerate(metadata["levels"]):
            page = tif.pages[int(lv["ifd"])]
            if not isinstance(page, tifffile.TiffPage):  # a TiffFrame: tifffile did not parse this IFD's tags
                raise UnsupportedFormat(f"{path}: level {i} IFD {lv['ifd']} is unreadable")
            counts = np.asarray(page.tags["TileByteCounts"].value, dtype=np.int64)
            out.append(
                {
                    "level": i,
                    "width": int(lv["width"]),
                    "height": int(lv["height"]),
                    "downsample": float(lv.get("downsample", 2**i)),
                    "tiles": int(counts.size),
                    "zero_byte_tiles": int(np.count_nonzero(counts == 0)),
                    "bytes": int(counts.sum()),
                }
            )
    return out


def _read_source_tile(source: Any, l0_x: int, l0_y: int, w: int, h: int, glass: Pixels) -> Pixels:
    """Level-0 RGB pixels of the source, transparent pixels blended onto the glass colour (as convert does)."""
    region = np.asarray(source.read_region((l0_x, l0_y), 0, (w, h)), dtype=np.uint8)
    alpha = region[:, :, 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(region[:, :, :3])
    a = alpha.astype(np.uint16)
    mixed = (region[:, :, :3].astype(np.uint16) * a + glass.astype(np.uint16) * (255 - a) + 127) // 255
    return mixed.astype(np.uint8)


def _glass_grid(slide: Any, source: Any | None) -> npt.NDArray[np.bool_]:
    """Level-0 glass flags (rows x cols): the sparse index for ``drop``, else the classic detector.

    The detector runs on the source's tiles when the source is known (what the
    converter judged), else on the decoded stored tiles.
    """
    from . import tissue

    cols, rows = slide.grid(0)
    grid = np.zeros((rows, cols), dtype=bool)
    if slide.glass_strategy == "drop":
        for t_row in range(rows):
            for t_col in range(cols):
                grid[t_row, t_col] = slide.is_glass(0, t_col, t_row)
        return grid
    kind = str((slide.metadata.get("glass") or {}).get("kind", "brightfield"))
    background = tissue.Background(
        color=slide.glass_color, kind="fluorescence" if kind == "fluorescence" else "brightfield"
    )
    detector = tissue.get_detector("classic")
    ts = slide.tile_size
    glass = np.asarray(slide.glass_color, np.uint8)
    for t_row in range(rows):
        tiles = []
        for t_col in range(cols):
            h, w = slide.tile_shape(0, t_col, t_row)
            if source is not None:
                tiles.append(_read_source_tile(source, t_col * ts, t_row * ts, w, h, glass))
            else:
                tiles.append(slide.read_tile(0, t_col, t_row))
        grid[t_row] = detector.glass_flags(tiles, background)
    return grid


def _spread(items: Sequence[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """At most ``limit`` items spread evenly over ``items`` (deterministic)."""
    if len(items) <= limit:
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))
    return [items[i] for i in idx]


def _measure_tiles(slide: Any, source: Any, addresses: Sequence[tuple[int, int]]) -> list[_Tile]:
    from .convert import psnr, ssim

    ts = slide.tile_size
    glass = np.asarray(slide.glass_color, np.uint8)
    out = []
    for t_col, t_row in addresses:
        h, w = slide.tile_shape(0, t_col, t_row)
        src = _read_source_tile(source, t_col * ts, t_row * ts, w, h, glass)
        dec = slide.read_tile(0, t_col, t_row)
        s = ssim(src, dec)
        if s is None:  # sliver smaller than the SSIM window
            continue
        out.append(_Tile(t_col, t_row, src, dec, len(slide.read_tile_bytes(0, t_col, t_row)), s, psnr(src, dec)))
    return out


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p5": None, "min": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "p5": float(np.percentile(a, 5)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def _interp_bpp(points: Sequence[dict[str, float]], target: float) -> float | None:
    """bpp at SSIM ``target``, log-bpp interpolated linearly along the curve (None outside it)."""
    pts = sorted((p["ssim"], math.log(p["bpp"])) for p in points if p["bpp"] > 0)
    if len(pts) < 2 or not pts[0][0] <= target <= pts[-1][0]:
        return None
    return float(math.exp(float(np.interp(target, [p[0] for p in pts], [p[1] for p in pts]))))


def _jpeg_curves(tiles: Sequence[_Tile]) -> dict[str, list[dict[str, float]]]:
    """Mean bpp / SSIM / PSNR of JPEG 4:2:0 and 4:4:4 over ``tiles`` at each quality."""
    from .codecs import get as get_codec
    from .convert import psnr, ssim

    curves: dict[str, list[dict[str, float]]] = {}
    for sub in JPEG_SUBSAMPLINGS:
        pts = []
        for q in JPEG_QUALITIES:
            codec = get_codec("jpeg", quality=q, subsampling=sub)
            bits, ss, ps = [], [], []
            for t in tiles:
                blob = codec.encode(t.source)
                dec = codec.decode(blob)
                bits.append(len(blob) * 8 / (t.source.shape[0] * t.source.shape[1]))
                ss.append(ssim(t.source, dec) or 0.0)
                ps.append(psnr(t.source, dec))
            pts.append(
                {"quality": q, "bpp": float(np.mean(bits)), "ssim": float(np.mean(ss)), "psnr": float(np.mean(ps))}
            )
        curves[sub] = pts
    return curves


def _rate_distortion(tiles: Sequence[_Tile], ts: int) -> dict[str, Any]:
    # Only full-size tiles: edge tiles are coded padded to ts x ts, which would inflate their bpp.
    full = [t for t in tiles if t.source.shape[:2] == (ts, ts)]
    if not full:
        return {"sample_tiles": 0}
    curves = _jpeg_curves(full)
    point = {
        "bpp": float(np.mean([t.stored_bytes * 8 / (ts * ts) for t in full])),
        "ssim": float(np.mean([t.ssim for t in full])),
        "psnr": float(np.mean([t.psnr for t in full])),
    }
    per_sub = {s: _interp_bpp(curves[s], point["ssim"]) for s in JPEG_SUBSAMPLINGS}
    candidates = [v for v in per_sub.values() if v is not None]
    # design §8: JPEG's curve is the better of 4:2:0 and 4:4:4 at each point
    jpeg_bpp = min(candidates) if candidates else None
    return {
        "sample_tiles": len(full),
        "slide": point,
        "jpeg": curves,
        "jpeg_bpp_at_slide_ssim": jpeg_bpp,
        # > 0: the slide needs fewer bits than JPEG at the same SSIM
        "saving_vs_jpeg": (1 - point["bpp"] / jpeg_bpp) if jpeg_bpp else None,
        "saving_vs_jpeg_by_subsampling": {s: (1 - point["bpp"] / v) if v else None for s, v in per_sub.items()},
    }


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # matplotlib is needed only here
        raise ConfigError("tileserver report needs matplotlib (pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_levels(levels: Sequence[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = [lv["level"] for lv in levels]
    kb = [lv["bytes"] / 1024 for lv in levels]
    bars = ax.bar(xs, kb, color="#4c72b0")
    for bar, lv in zip(bars, levels, strict=True):
        label = f"{lv['tiles']} tiles"
        if lv["zero_byte_tiles"]:
            label += f"\n{lv['zero_byte_tiles']} dropped"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set(xlabel="level (0 = full resolution)", ylabel="KiB", title="stored bytes per pyramid level", xticks=xs)
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_mask(slide: Any, glass: npt.NDArray[np.bool_], path: Path) -> None:
    plt = _pyplot()
    thumb = np.asarray(slide.get_thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE)).convert("RGB"))
    l0_w, l0_h = slide.dimensions
    ts = slide.tile_size
    rows, cols = glass.shape
    fig, ax = plt.subplots(figsize=(7, 7 * l0_h / max(l0_w, 1) + 0.6))
    ax.imshow(thumb, extent=(0, l0_w, l0_h, 0))
    overlay = np.zeros((rows, cols, 4), np.float32)
    overlay[glass] = (0.1, 0.3, 0.9, 0.45)
    ax.imshow(overlay, extent=(0, cols * ts, rows * ts, 0), interpolation="nearest")
    ax.set(
        xlim=(0, l0_w), ylim=(l0_h, 0), title=f"glass tiles shaded ({int(glass.sum())} of {glass.size} level-0 tiles)"
    )
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_quality(tiles: Sequence[_Tile], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, unit in ((axes[0], "ssim", ""), (axes[1], "psnr", " (dB)")):
        vals = [getattr(t, key) for t in tiles]
        ax.hist(vals, bins=30, color="#55a868")
        ax.axvline(float(np.mean(vals)), color="k", lw=1, ls="--", label=f"mean {np.mean(vals):.4g}")
        ax.set(
            xlabel=key.upper() + unit, ylabel="tissue tiles", title=f"{key.upper()} of {len(vals)} level-0 tissue tiles"
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_rd(rd: dict[str, Any], codec: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for sub, pts in rd["jpeg"].items():
        ax.plot([p["bpp"] for p in pts], [p["ssim"] for p in pts], ".--", label=f"JPEG {sub[0]}:{sub[1]}:{sub[2]}")
    pt = rd["slide"]
    ax.plot([pt["bpp"]], [pt["ssim"]], "r*", ms=14, label=f"this slide ({codec})")
    ax.set(
        xlabel="bits per pixel (stored)",
        ylabel="SSIM",
        title=f"rate–distortion on {rd['sample_tiles']} tissue tiles of this slide",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save_side_by_side(t: _Tile, path: Path) -> None:
    from PIL import Image

    diff = np.clip(np.abs(t.source.astype(np.int16) - t.decoded.astype(np.int16)) * DIFF_GAIN, 0, 255).astype(np.uint8)
    h, w = t.source.shape[:2]
    gap = 4
    canvas = np.full((h, 3 * w + 2 * gap, 3), 255, np.uint8)
    for i, img in enumerate((t.source, t.decoded, diff)):
        canvas[:, i * (w + gap) : i * (w + gap) + w] = img
    Image.fromarray(canvas, "RGB").save(path)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _render(template: str, out: Path, **context: Any) -> None:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["kib"] = lambda n: "–" if n is None else f"{n / 1024:,.1f} KiB"
    env.filters["pct"] = lambda v: "–" if v is None else f"{v * 100:.1f}%"
    env.filters["num"] = lambda v, spec=".4f": "–" if v is None else format(v, spec)
    out.write_text(env.get_template(template).render(**context), encoding="utf-8")


def make_report(
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    source: str | Path | None = None,
    max_tiles: int = 1000,
    worst: int = 6,
    rd_tiles: int = 16,
) -> dict[str, Any]:
    """Write ``report.html``, ``report.json`` and PNGs for one compressed slide into ``out_dir``.

    ``source`` is the source slide (or a folder holding it); None looks beside the
    converted file (see ``find_source``).  ``max_tiles`` bounds the level-0 tissue
    tiles measured (spread evenly over the slide), ``worst`` how many worst tiles are
    shown, ``rd_tiles`` how many full tissue tiles the JPEG reference curve is computed
    on.  Returns the JSON report.  Raises ``UnsupportedFormat`` when the slide is not
    a compressed slide or the source does not match it, ``SlideNotFound`` for a
    missing path.
    """
    from .convert import source_bytes as bytes_on_disk
    from .slides import open_slide
    from .slides.compressed import CompressedSlide, is_compressed_slide

    t_start = time.perf_counter()
    slide_path, out = Path(slide_path), Path(out_dir)
    if max_tiles < 1 or worst < 0 or rd_tiles < 1:
        raise ConfigError(f"max_tiles and rd_tiles must be >= 1 and worst >= 0 (got {max_tiles}, {rd_tiles}, {worst})")
    if not slide_path.exists():
        raise SlideNotFound(f"{slide_path}: no such file")
    if not is_compressed_slide(slide_path):
        raise UnsupportedFormat(f"{slide_path}: not a tileserver compressed slide (convert it first)")
    out.mkdir(parents=True, exist_ok=True)
    with CompressedSlide(slide_path) as slide:
        meta = dict(slide.metadata)
        src_meta = meta.get("source") or {}
        src_path = find_source(slide_path, src_meta.get("name"), source)
        src_slide = open_slide(src_path) if src_path is not None else None
        try:
            if src_slide is not None and tuple(src_slide.dimensions) != tuple(slide.dimensions):
                raise UnsupportedFormat(
                    f"{src_path}: is {src_slide.dimensions[0]}x{src_slide.dimensions[1]}, but {slide_path} is "
                    f"{slide.dimensions[0]}x{slide.dimensions[1]}: not its source"
                )
            report = _build(slide, slide_path, src_slide, src_path, meta, out, max_tiles, worst, rd_tiles)
        finally:
            if src_slide is not None:
                src_slide.close()
    report["source"]["bytes_on_disk"] = bytes_on_disk(src_path) if src_path is not None else None
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    _render("report.html.j2", out / "report.html", r=report)
    return report


def _build(
    slide: Any,
    slide_path: Path,
    src_slide: Any | None,
    src_path: Path | None,
    meta: dict[str, Any],
    out: Path,
    max_tiles: int,
    worst: int,
    rd_tiles: int,
) -> dict[str, Any]:
    levels = _level_bytes(slide_path, meta)
    pyramid_bytes = sum(lv["bytes"] for lv in levels)
    file_bytes = slide_path.stat().st_size
    src_meta = meta.get("source") or {}
    recorded_src_bytes = src_meta.get("bytes")
    glass = _glass_grid(slide, src_slide)
    tissue_tiles = [(c, r) for r in range(glass.shape[0]) for c in range(glass.shape[1]) if not glass[r, c]]
    images: dict[str, str] = {"levels": "levels.png", "mask": "mask.png"}
    _plot_levels(levels, out / images["levels"])
    _plot_mask(slide, glass, out / images["mask"])

    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "slide": str(slide_path),
        "codec": slide.codec,
        "codec_params": dict(slide.tile_codec.params),
        "glass": slide.glass_strategy,
        "glass_color": list(slide.glass_color),
        "dimensions": list(slide.dimensions),
        "mpp": list(slide.mpp) if slide.mpp else None,
        "tile_size": slide.tile_size,
        "file_bytes": file_bytes,
        "pyramid_bytes": pyramid_bytes,
        "levels": levels,
        "source": {
            "name": src_meta.get("name"),
            "path": str(src_path) if src_path is not None else None,
            "format": src_meta.get("format"),
            "bytes": recorded_src_bytes,
        },
        "saved_vs_source": (1 - file_bytes / recorded_src_bytes) if recorded_src_bytes else None,
        "ratio_vs_source": (recorded_src_bytes / file_bytes) if recorded_src_bytes else None,
        "tissue_fraction": meta.get("tissue_fraction"),
        "tissue_tiles": len(tissue_tiles),
        "glass_tiles": int(glass.sum()),
        "quality": None,
        "worst_tiles": [],
        "rate_distortion": None,
        "images": images,
        "notes": [],
    }
    if src_slide is None:
        report["notes"].append(
            f"source slide {src_meta.get('name')!r} not found (give --source): fidelity sections left out"
        )
        return report
    sample = _spread(tissue_tiles, max_tiles)
    measured = _measure_tiles(slide, src_slide, sample)
    if not measured:
        report["notes"].append("no level-0 tissue tiles to measure")
        return report
    report["quality"] = {
        "tiles": len(measured),
        "of_tissue_tiles": len(tissue_tiles),
        "ssim": _stats([t.ssim for t in measured]),
        "psnr": _stats([t.psnr for t in measured]),
        "ssim_histogram": _histogram([t.ssim for t in measured]),
        "psnr_histogram": _histogram([t.psnr for t in measured]),
    }
    images["quality"] = "quality.png"
    _plot_quality(measured, out / images["quality"])
    for i, t in enumerate(sorted(measured, key=lambda t: t.ssim)[: max(0, worst)]):
        name = f"worst-{i + 1}.png"
        _save_side_by_side(t, out / name)
        report["worst_tiles"].append(
            {
                "level": 0,
                "col": t.col,
                "row": t.row,
                "ssim": t.ssim,
                "psnr": t.psnr,
                "bytes": t.stored_bytes,
                "image": name,
            }
        )
    rd_sample = [measured[i] for i in _spread_idx(len(measured), rd_tiles)]
    rd = _rate_distortion(rd_sample, slide.tile_size)
    report["rate_distortion"] = rd
    if rd.get("slide"):
        images["rate_distortion"] = "rate_distortion.png"
        _plot_rd(rd, str(slide.codec), out / images["rate_distortion"])
    else:
        report["notes"].append("no full-size tissue tiles: rate–distortion position left out")
    return report


def _spread_idx(n: int, limit: int) -> list[int]:
    if n <= limit:
        return list(range(n))
    return [int(i) for i in np.unique(np.linspace(0, n - 1, limit).round().astype(int))]


def _histogram(values: Sequence[float], bins: int = 20) -> dict[str, list[float]]:
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)
    return {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges]}


def make_reports(
    root: str | Path, out_dir: str | Path, *, source: str | Path | None = None, **kwargs: Any
) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """A report per compressed slide under ``root`` (in ``out_dir/<relative path>/``) and an ``index.html``.

    ``source`` is a folder searched for each slide's source by name.  Returns
    (reports, failures); one bad slide does not stop the rest.
    """
    root, out = Path(root), Path(out_dir)
    slides = _compressed_slides(root)
    if not slides:
        raise SlideNotFound(f"{root}: no tileserver compressed slides found")
    out.mkdir(parents=True, exist_ok=True)
    reports: list[dict[str, Any]] = []
    failed: list[tuple[Path, str]] = []
    for p in slides:
        rel = p.relative_to(root)
        sub = out / rel.parent / rel.stem
        try:
            r = make_report(p, sub, source=source, **kwargs)
        except TileServerError as exc:
            failed.append((p, str(exc)))
            continue
        r["href"] = (rel.parent / rel.stem / "report.html").as_posix()
        reports.append(r)
    total_src = sum(r["source"]["bytes"] or 0 for r in reports)
    total_out = sum(r["file_bytes"] for r in reports)
    summary = {
        "report_version": REPORT_VERSION,
        "root": str(root),
        "slides": reports,
        "failed": [{"slide": str(p), "error": msg} for p, msg in failed],
        "source_bytes": total_src,
        "file_bytes": total_out,
        "saved_vs_source": (1 - total_out / total_src) if total_src else None,
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    _render("report-index.html.j2", out / "index.html", s=summary)
    return reports, failed


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _cmd_report(args: argparse.Namespace) -> int:
    target = Path(args.path)
    if not target.exists():
        raise SlideNotFound(f"{target}: no such file or directory")
    kwargs: dict[str, Any] = {"source": args.source, "max_tiles": args.max_tiles, "worst": args.worst}
    if target.is_dir():
        out = Path(args.out) if args.out else Path.cwd() / f"{target.resolve().name}-report"
        reports, failed = make_reports(target, out, **kwargs)
        for p, msg in failed:
            print(f"tileserver report: error: {msg if str(p) in msg else f'{p}: {msg}'}", file=sys.stderr)
        print(f"{len(reports)} reports, {len(failed)} failed: {out / 'index.html'}")
        return 1 if failed else 0
    out = Path(args.out) if args.out else Path.cwd() / f"{target.stem}-report"
    r = make_report(target, out, **kwargs)
    q = r["quality"]
    rd = r["rate_distortion"] or {}
    print(f"report: {out / 'report.html'}")
    print(
        f"  {r['codec']} {json.dumps(r['codec_params'], sort_keys=True)}, glass {r['glass']}, "
        f"{r['file_bytes']:,} bytes"
        + (f" ({r['ratio_vs_source']:.1f}x smaller than source)" if r["ratio_vs_source"] else "")
    )
    if q:
        print(
            f"  SSIM mean {q['ssim']['mean']:.4f} (min {q['ssim']['min']:.4f}), PSNR mean {q['psnr']['mean']:.2f} dB "
            f"over {q['tiles']} tissue tiles"
        )
    if rd.get("saving_vs_jpeg") is not None:
        print(f"  {rd['saving_vs_jpeg']:+.1%} bits against JPEG at equal SSIM ({rd['sample_tiles']} tiles)")
    for note in r["notes"]:
        print(f"  note: {note}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``tileserver report``."""
    p = subparsers.add_parser(
        "report",
        help="HTML + JSON fidelity and savings report of converted slides",
        description="Write a fidelity and savings report (bytes per level, tissue mask, SSIM/PSNR of tissue tiles "
        "against the source, worst tiles, rate-distortion position against JPEG) for a converted slide, or for "
        "every converted slide under a folder (with an index.html).",
    )
    p.add_argument("path", metavar="SLIDE_OR_DIR", help="converted .tiff, or a folder of them")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: ./<name>-report)")
    p.add_argument(
        "--source",
        metavar="SRC",
        default=None,
        help="source slide (or a folder holding the sources); default: looked up by name beside the converted file",
    )
    p.add_argument("--max-tiles", type=int, default=1000, help="level-0 tissue tiles measured (default 1000)")
    p.add_argument("--worst", type=int, default=6, help="worst tiles shown (default 6)")
    p.set_defaults(func=_cmd_report)
