"""``tileserver convert``: any slide in, one compressed container out.

Pipeline (one direction, streaming)::

    source level 0 ──(one tile row at a time)──► glass flags (tileserver.tissue)
        ├─► tiles of level 0 ──► codec (thread pool) ──► ContainerWriter spool
        └─► 2x2 area average ──► level 1 rows ──► ... ──► last level (one tile)

Every level is built from the *source* pixels of the level above (area
averaging), never from decoded tiles, so coding errors do not compound.  With
``fill`` and ``drop`` the glass tiles are replaced by the glass colour before
averaging, so lower levels show exactly what level 0 shows (no dust on glass
appearing when zooming out).  A level-``k`` tile is glass iff all the level-0
tiles it covers are.

Peak memory is bounded by the slide width, not its area: at most two level-0
tile rows (one being read, one being encoded) plus half a tile row per lower
level are alive at once (about 4 x 256 x width x 3 bytes; 300 MB for a
100,000-pixel-wide slide).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import numpy.typing as npt

from .codecs.base import TileCodec
from .container.format import GLASS_STRATEGIES, LevelGeometry
from .container.writer import ContainerWriter
from .errors import ConversionError, TileServerError

__all__ = [
    "CONVERT_DEFAULT_PARAMS",
    "ConversionSummary",
    "add_cli",
    "convert",
    "convert_tree",
    "find_slides",
    "psnr",
    "ssim",
]

log = logging.getLogger(__name__)

Pixels = npt.NDArray[np.uint8]

#: columns read from the source per read_region call while streaming a tile row
_READ_CHUNK_TILES = 8
#: classic codecs: tiles per pool task (amortises task overhead); neural: one batch
_CLASSIC_TILES_PER_TASK = 4
_NEURAL_TILES_PER_TASK = 16
#: PSNR reported for a tile coded losslessly (instead of infinity)
_PSNR_CAP = 100.0


# ---------------------------------------------------------------------------------------------
# Quality measures
# ---------------------------------------------------------------------------------------------
def _gaussian_window(size: int = 11, sigma: float = 1.5) -> npt.NDArray[np.float32]:
    x = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return np.asarray(g / g.sum(), dtype=np.float32)


_WINDOW = _gaussian_window()


def _gaussian_valid(x: npt.NDArray[Any], window: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Separable 'valid' Gaussian filtering of the last two axes, as pytorch_msssim's gaussian_filter."""
    k = window.size
    n = x.shape[-2] - k + 1
    y = window[0] * x[..., 0:n, :]
    for i in range(1, k):  # shifted slices: far faster than sliding_window_view @ window
        y += window[i] * x[..., i : i + n, :]
    m = x.shape[-1] - k + 1
    z: npt.NDArray[Any] = window[0] * y[..., 0:m]
    for i in range(1, k):
        z += window[i] * y[..., i : i + m]
    return z


