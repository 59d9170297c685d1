"""The neural codec: round trips on real tiles, exact batching, bad input, model identity.

Mechanics tests use a tiny random-weight model written to a temporary weights
directory; quality tests use the shipped weights.  No training happens here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tileserver import codecs
from tileserver.errors import CorruptTile, MissingModel

from ..conftest import CMU, DICOM, NDPI, PATCHES
from .conftest import TINY_ARCHS, tiny_model

torch = pytest.importorskip("torch")

from tileserver.codecs import neural  # noqa: E402
from tileserver.codecs.neural import NeuralCodec, check_model, save_weights  # noqa: E402

pytestmark = pytest.mark.shared_data

HELD_OUT = PATCHES / "tissue" / "TissueImageAnalytics+tiatoolbox__target_image.png"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def _slide_tile(path: Path, size: int = 256) -> np.ndarray:
    import openslide

    p = path
    if p.is_dir():
        p = sorted(p.glob("*.dcm"))[0]
    with openslide.OpenSlide(str(p)) as s:
        w, h = s.dimensions
        # The middle of level 0 is tissue (or signal) on all three shared slides.
        region = s.read_region((w // 2 - size // 2, h // 2 - size // 2), 0, (size, size)).convert("RGB")
    return np.asarray(region).copy()


@pytest.fixture(scope="module")
def real_tiles() -> list[np.ndarray]:
    """One 256^2 tile from each shared slide plus tiles of a held-out patch."""
    img = np.asarray(Image.open(HELD_OUT).convert("RGB"))
    tiles = [img[0:256, 0:256], img[256:512, 512:768]]
    tiles += [_slide_tile(p) for p in (CMU, NDPI, DICOM)]
    return [np.ascontiguousarray(t) for t in tiles]


@pytest.fixture(scope="module", params=sorted(TINY_ARCHS))
def tiny_weights(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two random-weight tiny models (qualities 1 and 2) in their own weights directory."""
    d = tmp_path_factory.mktemp("weights")
    for q in (1, 2):
        model = tiny_model(request.param, q)
        save_weights(model, name=f"tiny-q{q}", quality=q, weights_dir=d)
    return d


@pytest.fixture(scope="module")
def tiny(tiny_weights: Path) -> NeuralCodec:
    return NeuralCodec(1, weights_dir=tiny_weights)


@pytest.fixture(scope="module")
def tiny_whole_batch(tiny_weights: Path) -> NeuralCodec:
    return NeuralCodec(1, weights_dir=tiny_weights, synthesis_batch=64)


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _mixed_tiles(real: list[np.ndarray], n: int) -> list[np.ndarray]:
    # Mixed neighbours: full tiles, edge tiles of odd sizes, a tiny one, repeated.
    shapes = [(256, 256), (256, 100), (37, 200), (256, 256), (5, 3), (130, 256)]
    out = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        src = real[i % len(real)]
        out.append(np.ascontiguousarray(src[:h, :w]))
    return out


# -- registry and identity ------------------------------------------------------------------


