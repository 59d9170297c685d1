"""The neural tile codec: CompressAI entropy coding + our light synthesis.

``get("neural", quality=q)`` returns a :class:`NeuralCodec` for one of the
models shipped in ``tileserver/codecs/weights`` (``manifest.json`` lists each
quality's weights file, architecture and SHA-256).  Constructing a codec reads
only the manifest; torch is imported and the weights are loaded on the first
encode/decode, so importing this module (or ``tileserver.codecs``) never imports
torch, and a server can build codecs before gunicorn forks.

Tile bitstream, format version 1 (little-endian)::

    offset size  field
    0      2     magic b"NC"
    2      1     format version (1)
    3      1     quality
    4      4     first 4 bytes of the weights' SHA-256 (which model coded it)
    8      2     tile height H (1..MAX_TILE_SIDE)
    10     2     tile width W
    12     1     latent height  == ceil(H / stride), stride 8 or 16 by architecture
    13     1     latent width   == ceil(W / stride)
    14     4     CRC-32 of the payload
    18     ...   payload: rANS string (CompressAI's format) of the M x h x w latent symbols; with a
                 hyperprior (klt-hp8, klt-cx8): u32 length of the side string, the side
                 string (H x ceil(h/4) x ceil(w/4) symbols), then the latent string (with
                 the context model, klt-cx8, its passes in coding order in one stream)

Everything in the header is validated, and the payload's CRC checked, before the
entropy decoder sees a byte.  Strings are written by CompressAI's rANS encoder
and read by our own decoder (``rans.py``: compiled, on numpy arrays, every read
bounds-checked), so even a crafted stream with a valid CRC fails as one
``CorruptTile``.

Decoded pixels are bit-identical whatever the batch size, batch composition,
thread count or device: the synthesis (and the hyper-synthesis and context that
pick each symbol's Gaussian) is integer arithmetic (``models/int8.py``; older
models: exact fixed-point grids in float64, ``models/klt.py`` and
``models/factorized.py``), scale indexes are exact arithmetic, and the entropy
models' CDF tables are fixed at export.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptTile, MissingModel
from .base import Tile, register

__all__ = [
    "FORMAT_VERSION",
    "MAX_TILE_SIDE",
    "TIFF_NEURAL",
    "WEIGHTS_DIR",
    "NeuralCodec",
    "available_qualities",
    "check_model",
    "parse_header",
    "retired_models",
    "save_encoder",
    "save_weights",
]

#: private TIFF Compression code for neural tiles
TIFF_NEURAL = 65000
#: bitstream format version written in every tile header
FORMAT_VERSION = 1
#: largest tile side accepted (bounds every allocation made while decoding)
MAX_TILE_SIDE = 512
#: directory of the shipped weights and their manifest
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

#: tiles per synthesis pass on CPU.  Measured (bench/decode.py): both the float64 and
#: the integer synthesis run fastest one or two tiles at a time on CPU (larger batches
#: only grow the im2col buffers past the caches); on CUDA the whole batch goes in one
#: pass.  Pixels are identical either way (the synthesis is exact).
CPU_SYNTHESIS_BATCH = 1
#: most refinement steps a codec accepts (``refine``), and tiles refined together
MAX_REFINE = 1000
REFINE_BATCH = 8

_MAGIC = b"NC"
_HEADER = struct.Struct("<2sBB4sHHBBI")


def _manifest(weights_dir: Path | None) -> dict[str, Any]:
    path = (weights_dir or WEIGHTS_DIR) / "manifest.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format_version": FORMAT_VERSION, "models": {}}
    return data


def available_qualities(weights_dir: Path | None = None) -> list[int]:
    """Qualities with installed weights, ascending."""
    return sorted(int(q) for q in _manifest(weights_dir).get("models", {}))


def _installed(weights_dir: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(quality, manifest entry) of every installed model: the current ones, then the retired.

    A model is retired when a newer one replaces it at its quality (``save_weights``);
    it stays installed so that slides converted with it keep decoding.
    """
    manifest = _manifest(weights_dir)
    current = list(manifest.get("models", {}).items())
    return current + [(str(e["quality"]), e) for e in manifest.get("retired", [])]


def retired_models(weights_dir: Path | None = None) -> dict[int, str]:
    """Quality -> weights SHA-256 of the most recently retired model of each quality."""
    return {int(e["quality"]): e["sha256"] for e in _manifest(weights_dir).get("retired", [])}