def ssim(a: Pixels, b: Pixels, data_range: float = 255.0, window: npt.NDArray[Any] | None = None) -> float | None:
    """SSIM as ``pytorch_msssim.ssim(x, y, data_range=255)`` (11-px Gaussian, sigma 1.5, channel mean).

    Computed in the ``window``'s precision: float32 by default, for conversion reports;
    ``bench/_common.ssim_batch`` passes pytorch_msssim's own window in float64, as design §8 measures.
    Returns None for images smaller than the window.
    """
    window = _WINDOW if window is None else window
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.shape[0] < window.size or a.shape[1] < window.size:
        return None
    x = a.astype(window.dtype).transpose(2, 0, 1)
    y = b.astype(window.dtype).transpose(2, 0, 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu1, mu2, xx, yy, xy = _gaussian_valid(np.stack([x, y, x * x, y * y, x * y]), window)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    cs = (2 * (xy - mu12) + c2) / ((xx - mu1_sq) + (yy - mu2_sq) + c2)
    ssim_map = ((2 * mu12 + c1) / (mu1_sq + mu2_sq + c1)) * cs
    return float(ssim_map.reshape(ssim_map.shape[0], -1).mean(axis=1, dtype=np.float64).mean())


def psnr(a: Pixels, b: Pixels) -> float:
    """PSNR in dB of two uint8 images (capped at 100 dB for identical images)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return _PSNR_CAP if mse == 0 else min(_PSNR_CAP, 10 * math.log10(255.0**2 / mse))


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConversionSummary:
    """What one conversion did, for the CLI summary, reports and benchmarks."""

    src: str
    dst: str
    codec: str
    codec_params: dict[str, Any]
    glass: str
    width: int
    height: int
    levels: int
    source_bytes: int
    output_bytes: int
    tiles: int  #: level-0 tiles
    glass_tiles: int  #: level-0 tiles judged glass
    dropped_tiles: int  #: zero-byte entries written, all levels
    tissue_fraction: float  #: fraction of level-0 area in tissue tiles
    mean_psnr: float | None  #: over sampled level-0 tissue tiles, dB
    mean_ssim: float | None
    quality_samples: int  #: level-0 tissue tiles whose PSNR was measured
    ssim_samples: int  #: ... and whose SSIM was (tiles at least 11 px on each side)
    seconds: float
    glass_color: tuple[int, int, int] = (255, 255, 255)
    level_bytes: list[int] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Source bytes over output bytes."""
        return self.source_bytes / self.output_bytes if self.output_bytes else float("inf")

    @property
    def megapixels_per_second(self) -> float:
        """Level-0 megapixels converted per second of wall time."""
        return self.width * self.height / 1e6 / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with ``ratio`` and ``megapixels_per_second``)."""
        d = asdict(self)
        d["glass_color"] = list(self.glass_color)
        d["ratio"] = self.ratio
        d["megapixels_per_second"] = self.megapixels_per_second
        return d

    def format(self) -> str:
        """A short human-readable table."""

        def fmt(v: float | None, spec: str) -> str:
            return "n/a" if v is None else format(v, spec)

        rows = [
            ("source", f"{self.src} ({_human_bytes(self.source_bytes)})"),
            ("output", f"{self.dst} ({_human_bytes(self.output_bytes)})"),
            ("ratio", f"{self.ratio:.1f}x"),
            ("codec", f"{self.codec} {json.dumps(self.codec_params, sort_keys=True)}"),
            ("size", f"{self.width} x {self.height}, {self.levels} levels"),
            ("tissue", f"{self.tissue_fraction:.1%} of level 0"),
            ("glass", f"{self.glass}: {self.glass_tiles}/{self.tiles} level-0 tiles, {self.dropped_tiles} dropped"),
            ("PSNR", f"{fmt(self.mean_psnr, '.2f')} dB (mean of {self.quality_samples} level-0 tissue tiles)"),
            ("SSIM", f"{fmt(self.mean_ssim, '.4f')} (mean of {self.ssim_samples})"),
            ("time", f"{self.seconds:.1f} s ({self.megapixels_per_second:.1f} MP/s)"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover - loop always returns


def source_bytes(path: Path) -> int:
    """Bytes a source slide takes on disk (a DICOM folder: all its files; MRXS: with its data folder)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    total = path.stat().st_size
    data_dir = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and data_dir.is_dir():
        total += sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())
    return total


# ---------------------------------------------------------------------------------------------
# Pyramid building
# ---------------------------------------------------------------------------------------------
def _downsample2(strip: Pixels) -> Pixels:
    """2x2 area average (rounded), replicating the last row/column at odd sizes."""
    h, w = strip.shape[:2]
    if h % 2 or w % 2:
        strip = np.pad(strip, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    # four strided slices beat reshape(...).sum(axis=(1, 3)) several times over
    s = strip[0::2, 0::2].astype(np.uint16)
    s += strip[1::2, 0::2]
    s += strip[0::2, 1::2]
    s += strip[1::2, 1::2]
    s += 2
    s >>= 2
    out: Pixels = s.astype(np.uint8)
    return out


def _pad_tile(tile: Pixels, ts: int) -> Pixels:
    h, w = tile.shape[:2]
    if h == ts and w == ts:
        return np.ascontiguousarray(tile)
    padded: Pixels = np.pad(tile, ((0, ts - h), (0, ts - w), (0, 0)), mode="edge")
    return padded


@dataclass
class _Job:
    level: int
    col: int
    row: int
    pixels: Pixels
    measure: bool  # decode and compare against the source (sampled level-0 tissue tiles)


@dataclass
class _Stats:
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)


