"""``TileService``: everything the server answers, without a web framework.

One direction: cache lookup → Deep Zoom plan → slide read → browser encode →
cache store.  Views in ``tileserver.server`` only parse, call and wrap.

Slide paths are relative to the slides root and resolved strictly: anything that
leaves the root (``..``, absolute paths, symlinks pointing outside), hidden
names and non-slides are ``SlideNotFound``.

Neural slides decode through one ``DecodeBatcher`` per codec and parameters,
created lazily in the process that serves (never before gunicorn forks); the
``decoders`` seam lets tests substitute a fake.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from PIL import Image

from . import metrics
from .cache import FileIdentity, OpenSlideCache, TileCache, file_identity
from .config import Settings
from .deepzoom import DeepZoom, GlassTile, RegionTile
from .errors import BadTileAddress, SlideNotFound, TileServerError
from .slides import SlideReader, detect_format, open_slide
from .slides.base import Decoder

__all__ = [
    "FORMATS",
    "MAX_READ_PIXELS",
    "RESERVED_FOLDERS",
    "Decoder",
    "DecoderFactory",
    "NeuralDecoders",
    "TileResult",
    "TileService",
    "encode_image",
]

_log = logging.getLogger(__name__)

#: browser tile formats -> media type
FORMATS: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

#: file names that are never slides: editors' and downloaders' leftovers (our converter's
#: partial outputs are hidden: ``.<name>.partial-<pid>``)
_TEMP_SUFFIXES = (".tmp", ".part", ".partial", "~")


#: most pixels one request may read from a slide level (4 bytes each, RGBA).  A slide lacking a
#: pyramid level near the requested scale (a thumbnail, a zoomed-out Deep Zoom tile) would
#: otherwise be read whole into memory.
MAX_READ_PIXELS = 64 * 1024 * 1024


def _check_read(l_size: tuple[int, int], level: int, what: str) -> None:
    if l_size[0] * l_size[1] > MAX_READ_PIXELS:
        raise BadTileAddress(
            f"{what} needs {l_size[0]} x {l_size[1]} pixels of slide level {level}, over the limit of "
            f"{MAX_READ_PIXELS} (the slide has no pyramid level near this scale)"
        )


#: top-level folder names whose URLs belong to the viewer (``/view/...``, ``/static/...``):
#: slides inside folders of these names at the top of the slides root are not served
RESERVED_FOLDERS = frozenset({"view", "static"})


def _is_temp(name: str) -> bool:
    return name.startswith(".") or name.endswith(_TEMP_SUFFIXES) or ".partial-" in name


class DecoderFactory(Protocol):
    """Gives a slide the decoder it should use (or None to keep its own); closed at shutdown."""

    def __call__(self, slide: SlideReader) -> Decoder | None: ...

    def preload(self) -> None: ...

    def close(self) -> None: ...

    def loading(self) -> bool: ...


@dataclass(frozen=True)
class TileResult:
    """One answered tile (``data`` empty when ``not_modified``)."""

    data: bytes
    media_type: str
    etag: str
    source: str
    seconds: float
    not_modified: bool = False


def encode_image(image: Image.Image, fmt: str, quality: int) -> bytes:
    """``image`` as ``fmt`` bytes (``jpeg``, ``png`` or ``webp``)."""
    if image.mode != "RGB":
        if image.mode == "RGBA":
            bg = Image.new("RGB", image.size, (255, 255, 255))
            bg.paste(image, mask=image.getchannel("A"))
            image = bg
        else:
            image = image.convert("RGB")
    buf = BytesIO()
    if fmt == "jpeg":
        image.save(buf, "JPEG", quality=quality)
    elif fmt == "png":
        image.save(buf, "PNG", compress_level=1)  # speed over size: tiles are cached
    elif fmt == "webp":
        image.save(buf, "WEBP", quality=quality)
    else:
        raise BadTileAddress(f"unknown tile format {fmt!r}; use one of {', '.join(FORMATS)}")
    return buf.getvalue()


@functools.lru_cache(maxsize=256)
def _blank_tile(size: tuple[int, int], color: tuple[int, int, int], fmt: str, quality: int) -> bytes:
    """A pre-encoded uniform tile; sizes differ only at edges, so few exist."""
    return encode_image(Image.new("RGB", size, color), fmt, quality)


def _etag(key: Hashable) -> str:
    return '"' + hashlib.sha1(repr(key).encode(), usedforsecurity=False).hexdigest()[:24] + '"'


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


class NeuralDecoders:
    """One ``DecodeBatcher`` per neural codec and parameters, built on first use in this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._batchers: dict[Hashable, Any] = {}
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()
        self._loading = 0

    def __call__(self, slide: SlideReader) -> Decoder | None:
        codec = getattr(slide, "tile_codec", None)
        if slide.codec != "neural" or codec is None or not hasattr(slide, "set_decoder"):
            return None
        return self._decoder_for(codec)

    def preload(self) -> None:
        """Build a batcher (loading its weights) for every installed neural model."""
        with self._lock:
            self._loading += 1  # not ready from now until every model is in memory
        try:
            try:
                from .codecs import get as get_codec
                from .codecs.neural import available_qualities
            except ImportError:
                return
            for quality in available_qualities():
                try:
                    self._decoder_for(get_codec("neural", quality=quality))
                except Exception:  # a broken model must not stop the worker; its slides will fail alone
                    _log.exception("preloading neural model q%s failed", quality)
        finally:
            with self._lock:
                self._loading -= 1

    def _decoder_for(self, codec: Any) -> Decoder:
        # Slides whose codecs differ only in how they encoded (refinement, encoder add-on) decode
        # with one model and share its batcher.
        params = dict(getattr(codec, "decode_params", codec.params))
        key = (codec.name, tuple(sorted((k, repr(v)) for k, v in params.items())))
        with self._lock:
            batcher = self._batchers.get(key)
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        if batcher is None:
            # One loader per model: concurrent first requests wait for it rather than each
            # loading the weights and throwing all but one copy away.
            with key_lock:
                with self._lock:
                    batcher = self._batchers.get(key)
                    if batcher is None:
                        self._loading += 1
                if batcher is None:
                    try:
                        batcher = self._create(codec, params)
                    finally:
                        with self._lock:
                            self._loading -= 1
                    with self._lock:
                        self._batchers[key] = batcher
        decode: Decoder = batcher.decode
        return decode

    def _create(self, slide_codec: Any, decode_params: dict[str, Any]) -> Any:
        import torch

        from .batching import DecodeBatcher
        from .codecs import get as get_codec

        threads = self.settings.resolved_torch_threads()
        torch.set_num_threads(threads)
        start = time.perf_counter()
        params = {**decode_params, "device": self.settings.device, "threads": threads}
        try:
            codec = get_codec(slide_codec.name, **params)
        except TypeError:  # a codec without device/threads parameters decodes where it was built
            codec = slide_codec
        # Load the weights now, not inside the first request (and so /readyz reflects it).
        load = getattr(codec, "load", None) or getattr(codec, "_load", None)
        if load is not None:
            load()
        device = str(getattr(codec, "device", self.settings.device))
        metrics.get().model_load_seconds.labels(slide_codec.name, device).observe(time.perf_counter() - start)
        batcher = DecodeBatcher(
            codec.decode_batch,
            max_batch=self.settings.batch_max_size,
            max_delay_ms=self.settings.batch_max_delay_ms,
            name=f"{slide_codec.name}-{slide_codec.params.get('quality', '')}",
            device=device,
            observer=metrics.DecodeObserver(slide_codec.name, device),
        )
        return batcher

    def loading(self) -> bool:
        """True while a model is being loaded."""
        with self._lock:
            return self._loading > 0

    def close(self) -> None:
        """Drain in-flight decodes and stop every batcher."""
        with self._lock:
            batchers = list(self._batchers.values())
            self._batchers.clear()
        for b in batchers:
            b.close(drain=True)