def test_registry_import_does_not_import_torch() -> None:
    code = (
        "import sys, tileserver.codecs as c; c.available(); c.get('jpeg', quality=80);"
        "q = c.neural.available_qualities(); [c.get('neural', quality=x) for x in q];"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_get_neural_attributes() -> None:
    qualities = neural.available_qualities()
    assert len(qualities) >= 4
    assert qualities == list(range(1, len(qualities) + 1))
    codec = codecs.get("neural", quality=qualities[0])
    assert isinstance(codec, codecs.TileCodec)
    assert codec.name == "neural"
    decoding = {"quality": qualities[0], "model": codec.model_info["weights_sha256"]}  # type: ignore[attr-defined]
    assert codec.decode_params == decoding  # type: ignore[attr-defined]
    add_on = codec._entry.get("encoder")  # type: ignore[attr-defined]
    assert codec.params == ({**decoding, "encoder": add_on["sha256"]} if add_on else decoding)
    assert codec.tiff_compression == 65000
    info = codec.model_info  # type: ignore[attr-defined]
    assert set(info) == {"architecture", "quality", "weights_sha256", "format_version"}
    assert info["quality"] == qualities[0]


def test_unknown_quality_lists_available() -> None:
    with pytest.raises(ValueError, match=r"one of 1, 2, 3, 4"):
        codecs.get("neural", quality=99)
    with pytest.raises(ValueError):
        codecs.get("neural", quality=0)


def test_manifest_digests_match_shipped_files() -> None:
    manifest = json.loads((neural.WEIGHTS_DIR / "manifest.json").read_text())
    models = [*manifest["models"].values(), *manifest.get("retired", [])]
    for entry in models + [m["encoder"] for m in models if "encoder" in m]:
        data = (neural.WEIGHTS_DIR / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) < 8 << 20


def test_check_model_accepts_installed_and_rejects_others() -> None:
    info = dict(codecs.get("neural", quality=1).model_info)  # type: ignore[attr-defined]
    check_model(info)
    with pytest.raises(MissingModel, match=f"{info['architecture']} quality 1"):
        check_model({**info, "weights_sha256": "0" * 64})
    with pytest.raises(MissingModel, match="format version"):
        check_model({**info, "format_version": 99})
    with pytest.raises(MissingModel):
        check_model({**info, "quality": 2})  # digest of q1 claimed as q2


def test_replaced_model_is_retired_and_still_decodes(real_tiles: list[np.ndarray], tmp_path: Path) -> None:
    from tileserver.codecs.models import build

    args = TINY_ARCHS["klt-hp8"]
    torch.manual_seed(0)
    first = save_weights(build("klt-hp8", **args), name="old", quality=1, weights_dir=tmp_path)
    old = NeuralCodec(1, weights_dir=tmp_path)
    tile = real_tiles[0][:64, :64].copy()
    blob, pixels = old.encode(tile), old.decode(old.encode(tile))
    torch.manual_seed(1)
    second = save_weights(build("klt-hp8", **args), name="new", quality=1, weights_dir=tmp_path)
    assert first["sha256"] != second["sha256"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["models"]["1"]["sha256"] == second["sha256"]
    assert [e["sha256"] for e in manifest["retired"]] == [first["sha256"]]
    assert neural.available_qualities(tmp_path) == [1]
    # The slide's record of the old model still checks, and that model still decodes it ...
    check_model(old.model_info, tmp_path)
    again = NeuralCodec(1, model=first["sha256"], weights_dir=tmp_path)
    assert again.params == {"quality": 1, "model": first["sha256"]}
    assert np.array_equal(again.decode(blob), pixels)
    # ... while new conversions use the new one, which refuses the old tiles.
    current = NeuralCodec(1, weights_dir=tmp_path)
    assert current.model_info["weights_sha256"] == second["sha256"]
    with pytest.raises(CorruptTile, match="coded by model"):
        current.decode(blob)
    with pytest.raises(ValueError, match="no installed neural q1 model has weights sha256 000000"):
        NeuralCodec(1, model="0" * 64, weights_dir=tmp_path)
    # Re-exporting the same weights neither retires nor duplicates anything.
    torch.manual_seed(1)
    save_weights(build("klt-hp8", **args), name="new", quality=1, weights_dir=tmp_path)
    assert len(json.loads((tmp_path / "manifest.json").read_text())["retired"]) == 1


def test_tampered_weights_raise_missing_model(tiny_weights: Path, tmp_path: Path) -> None:
    for f in tiny_weights.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    target = tmp_path / "tiny-q1.pt"
    target.write_bytes(target.read_bytes() + b"x")
    codec = NeuralCodec(1, weights_dir=tmp_path)
    with pytest.raises(MissingModel, match="digest"):
        codec.decode(b"anything")


# -- round trips ----------------------------------------------------------------------------


def test_psnr_rises_with_quality(real_tiles: list[np.ndarray]) -> None:
    means = []
    for q in neural.available_qualities():
        codec = codecs.get("neural", quality=q)
        blobs = codec.encode_batch(real_tiles)  # type: ignore[attr-defined]
        decoded = codec.decode_batch(blobs)
        psnrs = []
        for t, d in zip(real_tiles, decoded, strict=True):
            assert isinstance(d, np.ndarray)
            assert d.shape == t.shape and d.dtype == np.uint8
            psnrs.append(_psnr(t, d))
        means.append(float(np.mean(psnrs)))
    assert means[0] > 22.0, means
    assert all(b > a for a, b in itertools.pairwise(means)), means


def test_encode_matches_encode_batch(tiny: NeuralCodec, real_tiles: list[np.ndarray]) -> None:
    tiles = _mixed_tiles(real_tiles, 6)
    batch = tiny.encode_batch(tiles)
    for t, b in zip(tiles, batch, strict=True):
        out = tiny.decode(tiny.encode(t))
        assert out.shape == t.shape
        if t.size > 10_000:  # the random model makes real pictures, so identity checks mean something
            assert len(np.unique(out)) > 10
        assert np.array_equal(out, tiny.decode(b)) or _psnr(out, tiny.decode(b)) > 40


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3, 8, 16])
def test_decode_batch_bit_identical_to_single(
    tiny: NeuralCodec,
    tiny_whole_batch: NeuralCodec,
    real_tiles: list[np.ndarray],
    batch: int,
    n_threads: int,
    threads: None,
) -> None:
    blobs = tiny.encode_batch(_mixed_tiles(real_tiles, batch))
    torch.set_num_threads(1)
    singles = [tiny.decode(b) for b in blobs]
    torch.set_num_threads(n_threads)
    # Reversed order and a corrupt neighbour change the batch's composition; one
    # synthesis pass takes the whole batch (the CPU default would go tile by tile).
    mixed = [*blobs[::-1], b"garbage"]
    results = tiny_whole_batch.decode_batch(mixed)
    assert isinstance(results[-1], CorruptTile)
    for single, res in zip(singles[::-1], results[:-1], strict=True):
        assert isinstance(res, np.ndarray)
        assert np.array_equal(single, res)