def _encode_jobs(codec: TileCodec, jobs: list[_Job], ts: int) -> list[tuple[bytes, float | None, float | None]]:
    padded = [_pad_tile(j.pixels, ts) for j in jobs]
    encode_batch: Callable[[list[Pixels]], list[bytes]] | None = getattr(codec, "encode_batch", None)
    blobs = list(encode_batch(padded)) if encode_batch is not None else [codec.encode(p) for p in padded]
    out: list[tuple[bytes, float | None, float | None]] = []
    for job, blob in zip(jobs, blobs, strict=True):
        p = s = None
        if job.measure:
            h, w = job.pixels.shape[:2]
            decoded = codec.decode(bytes(blob))[:h, :w]
            p, s = psnr(job.pixels, decoded), ssim(job.pixels, decoded)
        out.append((bytes(blob), p, s))
    return out


class _PyramidBuilder:
    """Turns level-0 tile rows into tile jobs for every level (see module docstring)."""

    def __init__(
        self,
        levels: list[LevelGeometry],
        ts: int,
        glass: str,
        glass_color: tuple[int, int, int],
        emit: Callable[[_Job | tuple[int, int, int, bytes]], None],
    ) -> None:
        self.levels = levels
        self.ts = ts
        self.glass = glass
        self.glass_color = np.asarray(glass_color, np.uint8)
        self.emit = emit
        self.glass_grid = [np.zeros((g.rows, g.cols), bool) for g in levels]
        self._pending: list[list[Pixels]] = [[] for _ in levels]
        self._next_row = [0 for _ in levels]
        self.fill_blob: bytes | None = None  # set by the caller for glass="fill"
        self.sampler: Callable[[int, int], bool] = lambda col, row: False

    def push_strip(self, level: int, strip: Pixels, flags: Sequence[bool] | None = None) -> None:
        """Process one full tile row of ``level`` (``strip`` is owned by the builder from now on)."""
        g = self.levels[level]
        ts = self.ts
        t_row = self._next_row[level]
        self._next_row[level] += 1
        if flags is None:
            flags = self._glass_from_above(level, t_row)
        self.glass_grid[level][t_row] = flags
        for t_col in range(g.cols):
            x0, x1 = t_col * ts, min((t_col + 1) * ts, g.width)
            if flags[t_col]:
                if self.glass in ("fill", "drop"):
                    strip[:, x0:x1] = self.glass_color
                if self.glass == "drop":
                    self.emit((level, t_col, t_row, b""))
                    continue
                if self.glass == "fill" and self.fill_blob is not None:
                    self.emit((level, t_col, t_row, self.fill_blob))
                    continue
            measure = level == 0 and not flags[t_col] and self.sampler(t_col, t_row)
            self.emit(_Job(level, t_col, t_row, strip[:, x0:x1], measure))
        if level + 1 < len(self.levels):
            pending = self._pending[level + 1]
            pending.append(_downsample2(strip))
            rows = sum(p.shape[0] for p in pending)
            last = t_row == g.rows - 1
            if rows >= ts or last:
                below = pending[0] if len(pending) == 1 else np.concatenate(pending, axis=0)
                self._pending[level + 1] = []
                self.push_strip(level + 1, below)

    def _glass_from_above(self, level: int, t_row: int) -> list[bool]:
        above = self.glass_grid[level - 1]
        rows = above[2 * t_row : 2 * t_row + 2]
        g = self.levels[level]
        out = []
        for t_col in range(g.cols):
            out.append(bool(rows[:, 2 * t_col : 2 * t_col + 2].all()))
        return out

    @property
    def complete(self) -> bool:
        return all(n == g.rows for n, g in zip(self._next_row, self.levels, strict=True))


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------
#: codec parameters convert uses unless told otherwise.  JPEG: 4:4:4, because H&E carries
#: fine chroma detail; on CMU tissue tiles 4:2:0 at quality 95 reaches 35.3 dB where 4:4:4 at 90 gives 43.6
#: (3.3 bits/px) while 4:4:4 gives 40.6 dB at quality 90 (3.9 bits/px).
CONVERT_DEFAULT_PARAMS: dict[str, dict[str, Any]] = {"jpeg": {"subsampling": "444"}}


