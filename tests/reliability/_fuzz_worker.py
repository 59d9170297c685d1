"""Child process for the container fuzz test: opens and reads damaged slides, one per request.

Run as ``python -m tests.reliability._fuzz_worker LIMIT_MB``.  It caps its own
address space at its size now plus ``LIMIT_MB`` (so an unbounded allocation
fails fast instead of eating the machine), then reads one JSON request per line
on stdin (``{"path": ...}``) and answers one JSON line on stdout::

    {"ok": true,  "tiles": n, "tile_errors": n, "maxrss_kb": n, "peak_traced_kb": n}   opened and read
    {"ok": false, "type": "CorruptSlide", "ours": true, "memory": false, "message": ...}

``ours`` says whether the error is a ``TileServerError``; ``memory`` whether a
``MemoryError`` was raised anywhere on the way (even if it was wrapped), which
the test treats as a failure, as it does a traced allocation peak (numpy
arrays included) above its bound: a damaged file must be rejected before any large
allocation.  A hang or a crash shows as no answer (the parent's timeout / EOF).
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import traceback
import tracemalloc
from typing import Any


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmHWM`` rather than ``ru_maxrss``: the latter keeps the
    RSS of the forking parent across ``exec``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost tileserver frame that raised (to route a bug to its module)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/tileserver/" in f.filename]
    return f"{frames[-1].filename.split('/tileserver/')[-1]}:{frames[-1].lineno}" if frames else "?"


def exercise(path: str) -> dict[str, Any]:
    """Open ``path`` the way the server does and read everything a client can ask for."""
    from tileserver.deepzoom import DeepZoom
    from tileserver.errors import CorruptTile
    from tileserver.slides import open_slide

    slide = open_slide(path)
    tiles = errors = 0
    try:
        dict(slide.properties)
        dz = DeepZoom(slide, 256, 0, True)
        dz.dzi("jpeg")
        stored = slide.stored_tiles()
        if stored is not None:
            for level in range(slide.level_count):
                cols, rows = stored.grid(level)
                for row in range(rows):
                    for col in range(cols):
                        try:
                            stored.read_tile(level, col, row)
                            tiles += 1
                        except CorruptTile:
                            errors += 1  # one tile failing alone is the contract
        # a few Deep Zoom tiles (region path) and the thumbnail
        for dz_level in (dz.level_count - 1, dz.level_count // 2):
            cols, rows = dz.level_tiles[dz_level]
            for t in ((0, 0), (cols - 1, rows - 1)):
                try:
                    dz.tile_image(dz_level, *t)
                except CorruptTile:
                    errors += 1
        try:
            slide.get_thumbnail((128, 128))
        except CorruptTile:
            errors += 1
        for name in list(slide.associated_images):
            slide.associated_images[name].load()
    finally:
        slide.close()
    return {"tiles": tiles, "tile_errors": errors}


def main() -> int:
    import logging

    logging.disable(logging.CRITICAL)  # tifffile logs every damaged tag it skips
    limit_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 768
    # Import everything first, so the cap measures what reading a file costs.
    import tileserver.deepzoom
    import tileserver.slides.compressed
    import tileserver.slides.openslide_reader  # noqa: F401
    from tileserver.errors import TileServerError

    cap = (_status_kb("VmSize") + limit_mb * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    tracemalloc.start()
    for line in sys.stdin:
        req = json.loads(line)
        gc.collect()  # what an earlier case left behind must not count against this one
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            answer: dict[str, Any] = {"ok": True, **exercise(req["path"])}
        except BaseException as exc:
            # free the failed call's locals (a runaway allocation) before allocating anything here
            traceback.clear_frames(exc.__traceback__)
            chain = _chain(exc)
            answer = {
                "ok": False,
                "type": type(exc).__name__,
                "ours": isinstance(exc, TileServerError),
                "memory": any(isinstance(e, MemoryError) for e in chain),
                "message": str(exc)[:300],
                "where": _where(exc),
            }
            del chain  # it holds the exceptions, their tracebacks and frames
        answer["maxrss_kb"] = _status_kb("VmHWM")
        answer["peak_traced_kb"] = (tracemalloc.get_traced_memory()[1] - start) // 1024
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
