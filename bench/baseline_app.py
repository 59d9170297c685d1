"""The serving benchmark's baseline: OpenSlide's own Deep Zoom server, reduced to its tile path.

Modelled on openslide-python's ``examples/deepzoom/deepzoom_multiserver.py``: a
Flask app over a folder of slides, one ``DeepZoomGenerator`` per open slide (kept
in a small LRU), one ``OpenSlideCache`` of decoded source tiles shared by the
worker's slides, and every Deep Zoom tile read, scaled and JPEG-encoded on request
(no cache of encoded tiles).  Colour management is off (the example's
``ignore`` mode: tileserver applies no ICC transform either).  Its Deep Zoom settings are tileserver's defaults
(256-pixel tiles, no overlap, limit bounds, JPEG quality 80), so both servers
answer the same URLs with tiles of the same geometry.

Run under gunicorn exactly like ``tileserver serve`` (``bench/serve.py`` does)::

    BASELINE_SLIDE_DIR=/path/to/slides gunicorn -k gthread -w 2 --threads 8 \\
        --chdir bench 'baseline_app:create_app()'
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from io import BytesIO
from pathlib import Path

import openslide
from flask import Flask, Response, abort
from openslide.deepzoom import DeepZoomGenerator

TILE_SIZE = 256
OVERLAP = 0
LIMIT_BOUNDS = True
QUALITY = 80
OPEN_SLIDES = 10
DECODED_CACHE_BYTES = 128 * 1024 * 1024


class _Generators:
    """Open slides' Deep Zoom generators, least recently used closed first; opens outside the lock."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[Path, DeepZoomGenerator] = OrderedDict()
        self._tile_cache = openslide.OpenSlideCache(DECODED_CACHE_BYTES)

    def get(self, path: Path) -> DeepZoomGenerator:
        with self._lock:
            gen = self._items.get(path)
            if gen is not None:
                self._items.move_to_end(path)
                return gen
        slide = openslide.OpenSlide(path)
        slide.set_cache(self._tile_cache)
        gen = DeepZoomGenerator(slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=LIMIT_BOUNDS)
        with self._lock:
            if path in self._items:  # another thread opened it meanwhile
                slide.close()
                return self._items[path]
            self._items[path] = gen
            while len(self._items) > self._capacity:
                _, old = self._items.popitem(last=False)
                old._osr.close()
        return gen


def create_app(slide_dir: str | None = None) -> Flask:
    """The baseline app serving ``slide_dir`` (default: ``$BASELINE_SLIDE_DIR``)."""
    root = Path(slide_dir or os.environ.get("BASELINE_SLIDE_DIR", ".")).resolve(strict=True)
    app = Flask(__name__)
    generators = _Generators(OPEN_SLIDES)

    def generator(user_path: str) -> DeepZoomGenerator:
        try:
            path = (root / user_path).resolve(strict=True)
        except OSError:
            abort(404)
        if not path.is_relative_to(root):  # directory traversal
            abort(404)
        try:
            return generators.get(path)
        except openslide.OpenSlideError:
            abort(404)

    @app.get("/<path:path>.dzi")
    def dzi(path: str) -> Response:
        return Response(generator(path).get_dzi("jpeg"), mimetype="application/xml")

    @app.get("/<path:path>_files/<int:level>/<int:col>_<int:row>.<fmt>")
    def tile(path: str, level: int, col: int, row: int, fmt: str) -> Response:
        if fmt != "jpeg":
            abort(404)
        gen = generator(path)
        try:
            img = gen.get_tile(level, (col, row))
        except ValueError:  # invalid level or address
            abort(404)
        buf = BytesIO()
        img.save(buf, "jpeg", quality=QUALITY)
        return Response(buf.getvalue(), mimetype="image/jpeg")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok", mimetype="text/plain")

    return app
