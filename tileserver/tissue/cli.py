"""``tileserver tissue SLIDE...``: background, tissue fraction and glass tiles of slides (level 0, 256 px tiles)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TileServerError

__all__ = ["add_cli", "slide_report"]

TILE = 256


def slide_report(path: Path, detector_name: str = "classic") -> dict[str, Any]:
    """Background, kind, tile count and tissue fraction of one slide, reading level 0 one tile row at a time."""
    from ..slides import open_slide
    from . import estimate_background, get_detector, tissue_fraction

    detector = get_detector(detector_name)
    t0 = time.perf_counter()
    with open_slide(path) as slide:
        background = estimate_background(slide)
        w, h = slide.dimensions
        flags: list[bool] = []
        for y in range(0, h, TILE):
            th = min(TILE, h - y)
            row = np.asarray(slide.read_region((0, y), 0, (w, th)).convert("RGB"))
            tiles = [row[:, x : x + TILE] for x in range(0, w, TILE)]
            flags.extend(detector.glass_flags(tiles, background))
    return {
        "path": str(path),
        "detector": detector_name,
        "background": list(background.color),
        "kind": background.kind,
        "tiles": len(flags),
        "glass_tiles": sum(flags),
        "tissue_fraction": round(tissue_fraction(flags), 4),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _run(args: argparse.Namespace) -> int:
    status = 0
    reports = []
    for p in args.slides:
        try:
            reports.append(slide_report(Path(p), args.detector))
        except (TileServerError, ValueError) as exc:
            print(f"error: {p}: {exc}", file=sys.stderr)
            status = 1
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        for r in reports:
            print(
                f"{r['path']}: {r['kind']} background {tuple(r['background'])}, "
                f"tissue {r['tissue_fraction']:.1%} of {r['tiles']} tiles ({r['glass_tiles']} glass), "
                f"{r['detector']}, {r['seconds']} s"
            )
    return status


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``tissue``: report each slide's background and tissue fraction."""
    p = subparsers.add_parser(
        "tissue",
        help="report background colour and tissue fraction of slides",
        description="Estimate each slide's background and count its level-0 glass and tissue tiles (256 px).",
    )
    p.add_argument("slides", nargs="+", help="slide files (or DICOM folders)")
    p.add_argument("--detector", choices=("classic", "cnn"), default="classic")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)