def check_model(model_info: Mapping[str, Any], weights_dir: Path | None = None) -> None:
    """Raise ``MissingModel`` unless the weights named by ``model_info`` are installed.

    ``model_info`` is what :attr:`NeuralCodec.model_info` returned when the file
    was written; the weights are matched by SHA-256, never by position, among the
    current and the retired models.
    """
    sha = str(model_info.get("weights_sha256", ""))
    arch = model_info.get("architecture", "?")
    quality = model_info.get("quality", "?")
    version = model_info.get("format_version")
    label = f"neural model {arch!s} quality {quality!s} (weights sha256 {sha[:16]}...)"
    weights_dir = weights_dir or WEIGHTS_DIR
    if version != FORMAT_VERSION:
        raise MissingModel(f"{label}: bitstream format version {version!r} not supported (have {FORMAT_VERSION})")
    for q, entry in _installed(weights_dir):
        if entry.get("sha256") == sha:
            if not (weights_dir / entry["file"]).is_file():
                raise MissingModel(f"{label}: manifest lists {entry['file']} but the file is not installed")
            if str(q) != str(quality) or entry.get("architecture") != arch:
                raise MissingModel(f"{label}: installed weights with that digest are {entry.get('architecture')} q{q}")
            return
    installed = ", ".join(f"q{q}={e['sha256'][:12]}" for q, e in _installed(weights_dir))
    raise MissingModel(f"{label} is not installed (installed: {installed or 'none'})")


def parse_header(data: bytes, stride: int) -> tuple[int, bytes, int, int, int, int, bytes]:
    """Validate a tile's header for a model of latent ``stride``.

    Returns (quality, tag, H, W, h, w, payload); raises ``CorruptTile``.
    """
    if len(data) <= _HEADER.size:
        raise CorruptTile(f"neural: tile of {len(data)} bytes is too short")
    magic, version, quality, tag, height, width, lh, lw, crc = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CorruptTile("neural: bad magic (not a neural tile)")
    if version != FORMAT_VERSION:
        raise CorruptTile(f"neural: unsupported bitstream version {version}")
    if not (1 <= height <= MAX_TILE_SIDE and 1 <= width <= MAX_TILE_SIDE):
        raise CorruptTile(f"neural: tile size {height}x{width} out of range")
    if lh != math.ceil(height / stride) or lw != math.ceil(width / stride):
        raise CorruptTile(f"neural: latent shape {lh}x{lw} does not match tile {height}x{width}")
    payload = bytes(data[_HEADER.size :])
    if zlib.crc32(payload) != crc:
        raise CorruptTile("neural: payload checksum mismatch (truncated or damaged tile)")
    return quality, tag, height, width, lh, lw, payload


