"""``tileserver info PATH [--json]``: what a slide is, for any slide ``open_slide`` reads."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import SlideNotFound

__all__ = ["add_cli", "slide_info"]


def slide_info(path: str | Path) -> dict[str, Any]:
    """Dimensions, levels, mpp, format, codec, glass fraction and size on disk of the slide at ``path``.

    ``glass_fraction`` is the fraction of level-0 tiles stored as dropped glass
    (our files; None for other formats).  ``file_bytes`` counts every file of a
    multi-file slide (a DICOM folder).
    """
    from .convert import source_bytes
    from .slides import open_slide

    p = Path(path)
    if not p.exists():
        raise SlideNotFound(f"{p}: no such file or directory")
    with open_slide(p) as slide:
        out = slide.info()
        out.setdefault("glass_fraction", None)
        out["file_bytes"] = source_bytes(p)
        out["path"] = str(p)
    return out


def _format_table(info: dict[str, Any]) -> str:
    mpp = info.get("mpp")
    rows = [
        ("path", info["path"]),
        ("format", info["format"]),
        ("codec", info.get("codec") or "-"),
        ("dimensions", " x ".join(str(v) for v in info["dimensions"])),
        (
            "levels",
            f"{info['level_count']}: " + ", ".join(f"{w}x{h}" for w, h in info["level_dimensions"]),
        ),
        ("mpp", "-" if not mpp else f"{mpp[0]:.4f} x {mpp[1]:.4f}"),
        ("file size", f"{info['file_bytes']:,} bytes"),
    ]
    if info.get("glass_fraction") is not None:
        rows.append(("glass", f"{info.get('glass', '-')}, {info['glass_fraction']:.1%} of level-0 tiles dropped"))
    if info.get("tissue_fraction") is not None:
        rows.append(("tissue", f"{info['tissue_fraction']:.1%}"))
    if info.get("source_bytes"):
        rows.append(
            ("source size", f"{info['source_bytes']:,} bytes ({info['source_bytes'] / info['file_bytes']:.1f}x)")
        )
    if info.get("associated_images"):
        rows.append(("associated", ", ".join(info["associated_images"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _cmd_info(args: argparse.Namespace) -> int:
    info = slide_info(args.path)
    if args.json:
        json.dump(info, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(_format_table(info))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``tileserver info``."""
    p = subparsers.add_parser(
        "info",
        help="show a slide's dimensions, levels, mpp, codec, glass fraction and size",
        description="Describe any slide tileserver can open (our compressed files, SVS, NDPI, DICOM folders, ...).",
    )
    p.add_argument("path", metavar="PATH", help="slide file or DICOM folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)