def _build_codec(codec: str | TileCodec, quality: float | None, codec_params: dict[str, Any] | None) -> TileCodec:
    if not isinstance(codec, str):
        return codec
    from .codecs import get as get_codec

    params: dict[str, Any] = dict(CONVERT_DEFAULT_PARAMS.get(codec, {}))
    params.update(codec_params or {})
    if quality is not None:
        params["quality"] = int(quality) if float(quality).is_integer() else quality
    try:
        return get_codec(codec, **params)
    except (ValueError, TypeError) as exc:
        raise ConversionError(f"codec {codec!r}: {exc}") from exc


def _model_info(codec: TileCodec) -> dict[str, Any] | None:
    info = getattr(codec, "model_info", None)
    if callable(info):
        info = info()
    return dict(info) if info else None


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit in the main thread so ``finally`` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _failure(src: Path, what: str, exc: BaseException) -> ConversionError:
    """One-line error naming ``src`` once (our readers' messages often start with the path already)."""
    msg = str(exc) or type(exc).__name__
    for prefix in (str(src), src.name):
        if msg.startswith(prefix + ":"):
            msg = msg[len(prefix) + 1 :].strip()
    return ConversionError(f"{src}: {what}: {' '.join(msg.split())}")


def _read_strip(slide: Any, src: Path, y: int, h: int, width: int, bg: Pixels, ts: int) -> Pixels:
    """Level-0 rows ``y .. y+h`` as RGB, transparent source pixels composited onto the background."""
    strip = np.empty((h, width, 3), np.uint8)
    chunk = ts * _READ_CHUNK_TILES
    for x in range(0, width, chunk):
        w = min(chunk, width - x)
        try:
            region = np.asarray(slide.read_region((x, y), 0, (w, h)))
        except Exception as exc:  # ours, OpenSlide's and friends' own types
            raise _failure(src, f"cannot read source pixels at ({x}, {y})", exc) from exc
        if region.shape != (h, w, 4):
            raise ConversionError(f"{src}: source returned a {region.shape} region for {w}x{h}")
        alpha = region[:, :, 3:4]
        if alpha.min() == 255:
            strip[:, x : x + w] = region[:, :, :3]
        else:
            a = alpha.astype(np.uint16)
            mixed = (region[:, :, :3].astype(np.uint16) * a + bg.astype(np.uint16) * (255 - a) + 127) // 255
            strip[:, x : x + w] = mixed.astype(np.uint8)
    return strip


def _associated(slide: Any, src: Path) -> dict[str, Pixels]:
    out: dict[str, Pixels] = {}
    try:
        images = slide.associated_images
        for name in images:
            out[str(name)] = np.asarray(images[name].convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # a broken label must not lose the whole slide
        log.warning("%s: skipping associated images: %s", src, exc)
    return out


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    codec: str | TileCodec = "jpeg",
    quality: float | None = None,
    glass: str = "drop",
    force: bool = False,
    progress: bool = True,
    workers: int = 2,
    tissue_detector: str = "classic",
    quality_samples: int = 200,
    codec_params: dict[str, Any] | None = None,
    any_modality: bool = False,
) -> ConversionSummary:
    """Convert the slide at ``src`` (anything ``tileserver.open_slide`` reads) into a container at ``dst``.

    ``codec`` is a registry name (``quality`` on its own scale; None: the codec's
    default) or a ``TileCodec``; ``codec_params`` adds codec-specific parameters
    (``CONVERT_DEFAULT_PARAMS`` fills the rest: JPEG is 4:4:4).  ``glass`` is ``keep``, ``fill`` or ``drop``.
    ``quality_samples`` bounds how many level-0 tissue tiles are decoded to
    measure PSNR and SSIM.  The shipped neural models were trained on brightfield
    (H&E/IHC) tissue only, so a fluorescence slide is refused with the neural codec
    unless ``any_modality`` (measured: SSIM 0.20 on the shared NDPI fluorescence
    slide).  Raises ``ConversionError`` (nothing is left at ``dst``,
    and an existing ``dst`` is untouched unless ``force``).
    """
    from . import tissue
    from .slides import open_slide

    t_start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if glass not in GLASS_STRATEGIES:
        raise ConversionError(f"glass must be one of {', '.join(GLASS_STRATEGIES)}, got {glass!r}")
    if dst.exists() and not force:
        raise ConversionError(f"{dst}: already exists (use --force to overwrite)")
    if dst.is_dir():
        raise ConversionError(f"{dst}: is a directory")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ConversionError(f"{dst}: cannot convert a slide onto itself")
    tile_codec = _build_codec(codec, quality, codec_params)
    try:
        detector = tissue.get_detector(tissue_detector)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    try:
        slide = open_slide(src)
    except Exception as exc:
        raise _failure(src, "cannot open source slide", exc) from exc
    try:
        return _convert_open(
            slide,
            src,
            dst,
            tile_codec,
            detector,
            glass,
            force,
            progress,
            workers,
            quality_samples,
            t_start,
            any_modality,
        )
    except OSError as exc:  # disk full, permissions, ...: the writer has already removed its temp files
        raise ConversionError(f"{dst}: cannot write: {exc}") from exc


