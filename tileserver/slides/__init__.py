"""Slide readers with OpenSlide's API, and ``open_slide`` to pick the right one."""

from __future__ import annotations

from pathlib import Path

from ..errors import SlideNotFound, UnsupportedFormat
from .base import SlideReader, StoredTiles

__all__ = ["SlideReader", "StoredTiles", "detect_format", "open_slide", "resolve_slide_file"]


def resolve_slide_file(path: str | Path) -> Path:
    """The file to open for ``path``: itself, or for a DICOM folder its first ``.dcm`` file.

    OpenSlide opens a DICOM slide from any one of its instance files and finds the
    others in the same folder.
    """
    p = Path(path)
    if p.is_dir():
        dcms = sorted(c for c in p.iterdir() if c.suffix.lower() == ".dcm" and c.is_file())
        if not dcms:
            raise UnsupportedFormat(f"{p}: a folder, but not a DICOM slide (no .dcm files)")
        return dcms[0]
    if not p.exists():
        raise SlideNotFound(f"{p}: no such file")
    return p


def detect_format(path: str | Path) -> str | None:
    """Format name of ``path`` (``"tileserver"`` for our container), or None if unreadable."""
    from .compressed import is_compressed_slide
    from .openslide_reader import OpenSlideReader

    try:
        p = resolve_slide_file(path)
    except (SlideNotFound, UnsupportedFormat):
        return None
    if is_compressed_slide(p):
        return "tileserver"
    try:
        return OpenSlideReader.detect_format(str(p))
    except Exception:
        return None


def open_slide(path: str | Path) -> SlideReader:
    """Open any slide: our compressed container, or anything OpenSlide reads.

    Raises ``SlideNotFound``, ``UnsupportedFormat`` or ``CorruptSlide`` (and
    ``MissingModel`` for a neural slide whose weights are not installed).
    """
    from .compressed import CompressedSlide, is_compressed_slide
    from .openslide_reader import OpenSlideReader

    p = resolve_slide_file(path)
    if is_compressed_slide(p):
        return CompressedSlide(p)
    return OpenSlideReader(p)
