"""Helpers shared by the benchmark scripts (run as ``python bench/NAME.py``, so ``bench/`` is on sys.path)."""

from __future__ import annotations

import os
import platform
import socket
import time
from typing import Any

import numpy as np

#: XML namespace of a Deep Zoom descriptor
DZI_NS = "{http://schemas.microsoft.com/deepzoom/2008}"


def best_of(fn: Any, reps: int) -> float:
    """Seconds of the fastest of ``reps`` calls of ``fn()``."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "processor": platform.processor() or platform.machine(),
    }


def neural_model_info(quality: int | None) -> dict[str, Any] | None:
    """Architecture, quality and weights digest of the neural model used (for the record)."""
    if quality is None:
        return None
    from tileserver.codecs import get as get_codec

    info = getattr(get_codec("neural", quality=quality), "model_info", None)
    return dict(info) if info else None


def ssim_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-tile SSIM of ``N x H x W x 3`` uint8 stacks, as design §8 defines it: pytorch_msssim's
    ``ssim(..., data_range=255, size_average=False)`` in float64 (its window, built as it builds it),
    computed by ``tileserver.convert.ssim`` in numpy: the same arithmetic to about 1e-14, six times
    faster than pytorch_msssim's grouped float64 convolutions on one thread, which took most of
    ``bench/compress.py``'s time."""
    from pytorch_msssim.ssim import _fspecial_gauss_1d

    from tileserver.convert import ssim

    window = _fspecial_gauss_1d(11, 1.5).double().numpy().ravel()
    return np.array([ssim(x, y, window=window) for x, y in zip(a, b, strict=True)], dtype=np.float64)


def psnr_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-tile PSNR (dB) of ``N x H x W x 3`` uint8 stacks."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return np.asarray(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))


def dzi_tile_urls(url: str, slide: str, levels: int | None = None) -> list[str]:
    """Every tile URL of the finest ``levels`` Deep Zoom levels of ``slide`` (all levels when None)."""
    import xml.etree.ElementTree as ET
    from urllib.parse import quote

    import requests

    base = f"{url}/{quote(slide)}"
    root = ET.fromstring(requests.get(base + ".dzi", timeout=60).content)
    size = root.find(f"{DZI_NS}Size")
    assert size is not None
    w, h = int(size.attrib["Width"]), int(size.attrib["Height"])
    ts, fmt = int(root.attrib["TileSize"]), root.attrib["Format"]
    top = (max(w, h) - 1).bit_length()  # ceil(log2(max(w, h)))
    urls = []
    for level in range(top, top - (top + 1 if levels is None else levels), -1):
        cols, rows = -(-w // ts), -(-h // ts)
        urls += [f"{base}_files/{level}/{c}_{r}.{fmt}" for c in range(cols) for r in range(rows)]
        w, h = max(1, -(-w // 2)), max(1, -(-h // 2))
    return urls
