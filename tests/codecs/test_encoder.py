"""Encoder add-ons (``models/encoder.py``): a deeper analysis that changes which latents are coded,
never how a bitstream decodes.  Mechanics on tiny random-weight models; no training here."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tileserver.errors import MissingModel

from .conftest import TINY_ARCHS, as_batch, tiny_model

torch = pytest.importorskip("torch")

from tileserver.codecs.models import build  # noqa: E402
from tileserver.codecs.models.encoder import DeepAnalysis, deepen, encoder_state, load_encoder  # noqa: E402
from tileserver.codecs.neural import NeuralCodec, save_encoder, save_weights  # noqa: E402

pytestmark = pytest.mark.shared_data

#: the architectures that take an add-on (hyperprior KLT models)
TINY = ("klt-cx8", "klt-hp8")


@pytest.fixture(params=TINY)
def with_add_on(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict]:
    """A weights directory with a tiny q1 model and an encoder add-on for it (blocks not at zero)."""
    save_weights(tiny_model(request.param, 0), name="tiny-q1", quality=1, weights_dir=tmp_path)
    model = NeuralCodec(1, encoder="base", weights_dir=tmp_path)._load().model
    deep = deepen(model, 2, 16)
    with torch.no_grad():
        for block in deep.blocks:
            torch.nn.init.normal_(block.b.weight, std=0.05)
        model.h_a[0].weight.mul_(1.5)
    entry = save_encoder(model, quality=1, weights_dir=tmp_path, meta={"steps": 7})
    return tmp_path, entry


def _tiles(image: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(image[:128, :128]), np.ascontiguousarray(image[200:296, 100:180])]


def test_new_blocks_start_as_the_shipped_analysis(image: np.ndarray) -> None:
    model = tiny_model("klt-cx8", 0).eval()
    x = as_batch(np.stack(_tiles(image)[:1]))
    with torch.no_grad():
        before = model.g_a(x)
        deepen(model, 2, 16)
        assert isinstance(model.g_a, DeepAnalysis)
        assert torch.equal(model.g_a(x), before)


def test_add_on_codes_other_latents_that_the_unchanged_model_decodes(
    with_add_on: tuple[Path, dict], image: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> None:
    weights, entry = with_add_on
    manifest = json.loads((weights / "manifest.json").read_text())
    listed = manifest["models"]["1"]["encoder"]
    assert listed == entry and entry["steps"] == 7 and (entry["blocks"], entry["width"]) == (2, 16)
    assert hashlib.sha256((weights / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    base, deep = NeuralCodec(1, encoder="base", weights_dir=weights), NeuralCodec(1, weights_dir=weights)
    assert deep.params == {**base.params, "encoder": entry["sha256"]}  # provenance: which encoder coded
    assert deep.model_info == base.model_info  # the model, and every tile's tag, are the same
    tiles = _tiles(image)
    blobs = deep.encode_batch(tiles)
    assert blobs != base.encode_batch(tiles)
    assert deep.encode_batch(tiles) == blobs
    # Any codec of the model decodes them, bit for bit the same, with or without the add-on installed.
    bare = tmp_path_factory.mktemp("bare")
    for name in ("manifest.json", "tiny-q1.pt"):
        shutil.copy(weights / name, bare / name)
    decoded = deep.decode_batch(blobs)
    for other in (base, NeuralCodec(1, weights_dir=bare), NeuralCodec(1, encoder=entry["sha256"], weights_dir=bare)):
        for a, b in zip(other.decode_batch(blobs), decoded, strict=True):
            assert np.array_equal(a, b)
    # Attaching it left every decoding parameter as the model file has it.
    shipped = base._load().model.state_dict()
    for key, value in deep._load().model.state_dict().items():
        if not key.startswith(("g_a.", "h_a.")):
            assert torch.equal(value, shipped[key]), key


def test_missing_or_tampered_add_on_fails_the_encode_not_the_decode(
    with_add_on: tuple[Path, dict], image: np.ndarray
) -> None:
    weights, entry = with_add_on
    tile = _tiles(image)[0]
    blob = NeuralCodec(1, weights_dir=weights).encode(tile)
    unlisted = NeuralCodec(1, encoder="f" * 64, weights_dir=weights)
    assert unlisted.decode(blob).shape == tile.shape
    with pytest.raises(MissingModel, match="not listed"):
        unlisted.encode(tile)
    path = weights / entry["file"]
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(MissingModel, match="digest"):
        NeuralCodec(1, weights_dir=weights).encode(tile)
    path.unlink()
    gone = NeuralCodec(1, weights_dir=weights)
    assert gone.decode(blob).shape == tile.shape
    with pytest.raises(MissingModel, match="not installed"):
        gone.encode(tile)
    assert NeuralCodec(1, encoder="base", weights_dir=weights).encode(tile)  # the model's own still codes


@pytest.mark.parametrize("bad", ["deep", "F" * 64, "0" * 63, 5])
def test_encoder_must_be_base_or_a_digest(bad: object) -> None:
    with pytest.raises(ValueError, match="encoder must be 'base'"):
        NeuralCodec(3, encoder=bad)  # type: ignore[arg-type]


def test_a_payload_that_does_not_fit_leaves_the_model_as_it_was() -> None:
    donor = tiny_model("klt-hp8", 0)
    deepen(donor, 1, 16)
    payload = {"format": 1, "kind": "encoder", "blocks": 1, "width": 16, "state_dict": encoder_state(donor)}
    args = {**TINY_ARCHS["klt-hp8"], "H": 12}
    model = build("klt-hp8", **args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="h_a"):
        load_encoder(model, payload)
    with pytest.raises(ValueError, match="does not fit"):
        load_encoder(build("klt-hp8", **TINY_ARCHS["klt-hp8"]), {**payload, "blocks": 2})
    with pytest.raises(ValueError, match="not an encoder add-on"):
        load_encoder(model, {**payload, "kind": "weights"})
    assert not isinstance(model.g_a, DeepAnalysis)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="hyperprior KLT model"):
        deepen(build("klt-ps8", M=8, N=8, widths=[8, 8], step=0.05), 1, 8)


def test_rate_hold_moves_the_rate_weight_toward_the_shipped_rate() -> None:
    """``train_encoder.py --hold-rate``: the rate term's weight rises while the add-on codes the same crops
    in more bits than the shipped encoder, falls while in fewer, and stays within 1/4..4."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "train_encoder.py"
    spec = importlib.util.spec_from_file_location("train_encoder", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Shipped:  # codes any 8x8 crop in 1 bpp
        trained = False

        def train(self) -> None:
            self.trained = True

        def __call__(self, x: torch.Tensor) -> dict:
            return {"likelihoods": torch.full((64,), 0.5)}

    x = torch.zeros(1, 3, 8, 8)
    for bpp, rises in ((1.2, True), (0.8, False)):
        hold = mod.RateHold(Shipped())
        assert hold.shipped.trained  # noisy latents, as in training
        for _ in range(200):
            hold.update(x, bpp)
        assert (hold.weight > 1) is rises
        assert hold.ratio == pytest.approx(bpp, rel=0.05)
        for _ in range(20_000):
            hold.update(x, bpp)
        assert hold.weight == (4.0 if rises else 0.25)
    hold = mod.RateHold(Shipped())
    for _ in range(400):
        hold.update(x, 1.0)
    assert hold.weight == 1.0 and hold.ratio == 1.0
    # A resumed run starts where its last run's multiplier ended (within the bounds), and holds it at par.
    hold = mod.RateHold(Shipped(), weight=1.4)
    for _ in range(400):
        hold.update(x, 1.0)
    assert hold.weight == 1.4
    assert mod.RateHold(Shipped(), weight=9.0).weight == 4.0