def _convert_open(
    slide: Any,
    src: Path,
    dst: Path,
    tile_codec: TileCodec,
    detector: Any,
    glass: str,
    force: bool,
    progress: bool,
    workers: int,
    quality_samples: int,
    t_start: float,
    any_modality: bool = False,
) -> ConversionSummary:
    from . import tissue

    with slide, _sigterm_raises():
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            background = tissue.estimate_background(slide)
        except Exception as exc:
            raise _failure(src, "cannot read source pixels", exc) from exc
        if tile_codec.name == "neural" and background.kind != "brightfield" and not any_modality:
            raise ConversionError(
                f"{src}: a {background.kind} slide; the neural models are trained on brightfield tissue only "
                "and code it badly (use a classic codec, or --any-modality to override)"
            )
        width, height = slide.dimensions
        with ContainerWriter(
            dst,
            width=width,
            height=height,
            codec=tile_codec,
            glass=glass,
            glass_color=background.color,
            glass_kind=background.kind,
            mpp=slide.mpp,
            overwrite=force,
        ) as writer:
            stats = _run_pipeline(
                slide, src, writer, tile_codec, detector, background, workers, progress, quality_samples
            )
            levels = writer.levels
            n0 = levels[0].tiles
            glass0 = int(stats["glass_grid"][0].sum())
            tissue_area = stats["tissue_area"]
            tissue_fraction = tissue_area / (width * height)
            dropped = sum(writer.zero_byte_tiles(i) for i in range(len(levels)))
            level_bytes = [writer.level_bytes(i) for i in range(len(levels))]
            writer.finish(
                associated=_associated(slide, src),
                source={
                    "name": src.name,
                    "bytes": source_bytes(src),
                    "format": slide.format,
                    "properties": dict(slide.properties),
                },
                tissue_fraction=tissue_fraction,
                model_info=_model_info(tile_codec),
            )
    q: _Stats = stats["quality"]
    return ConversionSummary(
        src=str(src),
        dst=str(dst),
        codec=tile_codec.name,
        codec_params=dict(tile_codec.params),
        glass=glass,
        width=width,
        height=height,
        levels=len(levels),
        source_bytes=source_bytes(src),
        output_bytes=dst.stat().st_size,
        tiles=n0,
        glass_tiles=glass0,
        dropped_tiles=dropped,
        tissue_fraction=tissue_fraction,
        mean_psnr=float(np.mean(q.psnr)) if q.psnr else None,
        mean_ssim=float(np.mean(q.ssim)) if q.ssim else None,
        quality_samples=len(q.psnr),
        ssim_samples=len(q.ssim),
        seconds=time.perf_counter() - t_start,
        glass_color=background.color,
        level_bytes=level_bytes,
    )