def test_synthesis_passes_of_two_fill_and_flush_per_shape(tiny_weights: Path, real_tiles: list[np.ndarray]) -> None:
    # Passes run as soon as two latents of one shape are decoded; shapes left with one are
    # synthesized at the end; every tile lands in its own slot, corrupt ones too.
    codec = NeuralCodec(1, weights_dir=tiny_weights, synthesis_batch=2)
    blobs = codec.encode_batch(_mixed_tiles(real_tiles, 9))
    singles = [codec.decode(b) for b in blobs]
    mixed = [blobs[0], b"garbage", *blobs[1:]]
    results = codec.decode_batch(mixed)
    assert isinstance(results[1], CorruptTile)
    for single, res in zip(singles, [results[0], *results[2:]], strict=True):
        assert isinstance(res, np.ndarray)
        assert np.array_equal(single, res)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_shipped_model_batch_bit_identical(real_tiles: list[np.ndarray], n_threads: int, threads: None) -> None:
    q = neural.available_qualities()[-1]
    codec = codecs.get("neural", quality=q)
    whole = codecs.get("neural", quality=q, synthesis_batch=8)
    blobs = codec.encode_batch(_mixed_tiles(real_tiles, 8))  # type: ignore[attr-defined]
    torch.set_num_threads(1)
    singles = [codec.decode(b) for b in blobs]
    torch.set_num_threads(n_threads)
    for single, res in zip(singles, whole.decode_batch(blobs), strict=True):
        assert isinstance(res, np.ndarray)
        assert np.array_equal(single, res)