class TileService:
    """Slides under ``settings.slides_dir``: listing, descriptors, tiles, images."""

    def __init__(
        self,
        settings: Settings,
        *,
        opener: Callable[[Path], SlideReader] = open_slide,
        detector: Callable[[Path], str | None] = detect_format,
        decoders: DecoderFactory | None = None,
    ) -> None:
        self.settings = settings
        self.root = Path(settings.slides_dir).resolve()
        self._opener = opener
        self._detector = detector
        self.decoders: DecoderFactory = decoders if decoders is not None else NeuralDecoders(settings)
        self.tiles = TileCache(settings.cache_bytes)
        self.slides: OpenSlideCache[SlideReader] = OpenSlideCache(
            settings.max_open_slides, self._open, lambda s: s.close()
        )
        self._info: dict[str, tuple[FileIdentity, dict[str, Any]]] = {}
        self._info_lock = threading.Lock()
        self._preload: threading.Thread | None = None

    # -- paths -------------------------------------------------------------

    def resolve(self, rel: str) -> Path:
        """The slide file or DICOM folder at ``rel``; ``SlideNotFound`` if it is not a slide inside the root."""
        parts = rel.replace("\\", "/").split("/")
        if not rel or rel.startswith("/") or "\x00" in rel or any(p in ("", ".", "..") or _is_temp(p) for p in parts):
            raise SlideNotFound(f"no slide {rel!r}")
        if len(parts) > 1 and parts[0] in RESERVED_FOLDERS:
            raise SlideNotFound(f"no slide {rel!r} (top-level folder {parts[0]!r} is reserved for the viewer)")
        try:
            path = (self.root / rel).resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            # a slide that vanished: close it if it was open, forget what we knew
            try:
                gone = (self.root / rel).resolve()
            except (OSError, RuntimeError):  # a symlink loop raises even when not strict
                gone = self.root / rel
            self.slides.forget(gone)
            with self._info_lock:
                self._info.pop(rel, None)
            raise SlideNotFound(f"no slide {rel!r}") from exc
        if not path.is_relative_to(self.root) or path == self.root:
            raise SlideNotFound(f"no slide {rel!r}")
        return path

    def _open(self, path: Path) -> SlideReader:
        slide = self._opener(path)
        try:
            decoder = self.decoders(slide)
            if decoder is not None:
                slide.set_decoder(decoder)  # type: ignore[attr-defined]
        except BaseException:
            slide.close()
            raise
        return slide

    def _deepzoom(self, slide: SlideReader, extra: dict[str, Any]) -> DeepZoom:
        dz = extra.get("dz")
        if dz is None:
            s = self.settings
            dz = extra.setdefault("dz", DeepZoom(slide, s.tile_size, s.overlap, s.limit_bounds))
        assert isinstance(dz, DeepZoom)
        return dz

    # -- listing -----------------------------------------------------------

    def discover(self) -> list[str]:
        """Relative paths of every slide under the root (DICOM folders count once), sorted."""
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and not (here == self.root and d in RESERVED_FOLDERS)
            )
            if here != self.root and any(f.lower().endswith(".dcm") for f in filenames):
                if self._detect(here):
                    found.append(here.relative_to(self.root).as_posix())
                dirnames[:] = []
                continue
            for name in sorted(filenames):
                if _is_temp(name):
                    continue
                path = here / name
                try:
                    real = path.resolve(strict=True)
                except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
                    continue
                if real.is_relative_to(self.root) and real.is_file() and self._detect(path):
                    found.append(path.relative_to(self.root).as_posix())
        return sorted(found)

    def _detect(self, path: Path) -> bool:
        try:
            return self._detector(path) is not None
        except Exception:  # an unreadable file is simply not listed
            _log.debug("detect_format failed for %s", path, exc_info=True)
            return False

    def slide_info(self, rel: str) -> dict[str, Any]:
        """JSON-ready facts about one slide (cached per file identity)."""
        path = self.resolve(rel)
        identity = file_identity(path)
        with self._info_lock:
            hit = self._info.get(rel)
        if hit is not None and hit[0] == identity:
            return hit[1]
        with self.slides.acquire(path) as (slide, identity, extra):
            info = self._describe(rel, slide, identity, self._deepzoom(slide, extra))
        with self._info_lock:
            self._info[rel] = (identity, info)
        return info

    def _describe(self, rel: str, slide: SlideReader, identity: FileIdentity, dz: DeepZoom) -> dict[str, Any]:
        size = identity[1]
        props = slide.properties
        source_bytes: int | None
        try:
            source_bytes = int(props["tileserver.source-bytes"])
        except (KeyError, ValueError):
            source_bytes = None
        stored = dz.stored
        url = "/" + quote(rel)
        return {
            "name": Path(rel).name,
            "path": rel,
            "folder": Path(rel).parent.as_posix() if "/" in rel else "",
            "format": slide.format,
            "codec": slide.codec,
            "dimensions": list(slide.dimensions),
            "level_count": slide.level_count,
            "mpp": list(slide.mpp) if slide.mpp else None,
            "file_bytes": size,
            "source_bytes": source_bytes,
            "compression_ratio": round(source_bytes / size, 2) if source_bytes and size else None,
            "associated_images": sorted(slide.associated_images),
            "glass_color": list(stored.glass_color) if stored is not None else None,
            "url": url,
            "dzi": f"{url}.dzi",
            "dz_levels": dz.level_count,
        }

    def list_slides(self) -> list[dict[str, Any]]:
        """Info for every slide (a slide that fails to open is listed with its error)."""
        out = []
        for rel in self.discover():
            try:
                out.append(self.slide_info(rel))
            except TileServerError as exc:
                folder = Path(rel).parent.as_posix() if "/" in rel else ""
                out.append({"name": Path(rel).name, "path": rel, "folder": folder, "error": str(exc)})
        return out

    # -- Deep Zoom ---------------------------------------------------------

    def dzi(self, rel: str) -> str:
        """The ``.dzi`` XML of a slide."""
        with self.slides.acquire(self.resolve(rel)) as (slide, _, extra):
            return self._deepzoom(slide, extra).dzi(self.settings.tile_format)

    def tile(
        self, rel: str, dz_level: int, t_col: int, t_row: int, fmt: str, if_none_match: str | None = None
    ) -> TileResult:
        """Tile ``(t_col, t_row)`` of Deep Zoom level ``dz_level`` as ``fmt``.

        Raises ``SlideNotFound`` / ``BadTileAddress`` (404), ``CorruptTile`` (500).
        """
        start = time.perf_counter()
        if fmt not in FORMATS:
            raise BadTileAddress(f"unknown tile format {fmt!r}; use one of {', '.join(FORMATS)}")
        s = self.settings
        with self.slides.acquire(self.resolve(rel)) as (slide, identity, extra):
            dz = self._deepzoom(slide, extra)
            dz.check_address(dz_level, t_col, t_row)
            key = (identity, dz_level, t_col, t_row, fmt, s.tile_size, s.overlap, s.limit_bounds, s.tile_quality)
            etag = _etag(key)
            media = FORMATS[fmt]
            if _etag_matches(if_none_match, etag):
                return TileResult(b"", media, etag, "cache", time.perf_counter() - start, not_modified=True)
            data = self.tiles.get(key)
            if data is not None:
                source = "cache"
            else:
                data, source = self._render(slide, dz, dz_level, t_col, t_row, fmt)
                if source != "glass":  # glass tiles are already shared pre-encoded bytes
                    self.tiles.put(key, data)
        seconds = time.perf_counter() - start
        m = metrics.get()
        m.tile_requests.labels(source, fmt).inc()
        m.tile_seconds.labels(source).observe(seconds)
        return TileResult(data, media, etag, source, seconds)

    def _render(
        self, slide: SlideReader, dz: DeepZoom, dz_level: int, t_col: int, t_row: int, fmt: str
    ) -> tuple[bytes, str]:
        quality = self.settings.tile_quality
        plan = dz.plan(dz_level, t_col, t_row)
        if isinstance(plan, GlassTile):
            return _blank_tile(plan.z_size, plan.color, fmt, quality), "glass"
        if isinstance(plan, RegionTile):
            _check_read(plan.l_size, plan.level, f"tile {dz_level}/{t_col}_{t_row}")
        source = "decode" if (dz.stored is not None or slide.codec is not None) else "openslide"
        return encode_image(dz.render(plan, dz_level, t_col, t_row), fmt, quality), source

    # -- other slide data --------------------------------------------------

    def properties(self, rel: str) -> dict[str, str]:
        """The slide's properties."""
        with self.slides.acquire(self.resolve(rel)) as (slide, _, _extra):
            return dict(slide.properties)

    def thumbnail(self, rel: str, size: int | None = None) -> bytes:
        """A JPEG thumbnail fitting ``size`` x ``size`` (capped at ``thumbnail_max``)."""
        edge = min(size or 512, self.settings.thumbnail_max)
        if edge < 1:
            raise BadTileAddress(f"thumbnail size {size} must be positive")
        with self.slides.acquire(self.resolve(rel)) as (slide, identity, _):
            key = (identity, "thumbnail", edge)
            data = self.tiles.get(key)
            if data is None:
                # the level get_thumbnail reads whole
                level = slide.get_best_level_for_downsample(max(d / edge for d in slide.dimensions))
                _check_read(slide.level_dimensions[level], level, f"a {edge} px thumbnail")
                data = encode_image(slide.get_thumbnail((edge, edge)), "jpeg", 90)
                self.tiles.put(key, data)
        return data

    def associated(self, rel: str, name: str) -> bytes:
        """Associated image ``name`` (label, macro, ...) as JPEG."""
        with self.slides.acquire(self.resolve(rel)) as (slide, identity, _):
            key = (identity, "associated", name)
            data = self.tiles.get(key)
            if data is None:
                images = slide.associated_images
                if name not in images:
                    raise SlideNotFound(f"slide {rel!r} has no associated image {name!r}")
                data = encode_image(images[name], "jpeg", 90)
                self.tiles.put(key, data)
        return data

    # -- lifecycle ---------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """(ready, reason): the slides folder is readable and no model is loading."""
        if not os.access(self.root, os.R_OK | os.X_OK) or not self.root.is_dir():
            return False, f"slides folder {self.root} is not readable"
        if (self._preload is not None and self._preload.is_alive()) or self.decoders.loading():
            return False, "loading models"
        return True, "ok"

    def start(self) -> None:
        """Start background work of a serving process: preloading models when configured."""
        if self.settings.preload_models and self._preload is None:
            self._preload = threading.Thread(target=self.decoders.preload, name="tileserver-preload", daemon=True)
            self._preload.start()

    def close(self) -> None:
        """Drain decodes, then close every open slide."""
        self.decoders.close()
        self.slides.close()