def _run_pipeline(
    slide: Any,
    src: Path,
    writer: ContainerWriter,
    codec: TileCodec,
    detector: Any,
    background: Any,
    workers: int,
    progress: bool,
    quality_samples: int,
) -> dict[str, Any]:
    from tqdm import tqdm

    levels = writer.levels
    ts = writer.tile_size
    g0 = levels[0]
    bg = np.asarray(background.color, np.uint8)
    per_task = _NEURAL_TILES_PER_TASK if hasattr(codec, "encode_batch") else _CLASSIC_TILES_PER_TASK
    stride = max(1, math.ceil(g0.tiles / max(1, quality_samples)))
    quality = _Stats()
    tissue_area = 0
    counter = {"tissue": 0}

    def sampler(col: int, row: int) -> bool:
        # every stride-th tissue tile, spread over the slide (tissue tiles are not known in advance)
        n = counter["tissue"]
        counter["tissue"] += 1
        return quality_samples > 0 and n % stride == 0

    bar = tqdm(
        total=sum(g.tiles for g in levels),
        unit="tile",
        desc=src.name[:40],
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="tileserver-encode")
    in_flight: deque[list[tuple[list[_Job], Future[list[tuple[bytes, float | None, float | None]]]]]] = deque()
    batch: list[_Job] = []
    tasks: list[tuple[list[_Job], Future[list[tuple[bytes, float | None, float | None]]]]] = []

    def submit() -> None:
        if batch:
            jobs = list(batch)
            batch.clear()
            tasks.append((jobs, pool.submit(_encode_jobs, codec, jobs, ts)))

    def emit(item: _Job | tuple[int, int, int, bytes]) -> None:
        if isinstance(item, tuple):
            writer.add_tile(*item)
            bar.update(1)
            return
        batch.append(item)
        if len(batch) >= per_task:
            submit()

    def drain(group: list[tuple[list[_Job], Future[list[tuple[bytes, float | None, float | None]]]]]) -> None:
        for jobs, fut in group:
            try:
                results = fut.result()
            except TileServerError as exc:
                raise ConversionError(f"{src}: encoding failed: {exc}") from exc
            except Exception as exc:
                raise ConversionError(f"{src}: encoding with {codec.name} failed: {exc!r}") from exc
            for job, (blob, p, s) in zip(jobs, results, strict=True):
                writer.add_tile(job.level, job.col, job.row, blob)
                if p is not None:
                    quality.psnr.append(p)
                if s is not None:
                    quality.ssim.append(s)
            bar.update(len(jobs))

    builder = _PyramidBuilder(levels, ts, writer.glass, background.color, emit)
    builder.sampler = sampler
    if writer.glass == "fill":
        fill = np.empty((ts, ts, 3), np.uint8)
        fill[:] = bg
        builder.fill_blob = codec.encode(fill)

    def read(t_row: int) -> Future[Pixels]:
        y = t_row * ts
        return pool.submit(_read_strip, slide, src, y, min(ts, g0.height - y), g0.width, bg, ts)

    try:
        # the next tile row is read in the pool while this one is detected, averaged and queued
        next_strip = read(0)
        for t_row in range(g0.rows):
            strip = next_strip.result()
            if t_row + 1 < g0.rows:
                next_strip = read(t_row + 1)
            tiles = [strip[:, c * ts : min((c + 1) * ts, g0.width)] for c in range(g0.cols)]
            try:
                flags = [bool(f) for f in detector.glass_flags(tiles, background)]
            except Exception as exc:
                raise ConversionError(f"{src}: tissue detection failed: {exc!r}") from exc
            if len(flags) != len(tiles):
                raise ConversionError(f"{src}: tissue detector returned {len(flags)} flags for {len(tiles)} tiles")
            tissue_area += sum(t.shape[0] * t.shape[1] for t, f in zip(tiles, flags, strict=True) if not f)
            builder.push_strip(0, strip, flags)
            submit()
            in_flight.append(tasks.copy())
            tasks.clear()
            # keep at most two tile rows' work alive: bounded memory, and encoding overlaps reading
            while len(in_flight) > 1:
                drain(in_flight.popleft())
        while in_flight:
            drain(in_flight.popleft())
        if not builder.complete:
            raise ConversionError(f"{src}: internal error: pyramid incomplete")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return {"quality": quality, "tissue_area": tissue_area, "glass_grid": builder.glass_grid}


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------
def _is_dicom_dir(p: Path) -> bool:
    try:
        return p.is_dir() and any(c.suffix.lower() == ".dcm" and c.is_file() for c in p.iterdir())
    except OSError:
        return False


def find_slides(root: str | Path, exclude: Path | None = None) -> list[Path]:
    """Slides under ``root`` (recursing): files a reader recognises, and DICOM folders."""
    from .slides import detect_format

    root = Path(root)
    out: list[Path] = []
    excluded = exclude.resolve() if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if excluded is not None and here.resolve() == excluded:
            dirnames[:] = []
            continue
        if here == root and _is_dicom_dir(here):
            return [here]
        # DICOM folders are slides, not places to recurse (also when they are symlinks)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if _is_dicom_dir(here / d):
                out.append(here / d)
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = here / name
            if name.startswith(".") or ".partial-" in name:
                continue
            if detect_format(p) is not None:
                out.append(p)
    return out