def test_encode_rejects_bad_tiles(tiny: NeuralCodec) -> None:
    with pytest.raises(ValueError):
        tiny.encode(np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError):
        tiny.encode(np.zeros((16, 16, 3), np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tiny.encode(np.zeros((neural.MAX_TILE_SIDE + 1, 16, 3), np.uint8))


# -- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_blob(tiny: NeuralCodec, real_tiles: list[np.ndarray]) -> bytes:
    return tiny.encode(real_tiles[0])


def _bad_blobs(good: bytes) -> list[bytes]:
    rng = np.random.default_rng(0)
    payload = bytearray(good)
    payload[len(good) // 2] ^= 0x55
    huge = bytearray(good)
    huge[8:12] = (60000).to_bytes(2, "little") + (60000).to_bytes(2, "little")
    shape = bytearray(good)
    shape[12] = 200  # latent height inconsistent with the tile height
    other_model = bytearray(good)
    other_model[4:8] = b"\0\0\0\0"
    version = bytearray(good)
    version[2] = 7
    return [
        b"",
        good[:1],
        good[:17],
        good[:18],
        good[: len(good) // 2],
        good[:-1],
        bytes(payload),
        bytes(huge),
        bytes(shape),
        bytes(other_model),
        bytes(version),
        b"NC" + bytes(30),
        *(rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 18, 100, 5000)),
    ]


def test_bad_bitstreams_raise_corrupt_tile(tiny: NeuralCodec, good_blob: bytes) -> None:
    for bad in _bad_blobs(good_blob):
        with pytest.raises(CorruptTile):
            tiny.decode(bad)


def test_random_bytes_with_valid_header_never_crash(tiny: NeuralCodec, good_blob: bytes) -> None:
    # A crafted payload with a correct CRC reaches the entropy decoder: it must
    # still return a tile (garbage pixels) or CorruptTile, never crash or hang.
    rng = np.random.default_rng(1)
    for n in (1, 7, 64, 3000):
        payload = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        blob = good_blob[:14] + zlib.crc32(payload).to_bytes(4, "little") + payload
        try:
            out = tiny.decode(blob)
        except CorruptTile:
            continue
        assert out.shape == (256, 256, 3)


def test_bad_blob_fails_only_its_slot(tiny: NeuralCodec, good_blob: bytes) -> None:
    results = tiny.decode_batch([good_blob, b"", good_blob[:-3], good_blob])
    assert isinstance(results[0], np.ndarray)
    assert isinstance(results[1], CorruptTile)
    assert isinstance(results[2], CorruptTile)
    assert isinstance(results[3], np.ndarray)
    assert np.array_equal(results[0], results[3])


def test_tile_from_other_quality_is_corrupt(tiny_weights: Path, good_blob: bytes) -> None:
    with pytest.raises(CorruptTile, match="coded by model"):
        NeuralCodec(2, weights_dir=tiny_weights).decode(good_blob)


# -- devices --------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cpu_encoded_tiles_decode_identically_on_cuda(real_tiles: list[np.ndarray]) -> None:
    for q in neural.available_qualities():
        cpu = NeuralCodec(q, device="cpu")
        gpu = NeuralCodec(q, device="cuda")
        blobs = cpu.encode_batch(_mixed_tiles(real_tiles, 8))
        for a, b in zip(cpu.decode_batch(blobs), gpu.decode_batch(blobs), strict=True):
            assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
            assert np.array_equal(a, b)


# -- encoder-side refinement ----------------------------------------------------------------


def _objective(codec: NeuralCodec, tiles: list[np.ndarray], blobs: list[bytes]) -> float:
    """The model's own rate–distortion objective, measured on real bitstreams and decoded pixels."""
    from pytorch_msssim import ssim

    lmbda = float(codec._entry["lambda"])
    total = 0.0
    for tile, blob, out in zip(tiles, blobs, codec.decode_batch(blobs), strict=True):
        a, b = (torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1)[None].double() for t in (tile, out))
        total += len(blob) * 8 / (tile.shape[0] * tile.shape[1]) + lmbda * (1 - float(ssim(b, a, data_range=255)))
    return total / len(tiles)


def test_refined_latents_code_the_same_tiles_at_a_lower_objective(real_tiles: list[np.ndarray]) -> None:
    # Brightfield tiles (the held-out patch, CMU, Camelyon): refinement must lower the model's own
    # objective (bits + lambda * (1 - SSIM)) measured on the real bitstream, and the stream must be
    # an ordinary one that any codec of that model decodes.
    tiles = [real_tiles[i] for i in (0, 2, 4)]
    plain = neural.NeuralCodec(3)
    refined = neural.NeuralCodec(3, refine=20)
    assert refined.params == {**plain.params, "refine": 20}
    before = {k: v.clone() for k, v in refined._load_encoder().model.state_dict().items()}  # with its add-on
    blobs = refined.encode_batch(tiles)
    assert blobs != plain.encode_batch(tiles)
    assert _objective(plain, tiles, blobs) < _objective(plain, tiles, plain.encode_batch(tiles)) - 0.005
    after = refined._load().model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the weights are untouched
    assert refined.encode_batch(tiles) == blobs  # repeatable: its noise is seeded by each tile's pixels


def test_soft_rounding_anneals_to_the_nearer_integer() -> None:
    # SGA's relaxed rounding: at a high temperature a blend of floor and ceiling with a gradient;
    # at a low one (nearly) an integer, floor or ceiling, the nearer one far more often.
    from tileserver.codecs.models.refine import soft_round

    gen = torch.Generator().manual_seed(0)
    r = (torch.arange(4000, dtype=torch.float64) % 40 - 20) / 8 + 0.0625  # every residue mod 1 in eighths
    r.requires_grad_(True)
    warm = soft_round(r, 0.5, torch.rand(*r.shape, 2, generator=gen, dtype=torch.float64))
    assert bool(((warm >= torch.floor(r)) & (warm <= torch.floor(r) + 1)).all())
    assert int(((warm - warm.round()).abs() > 0.05).sum()) > 1000  # blends, not integers
    (grad,) = torch.autograd.grad(warm.sum(), [r])
    assert bool((grad != 0).any())
    cold = soft_round(r, 0.02, torch.rand(*r.shape, 2, generator=gen, dtype=torch.float64)).detach()
    picked = cold.round()
    assert float((cold - picked).abs().max()) < 1e-3
    assert bool(((picked == torch.floor(r)) | (picked == torch.floor(r) + 1)).all())
    frac = (r - torch.floor(r)).detach()
    near = torch.where(frac < 0.5, torch.floor(r), torch.floor(r) + 1).detach()
    assert float((picked == near)[(frac - 0.5).abs() > 0.2].double().mean()) > 0.8


def test_refine_zero_and_small_tiles_code_as_without_it(real_tiles: list[np.ndarray]) -> None:
    from tileserver.codecs.models.refine import MIN_SIDE

    tiles = [real_tiles[0], np.ascontiguousarray(real_tiles[0][: MIN_SIDE - 8, :200])]
    plain = neural.NeuralCodec(1)
    assert neural.NeuralCodec(1, refine=0).encode_batch(tiles) == plain.encode_batch(tiles)
    # Too small for SSIM's window after padding to the stride: coded from the analysis as is.
    assert neural.NeuralCodec(1, refine=5).encode_batch(tiles[1:]) == plain.encode_batch(tiles[1:])


@pytest.mark.parametrize("bad", [-1, 1001, 2.5, True, "60"])
def test_refine_rejects_bad_step_counts(bad: object) -> None:
    with pytest.raises(ValueError, match="refine must be an integer"):
        neural.NeuralCodec(3, refine=bad)  # type: ignore[arg-type]


def test_refine_needs_a_hyperprior_model_with_its_lambda(tiny_weights: Path, good_blob: bytes) -> None:
    manifest = json.loads((tiny_weights / "manifest.json").read_text())
    architecture = manifest["models"]["1"]["architecture"]
    if architecture in ("klt-hp8", "klt-cx8"):
        # Saved without training metadata: no lambda to refine for.
        assert "lambda" not in manifest["models"]["1"]
    codec = NeuralCodec(1, weights_dir=tiny_weights, refine=5)
    # A slide records refine among its codec parameters: opening and decoding it never needs it.
    assert codec.decode(good_blob).shape == NeuralCodec(1, weights_dir=tiny_weights).decode(good_blob).shape
    with pytest.raises(ValueError, match="refine needs a hyperprior model"):
        codec.encode(np.zeros((32, 32, 3), np.uint8))
