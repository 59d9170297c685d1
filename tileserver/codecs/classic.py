"""Classic image codecs through imagecodecs: JPEG, JPEG-XL, JPEG 2000, WebP, AVIF.

Each is a small class implementing ``TileCodec``.  ``quality`` follows the
underlying library's own scale (JPEG/WebP/AVIF 0–100; JPEG-XL 0–100 or a
butteraugli ``distance``; JPEG 2000: OpenJPEG's fixed-quality target PSNR in dB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import imagecodecs
import numpy as np

from ..errors import CorruptTile
from .base import Tile, register

__all__ = ["AvifCodec", "ClassicCodec", "Jpeg2000Codec", "JpegCodec", "JpegXLCodec", "WebpCodec"]

# TIFF Compression tag values.  7, 33005, 50001 and 50002 are registered or in
# wide use (libtiff, Aperio, Adobe); AVIF has none, so it takes a private code.
TIFF_JPEG = 7
TIFF_JPEG2000 = 33005
TIFF_WEBP = 50001
TIFF_JPEGXL = 50002
TIFF_AVIF = 65001


def _as_rgb(tile: Tile) -> Tile:
    arr = np.ascontiguousarray(tile)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"tile must be HxWx3 uint8, got {arr.shape} {arr.dtype}")
    return arr


class ClassicCodec:
    """Shared decode / batch plumbing; subclasses set ``_encode``/``_decode``."""

    name = "classic"
    tiff_compression = 0

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = params

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params.items()))
        return f"{type(self).__name__}({args})"

    def _encode(self, tile: Tile) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, data: bytes) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, tile: Tile) -> bytes:
        return bytes(self._encode(_as_rgb(tile)))

    def decode(self, data: bytes) -> Tile:
        if not data:
            raise CorruptTile(f"{self.name}: empty tile")
        try:
            arr = np.asarray(self._decode(bytes(data)))
        except Exception as exc:  # imagecodecs raises its own *Error classes
            raise CorruptTile(f"{self.name}: cannot decode tile: {exc}") from exc
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
            raise CorruptTile(f"{self.name}: decoded tile has shape {arr.shape} {arr.dtype}")
        return np.ascontiguousarray(arr[:, :, :3])

    def decode_batch(self, blobs: Sequence[bytes]) -> list[Tile | CorruptTile]:
        out: list[Tile | CorruptTile] = []
        for blob in blobs:
            try:
                out.append(self.decode(blob))
            except CorruptTile as exc:
                out.append(exc)
        return out


@register("jpeg")
class JpegCodec(ClassicCodec):
    """Baseline JPEG (libjpeg-turbo); ``subsampling`` is ``"420"`` or ``"444"``."""

    name = "jpeg"
    tiff_compression = TIFF_JPEG

    def __init__(self, quality: int = 80, subsampling: str | int = "420") -> None:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"jpeg quality must be 1..100, got {quality}")
        subsampling = str(subsampling)  # "--param subsampling=420" arrives as the number 420
        if subsampling not in ("420", "444"):
            raise ValueError(f"jpeg subsampling must be '420' or '444', got {subsampling!r}")
        super().__init__(quality=int(quality), subsampling=subsampling)

    def _encode(self, tile: Tile) -> bytes:
        return bytes(
            imagecodecs.jpeg8_encode(
                tile, level=self.params["quality"], subsampling=self.params["subsampling"], optimize=True
            )
        )

    def _decode(self, data: bytes) -> Any:
        return imagecodecs.jpeg8_decode(data)


@register("jpegxl")
class JpegXLCodec(ClassicCodec):
    """JPEG-XL (libjxl); give ``quality`` (0–100) or ``distance``, and ``effort`` 1–9."""

    name = "jpegxl"
    tiff_compression = TIFF_JPEGXL

    def __init__(self, quality: int | None = None, distance: float | None = None, effort: int = 7) -> None:
        if quality is None and distance is None:
            quality = 80
        if quality is not None and distance is not None:
            raise ValueError("jpegxl takes quality or distance, not both")
        if not 1 <= int(effort) <= 9:
            raise ValueError(f"jpegxl effort must be 1..9, got {effort}")
        params: dict[str, Any] = {"effort": int(effort)}
        if quality is not None:
            params["quality"] = int(quality)
        else:
            params["distance"] = float(distance)  # type: ignore[arg-type]
        super().__init__(**params)

    def _encode(self, tile: Tile) -> bytes:
        return bytes(
            imagecodecs.jpegxl_encode(
                tile,
                level=self.params.get("quality"),
                distance=self.params.get("distance"),
                effort=self.params["effort"],
                numthreads=1,
            )
        )

    def _decode(self, data: bytes) -> Any:
        return imagecodecs.jpegxl_decode(data, numthreads=1)


@register("jpeg2000")
class Jpeg2000Codec(ClassicCodec):
    """JPEG 2000 (OpenJPEG); ``quality`` is the target PSNR in dB (fixed-quality mode)."""

    name = "jpeg2000"
    tiff_compression = TIFF_JPEG2000

    def __init__(self, quality: int = 40) -> None:
        if not 10 <= int(quality) <= 99:
            raise ValueError(f"jpeg2000 quality (target PSNR dB) must be 10..99, got {quality}")
        super().__init__(quality=int(quality))

    def _encode(self, tile: Tile) -> bytes:
        return bytes(imagecodecs.jpeg2k_encode(tile, level=self.params["quality"], codecformat="j2k", numthreads=1))

    def _decode(self, data: bytes) -> Any:
        return imagecodecs.jpeg2k_decode(data, numthreads=1)


@register("webp")
class WebpCodec(ClassicCodec):
    """Lossy WebP (libwebp), ``quality`` 0–100."""

    name = "webp"
    tiff_compression = TIFF_WEBP

    def __init__(self, quality: int = 80, method: int = 4) -> None:
        if not 0 <= int(quality) <= 100:
            raise ValueError(f"webp quality must be 0..100, got {quality}")
        super().__init__(quality=int(quality), method=int(method))

    def _encode(self, tile: Tile) -> bytes:
        return bytes(
            imagecodecs.webp_encode(tile, level=self.params["quality"], lossless=False, method=self.params["method"])
        )

    def _decode(self, data: bytes) -> Any:
        return imagecodecs.webp_decode(data)


@register("avif")
class AvifCodec(ClassicCodec):
    """AVIF (libavif/aom), ``quality`` 0–100, ``speed`` 0–10."""

    name = "avif"
    tiff_compression = TIFF_AVIF

    def __init__(self, quality: int = 60, speed: int = 6) -> None:
        if not 0 <= int(quality) <= 100:
            raise ValueError(f"avif quality must be 0..100, got {quality}")
        super().__init__(quality=int(quality), speed=int(speed))

    def _encode(self, tile: Tile) -> bytes:
        return bytes(
            imagecodecs.avif_encode(tile, level=self.params["quality"], speed=self.params["speed"], numthreads=1)
        )

    def _decode(self, data: bytes) -> Any:
        return imagecodecs.avif_decode(data, numthreads=1)