def save_weights(
    model: Any, *, name: str, quality: int, weights_dir: Path | None = None, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``model`` (a registered architecture) as ``<name>.pt`` and list it in the manifest.

    Computes the entropy model's CDF tables here (``update(force=True,
    update_quantiles=True)``) and snaps the synthesis onto its exact grid, so the
    server only loads.  The analysis is stored in float16 (encoding needs no
    bit-exactness); synthesis and entropy model stay float32/int32.  A different
    model this replaces at ``quality`` stays installed, listed as ``retired``, so
    the slides it coded keep decoding.  Returns the manifest entry.
    """

    weights_dir = weights_dir or WEIGHTS_DIR
    model.eval()
    model.update_entropy_models()
    model.snap_synthesis_()
    state = {
        k: v.half() if k.startswith("g_a.") and v.is_floating_point() else v.detach().clone()
        for k, v in model.state_dict().items()
    }
    architecture = next(a for a, cls in _architectures().items() if type(model) is cls)
    payload = {
        "format": FORMAT_VERSION,
        "architecture": architecture,
        "args": dict(model.config),
        "quality": int(quality),
        "state_dict": state,
    }
    weights_dir.mkdir(parents=True, exist_ok=True)
    out = weights_dir / f"{name}.pt"
    entry: dict[str, Any] = {
        "file": out.name,
        "sha256": _save_file(payload, out),
        "architecture": architecture,
        "args": dict(model.config),
        **(meta or {}),
    }
    manifest = _manifest(weights_dir)
    manifest["format_version"] = FORMAT_VERSION
    models = manifest.setdefault("models", {})
    retired = [e for e in manifest.get("retired", []) if e["sha256"] != entry["sha256"]]
    old = models.get(str(int(quality)))
    if old is not None and old["sha256"] != entry["sha256"] and (weights_dir / old["file"]).is_file():
        # Slides converted with the replaced model must keep decoding: it stays, retired.
        retired.append({**old, "quality": int(quality)})
    models[str(int(quality))] = entry
    manifest["models"] = dict(sorted(models.items(), key=lambda kv: int(kv[0])))
    if retired:
        manifest["retired"] = retired
    _write_manifest(weights_dir, manifest)
    return entry


def save_encoder(
    model: Any, *, quality: int, weights_dir: Path | None = None, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the deepened analysis of ``model`` (``models/encoder.py``) as the current q``quality``
    model's encoder add-on, ``<model file>.encoder.pt``, and list it under that model's manifest entry.

    ``model`` must be the current model of that quality with its analysis deepened and trained:
    only ``g_a`` and ``h_a`` are saved, and bitstreams keep decoding with the model as it is (its
    identity does not change).  A previous add-on of that model is replaced.  Returns its entry.
    """

    from .models.encoder import ENCODER_FORMAT, encoder_state

    weights_dir = weights_dir or WEIGHTS_DIR
    manifest = _manifest(weights_dir)
    models = manifest.get("models", {})
    if str(int(quality)) not in models:
        raise ValueError(f"no current neural q{quality} model to add an encoder to")
    entry = models[str(int(quality))]
    deep = model.g_a
    payload = {
        "format": ENCODER_FORMAT,
        "kind": "encoder",
        "model_sha256": entry["sha256"],
        "blocks": len(deep.blocks),
        "width": int(deep.blocks[0].a.out_channels),
        "state_dict": encoder_state(model),
    }
    out = weights_dir / (Path(entry["file"]).stem + ".encoder.pt")
    encoder = {
        "file": out.name,
        "sha256": _save_file(payload, out),
        "blocks": payload["blocks"],
        "width": payload["width"],
        **(meta or {}),
    }
    entry["encoder"] = encoder
    _write_manifest(weights_dir, manifest)
    return encoder