def _dst_name(slide: Path) -> str:
    return (slide.name if slide.is_dir() else slide.stem) + ".tiff"


def convert_tree(
    src_dir: str | Path, dst_dir: str | Path, **kwargs: Any
) -> tuple[list[ConversionSummary], list[tuple[Path, str]]]:
    """Convert every slide under ``src_dir`` into ``dst_dir``, mirroring sub-folders.

    Each slide becomes ``<name>.tiff``.  Returns (summaries, failures) where a
    failure is (source path, one-line message); one bad slide does not stop the rest.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    slides = find_slides(src_dir, exclude=dst_dir if dst_dir.exists() else None)
    done: list[ConversionSummary] = []
    failed: list[tuple[Path, str]] = []
    for slide in slides:
        rel = slide.relative_to(src_dir).parent if slide != src_dir else Path()
        dst = dst_dir / rel / _dst_name(slide)
        try:
            done.append(convert(slide, dst, **kwargs))
        except TileServerError as exc:
            failed.append((slide, str(exc)))
    return done, failed


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    kwargs: dict[str, Any] = {
        "codec": args.codec,
        "quality": args.quality,
        "glass": args.glass,
        "force": args.force,
        "progress": not args.no_progress,
        "workers": args.workers,
        "tissue_detector": args.tissue,
        "codec_params": dict(args.param or []),
        "any_modality": args.any_modality,
    }
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory")
    if src.is_dir() and not _is_dicom_dir(src):
        if not find_slides(src, exclude=dst if dst.exists() else None):
            raise ConversionError(f"{src}: no slides found in this folder")
        done, failed = convert_tree(src, dst, **kwargs)
        for s in done:
            print(s.format(), end="\n\n")
        for path, msg in failed:
            print(f"tileserver convert: error: {msg if str(path) in msg else f'{path}: {msg}'}", file=sys.stderr)
        total_src = sum(s.source_bytes for s in done)
        total_out = sum(s.output_bytes for s in done)
        print(
            f"{len(done)} slides converted, {len(failed)} failed; "
            f"{_human_bytes(total_src)} -> {_human_bytes(total_out)}"
            + (f" ({total_src / total_out:.1f}x)" if total_out else "")
        )
        return 1 if failed or not done else 0
    if dst.is_dir():
        dst = dst / _dst_name(src)
    summary = convert(src, dst, **kwargs)
    print(summary.format())
    return 0


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: Any = raw
    for cast in (int, float):
        try:
            value = cast(raw)
            break
        except ValueError:
            continue
    return key, value


def add_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``tileserver convert``."""
    p = subparsers.add_parser(
        "convert",
        help="convert a slide (or a folder of slides) into compressed containers",
        description="Convert SRC (a slide file, DICOM folder, or a folder of slides) into tileserver's compressed "
        "pyramidal TIFF at DST (a .tiff file, or a folder when SRC is a folder).",
    )
    p.add_argument("src", metavar="SRC", help="slide file, DICOM folder, or folder of slides")
    p.add_argument("dst", metavar="DST", help="output .tiff (or output folder)")
    p.add_argument("--codec", default="jpeg", help="codec name: jpeg, jpegxl, jpeg2000, webp, avif, neural")
    p.add_argument("--quality", type=float, default=None, help="codec quality on its own scale (default: codec's)")
    p.add_argument(
        "--param",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="extra codec parameter, e.g. subsampling=420 (jpeg), effort=3 (jpegxl); repeatable",
    )
    p.add_argument("--glass", choices=GLASS_STRATEGIES, default="drop", help="how glass tiles are stored")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.add_argument("--workers", type=int, default=2, help="encoding threads (default 2)")
    p.add_argument("--tissue", choices=("classic", "cnn"), default="classic", help="glass/tissue detector")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--any-modality",
        action="store_true",
        help="allow the neural codec on non-brightfield (e.g. fluorescence) slides it was not trained on",
    )
    p.set_defaults(func=_cmd_convert)