def _save_file(payload: dict[str, Any], out: Path) -> str:
    """``torch.save`` ``payload`` to ``out`` atomically (a temporary file renamed into place); its SHA-256."""
    import torch

    tmp = out.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def _write_manifest(weights_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = weights_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(weights_dir / "manifest.json")


def _check_file(path: Path, sha256: str, label: str) -> None:
    """Raise ``MissingModel`` unless ``path`` is installed with the digest its manifest lists."""
    if not path.is_file():
        raise MissingModel(f"{label}: {path.name} is not installed")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise MissingModel(f"{label}: {path.name} does not match its manifest digest")


def _architectures() -> dict[str, Any]:
    from .models import ARCHITECTURES

    return dict(ARCHITECTURES)


class _Tables:
    """One entropy model's CDF tables, converted once: lists for CompressAI's encoder, arrays for our decoder.

    Each CDF is cut to its own length: the coder reads no further, and pybind11 copies every
    list on every encoder call, so the padding of the wide scales would cost milliseconds.
    """

    def __init__(self, module: Any) -> None:
        from .rans import Tables

        self.lengths: list[int] = module._cdf_length.reshape(-1).int().tolist()
        self.cdfs = [row[:n] for row, n in zip(module._quantized_cdf.tolist(), self.lengths, strict=True)]
        self.offsets: list[int] = module._offset.reshape(-1).int().tolist()
        self.arrays = Tables(self.cdfs, self.lengths, self.offsets)

    def encode(self, encoder: Any, symbols: Any, indexes: Any) -> Any:
        """Code ``symbols``: a ``RansEncoder`` returns their string, a ``BufferedRansEncoder`` queues them."""
        return encoder.encode_with_indexes(
            symbols.reshape(-1).tolist(), indexes.reshape(-1).tolist(), self.cdfs, self.lengths, self.offsets
        )

    def read(self, stream: Any, indexes: Any) -> Any:
        """The next ``indexes.size`` int32 symbols of a :class:`~.rans.RansStream`; raises ``CorruptTile``."""
        return stream.decode(indexes, self.arrays)

    def decode(self, data: bytes, indexes: Any) -> Any:
        """The ``indexes.size`` int32 symbols of the string ``data``; raises ``CorruptTile``."""
        from .rans import RansStream

        return RansStream(data).decode(indexes, self.arrays)


class _Factorized:
    """Entropy coding of a latent under a factorized prior (one density per channel)."""

    def __init__(self, eb: Any, channels: int) -> None:
        self.channels = channels
        self.tables = _Tables(eb)
        self.medians = eb.quantiles[:, 0, 1].detach().double().cpu().numpy()[:, None, None]
        self._indexes: dict[tuple[int, int], Any] = {}

    def indexes(self, h: int, w: int) -> Any:
        """Each symbol's CDF (its channel's), int32, in coding order (channel-major)."""
        key = (h, w)
        idx = self._indexes.get(key)
        if idx is None:
            idx = np.repeat(np.arange(self.channels, dtype=np.int32), h * w)
            self._indexes[key] = idx
        return idx

    def quantize(self, y: Any) -> tuple[Any, Any]:
        """``C x h x w`` float64 latent -> (int32 symbols, the latent the decoder will see)."""
        symbols = np.round(y - self.medians).astype(np.int32)
        return symbols, symbols + self.medians

    def encode(self, encoder: Any, y: Any) -> bytes:
        """``C x h x w`` float64 latent -> rANS string."""
        data: bytes = self.tables.encode(encoder, self.quantize(y)[0], self.indexes(*y.shape[1:]))
        return data

    def decode(self, data: bytes, h: int, w: int) -> Any:
        """rANS string -> ``C x h x w`` float64 latent; raises ``CorruptTile``."""
        symbols = self.tables.decode(data, self.indexes(h, w))
        return symbols.astype(np.float64).reshape(self.channels, h, w) + self.medians


class _Hyperprior:
    """Side latent under a factorized prior, then the latent under the Gaussians it predicts.

    Payload: u32 length of the side string, side string, latent string.
    """

    def __init__(self, model: Any, device: Any) -> None:
        import torch

        self.device = device
        # An integer entropy model decodes on the CPU whatever the device: the rANS decoder and the
        # per-pass book-keeping run there anyway, and its integers are the same everywhere (on an
        # H200, the generic path on CUDA took 8.6-13 ms per tile at every batch size from 1 to 128:
        # bench/results/decode_gpu.json).  The device keeps the synthesis, in batches.
        self.entropy_device = torch.device("cpu") if getattr(model, "int8_entropy", False) else device
        self.M = model.M
        self.side = _Factorized(model.hyper_bottleneck, model.H)
        self.tables = _Tables(model.gaussian_conditional)
        self.hyper_params = model.exact_hyper_params(self.entropy_device)
        self.h_a = model.h_a
        self.step = model.step

    def _params(self, z_hat: Any, h: int, w: int) -> tuple[Any, Any]:
        """(scale indexes int32, means float64), both ``M x h x w``, for a decoded side latent."""
        import torch

        from .models.klt import scale_indexes

        means, log_scales = self.hyper_params(torch.from_numpy(z_hat)[None].to(self.entropy_device))
        return scale_indexes(log_scales[0, :, :h, :w]).cpu().numpy(), means[0, :, :h, :w].cpu().numpy()

    def encode(self, encoder: Any, y: Any) -> bytes:
        import torch

        with torch.inference_mode():
            z = self.h_a(torch.from_numpy(y)[None].float().to(self.device) * self.step)[0].double().cpu().numpy()
        side, z_hat = self.side.encode(encoder, z), self.side.quantize(z)[1]
        indexes, means = self._params(z_hat, *y.shape[1:])
        data: bytes = self.tables.encode(encoder, np.round(y - means).astype(np.int32), indexes)
        return struct.pack("<I", len(side)) + side + data

    def _side(self, data: bytes, h: int, w: int) -> tuple[Any, bytes]:
        """Split a payload: (the decoded side latent, the latent string); raises ``CorruptTile``."""
        if len(data) < 4:
            raise CorruptTile("neural: payload too short for its side information")
        (n_side,) = struct.unpack_from("<I", data)
        if n_side > len(data) - 4:
            raise CorruptTile("neural: side information runs past the payload")
        return self.side.decode(data[4 : 4 + n_side], -(-h // 4), -(-w // 4)), data[4 + n_side :]

    def decode(self, data: bytes, h: int, w: int) -> Any:
        z_hat, latent = self._side(data, h, w)
        indexes, means = self._params(z_hat, h, w)  # exactly M * h * w of each
        symbols = self.tables.decode(latent, indexes)
        return symbols.astype(np.float64).reshape(self.M, h, w) + means


class _Context(_Hyperprior):
    """The hyperprior's Gaussians corrected pass by pass by the context model (``klt-cx8``).

    Payload as the hyperprior's; the latent string holds the passes in coding order
    (one rANS stream).  Encoder and decoder walk the passes in the same function,
    :meth:`_code`, so they cannot disagree on a symbol's Gaussian.
    """

    def __init__(self, model: Any, device: Any) -> None:
        from .models.context import warm_up

        super().__init__(model, device)
        warm_up()  # the book-keeping kernels, compiled now rather than in the first request
        self.passes = model.passes()
        self.pass_coder = model.pass_coder(self.entropy_device)
        self._positions: dict[tuple[int, int], dict[bool | None, Any]] = {}

    def positions(self, h: int, w: int) -> dict[bool | None, Any]:
        """Flat positions each kind of pass codes: anchors (True), the others (False), all (None)."""
        from .models.context import anchor_mask

        got = self._positions.get((h, w))
        if got is None:
            anchors = anchor_mask(h, w).reshape(-1).numpy()
            got = {True: np.flatnonzero(anchors), False: np.flatnonzero(~anchors), None: np.arange(h * w)}
            self._positions[h, w] = got
        return got

    def _code(self, z_hat: Any, h: int, w: int, symbols_for: Any) -> Any:
        """Walk the passes; ``symbols_for(pass, indexes, means)`` returns each pass's int32 symbols.

        ``indexes`` (int32) and ``means`` (float64) are numpy arrays ``channels x positions``;
        returns the decoded latent ``M x h x w`` (float64).  The model's pass coder
        (``context.Passes``) computes each pass's Gaussians and keeps what the context reads.
        """
        import torch

        from .models.context import hyper_mean_clamped

        means_t, log_scales_t = self.hyper_params(torch.from_numpy(z_hat)[None].to(self.entropy_device))
        means = np.ascontiguousarray(hyper_mean_clamped(means_t[0, :, :h, :w]).reshape(self.M, h * w).cpu().numpy())
        log_scales = np.ascontiguousarray(log_scales_t[0, :, :h, :w].reshape(self.M, h * w).cpu().numpy())
        positions = self.positions(h, w)
        y_hat = np.empty_like(means)
        state = self.pass_coder(h, w)
        for n, (k, lo, hi, where) in enumerate(self.passes):
            pos = positions[where]
            mu = np.empty((hi - lo, len(pos)))
            indexes = np.empty((hi - lo, len(pos)), dtype=np.int32)
            state.gaussians(k, lo, hi, where, pos, means, log_scales, mu, indexes)
            symbols = np.ascontiguousarray(symbols_for(n, indexes, mu), dtype=np.int32).reshape(-1)
            state.update(symbols, mu, means, lo, pos, y_hat)
        return y_hat.reshape(self.M, h, w)

    def encode(self, encoder: Any, y: Any) -> bytes:
        import torch
        from compressai.ans import BufferedRansEncoder

        with torch.inference_mode():
            z = self.h_a(torch.from_numpy(y)[None].float().to(self.device) * self.step)[0].double().cpu().numpy()
        side, z_hat = self.side.encode(encoder, z), self.side.quantize(z)[1]
        stream = BufferedRansEncoder()
        flat = y.reshape(self.M, -1)
        positions = self.positions(y.shape[1], y.shape[2])

        def quantize(n: int, indexes: Any, mu: Any) -> Any:
            _, lo, hi, where = self.passes[n]
            q = np.round(flat[lo:hi, positions[where]] - mu).astype(np.int32)
            self.tables.encode(stream, q, indexes)
            return q

        self._code(z_hat, y.shape[1], y.shape[2], quantize)
        latent: bytes = stream.flush()
        return struct.pack("<I", len(side)) + side + latent

    def decode(self, data: bytes, h: int, w: int) -> Any:
        from .rans import RansStream

        z_hat, latent = self._side(data, h, w)
        stream = RansStream(latent)
        return self._code(z_hat, h, w, lambda n, indexes, mu: self.tables.read(stream, indexes))


def weights_state(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A weights file's ``state_dict`` as a model loads it: floating tensors back in float32 (the
    analysis is stored in float16, ``save_weights``)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}


class _Model:
    """Loaded weights plus everything coding needs, prepared once."""

    def __init__(self, path: Path, device: str) -> None:
        import torch

        from .models import Model, build, load_state

        payload = torch.load(path, map_location="cpu", weights_only=True)
        model: Model = build(payload["architecture"], **payload["args"])
        load_state(model, weights_state(payload))
        model.eval()
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.M = model.M
        self.stride = int(model.stride)
        self.coder: _Factorized | _Hyperprior
        if hasattr(model, "passes"):
            self.coder = _Context(model, self.device)
        elif hasattr(model, "gaussian_conditional"):
            self.coder = _Hyperprior(model, self.device)
        else:
            self.coder = _Factorized(model.entropy_bottleneck, model.M)
        self.synthesize = model.exact_synthesizer(self.device)
        #: SHA-256 of the encoder add-on attached (``attach_encoder``), if any
        self.encoder: str | None = None
        from .rans import warm_up

        warm_up()

    def attach_encoder(self, path: Path, sha256: str) -> None:
        """Encode with the add-on at ``path`` (its deeper ``g_a`` and ``h_a``; decoding is untouched)."""
        import torch

        from .models.encoder import load_encoder

        load_encoder(self.model, torch.load(path, map_location="cpu", weights_only=True))
        self.model.g_a.eval()
        self.encoder = sha256


@register("neural")
class NeuralCodec:
    """Learned tile codec; ``quality`` 1..N picks one of the shipped models.

    ``model`` (a weights SHA-256) picks a specific installed model of that quality,
    current or retired (slides record the one that coded them); ``params`` always
    names it.  ``device`` is ``"auto"`` (CUDA when available, resolved at first use),
    ``"cpu"`` or ``"cuda"``.  ``threads`` sets torch's CPU thread count at load
    (process-wide); ``None`` leaves it alone.  ``synthesis_batch`` caps the
    tiles per synthesis pass (default: ``CPU_SYNTHESIS_BATCH`` on CPU, the whole
    batch on CUDA); it changes speed only, never pixels.  ``refine``: steps of encoder-side
    latent refinement (``models/refine.py``; 0, the default, codes ``g_a``'s latent as is):
    fewer bits at the same quality for about ``refine`` training steps of encoding time per
    tile; bitstreams and decoding are unchanged (hyperprior and context models only).
    ``encoder``: which analysis chooses the latents to code.  ``None`` (the default) uses the
    model's encoder add-on when its manifest entry lists one (``models/encoder.py``: a deeper
    analysis trained against the frozen decoder), else the model's own; ``"base"`` always the
    model's own; a SHA-256 that add-on (slides record the one that coded them).  Like ``refine``
    it only matters to encoding: the model, the bitstreams' decoding and the pixels they decode
    to are the same whichever analysis coded them, and a missing add-on fails the encode, never
    the decode.
    """

    name = "neural"
    tiff_compression = TIFF_NEURAL

    def __init__(
        self,
        quality: int = 3,
        *,
        model: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
        synthesis_batch: int | None = None,
        refine: int = 0,
        encoder: str | None = None,
        weights_dir: Path | None = None,
    ) -> None:
        self.weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        models = _manifest(self.weights_dir).get("models", {})
        if str(quality) not in models or isinstance(quality, bool):
            have = ", ".join(str(q) for q in available_qualities(self.weights_dir)) or "none installed"
            raise ValueError(f"neural quality must be one of {have}; got {quality!r}")
        entry: dict[str, Any] = models[str(quality)]
        if model is not None and model != entry["sha256"]:
            found = [e for q, e in _installed(self.weights_dir) if e["sha256"] == model and q == str(quality)]
            if not found:
                raise ValueError(f"no installed neural q{quality} model has weights sha256 {str(model)[:16]}...")
            entry = found[0]
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"neural device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        self.quality = int(quality)
        self._entry = entry
        self.params: dict[str, Any] = {"quality": self.quality, "model": entry["sha256"]}
        self._device = device
        self._threads = threads
        if synthesis_batch is not None and synthesis_batch < 1:
            raise ValueError(f"synthesis_batch must be >= 1, got {synthesis_batch}")
        self._synthesis_batch = synthesis_batch
        if isinstance(refine, bool) or not isinstance(refine, int) or not 0 <= refine <= MAX_REFINE:
            raise ValueError(f"refine must be an integer 0..{MAX_REFINE} (steps), got {refine!r}")
        self._refine = refine
        if refine:
            self.params["refine"] = refine  # provenance: how the slide's tiles were encoded
        self._encoder = self._pick_encoder(encoder, entry)
        if self._encoder is not None:
            self.params["encoder"] = self._encoder["sha256"]
        self._tag = bytes.fromhex(self._entry["sha256"])[:4]
        self.model_info: dict[str, Any] = {
            "architecture": self._entry["architecture"],
            "quality": self.quality,
            "weights_sha256": self._entry["sha256"],
            "format_version": FORMAT_VERSION,
        }
        self._lock = threading.Lock()
        self._model: _Model | None = None

    def __repr__(self) -> str:
        return f"NeuralCodec(quality={self.quality}, device={self._device!r})"

    def _pick_encoder(self, encoder: str | None, entry: Mapping[str, Any]) -> dict[str, Any] | None:
        """The encoder add-on's manifest entry that ``encoder`` names (see the class docstring), or
        ``None`` for the model's own analysis.  An add-on the manifest does not list is remembered
        by its SHA-256 alone and fails at the first encode (decoding never needs it)."""
        listed: dict[str, Any] | None = entry.get("encoder")
        if encoder is None:
            return listed
        if encoder == "base":
            return None
        if not isinstance(encoder, str) or len(encoder) != 64 or encoder.strip("0123456789abcdef"):
            raise ValueError(f"neural encoder must be 'base' or an add-on's SHA-256, got {encoder!r}")
        return listed if listed is not None and listed["sha256"] == encoder else {"sha256": encoder}

    @property
    def decode_params(self) -> dict[str, Any]:
        """What decoding depends on: ``params`` less what only encoding used (``refine``, ``encoder``)."""
        return {"quality": self.quality, "model": self._entry["sha256"]}

    @property
    def device(self) -> str:
        """The configured device (``auto`` until the model is loaded)."""
        return str(self._model.device) if self._model is not None else self._device

    def load(self) -> None:
        """Load the weights now (otherwise the first encode/decode does); raises ``MissingModel``."""
        self._load()

    def _load(self) -> _Model:
        model = self._model
        if model is not None:
            return model
        with self._lock:
            if self._model is None:
                import torch

                if self._threads is not None:
                    torch.set_num_threads(self._threads)
                device = self._device
                if device == "auto":
                    device = "cuda" if torch.cuda.is_available() else "cpu"
                path = self.weights_dir / self._entry["file"]
                _check_file(path, self._entry["sha256"], f"neural q{self.quality} weights")
                self._model = _Model(path, device)
            return self._model

    def _load_encoder(self) -> _Model:
        """The loaded model, with its encoder add-on attached if this codec encodes with one."""
        m = self._load()
        want = self._encoder
        if want is None or m.encoder == want["sha256"]:
            return m
        with self._lock:
            if m.encoder is None:
                label = f"neural q{self.quality} encoder add-on {want['sha256'][:16]}..."
                try:
                    if "file" not in want:
                        raise MissingModel(f"{label} is not listed for this model")
                    path = self.weights_dir / want["file"]
                    _check_file(path, want["sha256"], label)
                except MissingModel as exc:
                    raise MissingModel(f"{exc} (encoder='base' codes without it)") from None
                m.attach_encoder(path, want["sha256"])
        return m

    # -- encoding ------------------------------------------------------------------------
    def encode(self, tile: Tile) -> bytes:
        """Code one ``H x W x 3`` uint8 tile (``1 <= H, W <= MAX_TILE_SIDE``)."""
        return self.encode_batch([tile])[0]

    def encode_batch(self, tiles: Sequence[Tile]) -> list[bytes]:
        """Code many tiles; same-shape tiles share one analysis forward pass."""
        import torch

        m = self._load_encoder()  # imports compressai (quietly) before we import from it
        from compressai.ans import RansEncoder

        arrays = [_check_tile(t) for t in tiles]
        out: list[bytes] = [b""] * len(arrays)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape[:2], []).append(i)
        encoder = RansEncoder()
        for (height, width), idx in groups.items():
            ph, pw = (-height) % m.stride, (-width) % m.stride
            x = torch.from_numpy(np.stack([arrays[i] for i in idx])).to(m.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            if ph or pw:
                # Edge replication codes cheaper than zeros and is cropped away on decode.
                x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
            y = self._latents(m, x).double().cpu().numpy()
            lh, lw = y.shape[2:]
            with torch.inference_mode():
                for j, i in enumerate(idx):
                    payload = m.coder.encode(encoder, y[j])
                    header = _HEADER.pack(
                        _MAGIC, FORMAT_VERSION, self.quality, self._tag, height, width, lh, lw, zlib.crc32(payload)
                    )
                    out[i] = header + payload
        return out

    def _latents(self, m: _Model, x: Any) -> Any:
        """The latents to code for padded images ``x``: the analysis's, refined when asked."""
        import torch

        if not self._refine:
            with torch.inference_mode():
                return m.model.g_a(x)
        from .models import KLTHyper
        from .models.refine import refine_latents

        model, entry = m.model, self._entry
        # Checked here, not in __init__: a slide records refine in its codec parameters, and
        # opening it (decoding only) must not depend on what encoding needed.
        if not isinstance(model, KLTHyper) or "lambda" not in entry:
            raise ValueError(
                f"refine needs a hyperprior model with its training lambda in the manifest; "
                f"q{self.quality} is {entry['architecture']}{'' if 'lambda' in entry else ' without a lambda'}"
            )
        chunks = [
            refine_latents(
                model,
                x[i : i + REFINE_BATCH],
                steps=self._refine,
                lmbda=float(entry["lambda"]),
                distortion=str(entry.get("distortion", "mse")),
                lambda_mse=float(entry.get("lambda_mse", 0.0)),
            )
            for i in range(0, x.shape[0], REFINE_BATCH)
        ]
        return torch.cat(chunks)

    # -- decoding ------------------------------------------------------------------------
    def decode(self, data: bytes) -> Tile:
        """Decode one tile; raises ``CorruptTile`` on bad input."""
        result = self.decode_batch([data])[0]
        if isinstance(result, CorruptTile):
            raise result
        return result

    def _latent(self, m: _Model, data: bytes) -> tuple[Any, int, int]:
        """A tile's latent as the synthesis takes it (``M x h x w`` float64), and the tile size."""
        quality, tag, height, width, lh, lw, payload = parse_header(data, m.stride)
        if quality != self.quality or tag != self._tag:
            raise CorruptTile(
                f"neural: tile was coded by model q{quality} ({tag.hex()}), not q{self.quality} ({self._tag.hex()})"
            )
        return m.coder.decode(payload, lh, lw), height, width

    def decode_batch(self, blobs: Sequence[bytes]) -> list[Tile | CorruptTile]:
        """Decode many tiles: entropy decoding per tile, synthesis passes of up to the synthesis
        batch of latents of one shape, each run as soon as it is full (on CPU, where the pass is
        one tile, right after the tile's entropy decoding, while its latent is still in cache).

        A bad blob yields its ``CorruptTile`` in its slot; the others decode normally.
        """
        import torch

        m = self._load()
        out: list[Tile | CorruptTile] = [CorruptTile("neural: not decoded")] * len(blobs)
        chunk = self._synthesis_batch or (CPU_SYNTHESIS_BATCH if m.device.type == "cpu" else len(blobs))
        groups: dict[tuple[int, int], list[tuple[int, Any, int, int]]] = {}

        def synthesize(items: list[tuple[int, Any, int, int]]) -> None:
            latents = [it[1] for it in items]
            y = torch.from_numpy(latents[0][None] if len(latents) == 1 else np.stack(latents))  # one: no copy
            pixels = m.synthesize(y.to(m.device)).permute(0, 2, 3, 1).cpu().numpy()
            for (i, _, height, width), px in zip(items, pixels, strict=True):
                out[i] = np.ascontiguousarray(px[:height, :width])

        with torch.inference_mode():
            for i, blob in enumerate(blobs):
                try:
                    latent, height, width = self._latent(m, bytes(blob))
                except CorruptTile as exc:
                    out[i] = exc
                    continue
                group = groups.setdefault(latent.shape[1:], [])
                group.append((i, latent, height, width))
                if len(group) == chunk:
                    synthesize(group)
                    group.clear()
            for group in groups.values():
                if group:
                    synthesize(group)
        return out


def _check_tile(tile: Tile) -> Any:
    arr = np.ascontiguousarray(tile)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"tile must be HxWx3 uint8, got {arr.shape} {arr.dtype}")
    if not (1 <= arr.shape[0] <= MAX_TILE_SIDE and 1 <= arr.shape[1] <= MAX_TILE_SIDE):
        raise ValueError(f"tile sides must be 1..{MAX_TILE_SIDE}, got {arr.shape[:2]}")
    return arr
