"""The integer synthesis (int8 = true): exact on every path, close to what training sees, guarded."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import as_batch, crops_of

torch = pytest.importorskip("torch")

from tileserver.codecs.models import build, load_state  # noqa: E402
from tileserver.codecs.models.int8 import int8_layers, reference  # noqa: E402
from tileserver.codecs.models.klt import KLTPS, fit_klt, image_blocks  # noqa: E402

pytestmark = pytest.mark.shared_data

ARGS = {"M": 24, "N": 8, "widths": [12, 8], "step": 0.08}


@pytest.fixture(scope="module")
def model(crops: np.ndarray) -> KLTPS:
    """A KLT-started int8 model with a random (non-zero) refinement, calibrated on the crops."""
    torch.manual_seed(0)
    m = build("klt-ps8", **ARGS, int8=True)
    assert isinstance(m, KLTPS)
    mean, basis, _ = fit_klt(image_blocks(crops))
    m.init_klt(mean, basis)
    with torch.no_grad():
        for stage in m.g_s:
            torch.nn.init.normal_(stage.conv.weight, std=0.05)
            torch.nn.init.normal_(stage.bias, std=0.02)
        m.calibrate_int8_(as_batch(crops))
    m.eval()
    return m


def _latents(model: KLTPS, crops: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        y = model.g_a(as_batch(crops)).double()
    # Latents as the context coder produces them: integers plus means on the 2**-10 grid.
    return torch.round(y) + torch.round(torch.rand_like(y) * 1024) / 1024


def test_cpu_path_equals_the_reference_bit_for_bit(model: KLTPS, crops: np.ndarray) -> None:
    y = _latents(model, crops)
    fast = model.exact_synthesizer(torch.device("cpu"))(y)
    assert fast.dtype == torch.uint8 and fast.shape == (len(crops), 3, 64, 64)
    assert torch.equal(fast, reference(model, y))
    assert len(torch.unique(fast)) > 50


@pytest.mark.parametrize("size", [(1, 1), (1, 3), (5, 2), (3, 7)])
def test_every_latent_size_and_the_clamps(model: KLTPS, size: tuple[int, int]) -> None:
    # Odd sizes (edge tiles), and latents far outside the trained range (clamped to |y| < 250).
    torch.manual_seed(sum(size))
    y = torch.round(torch.randn(2, model.M, *size, dtype=torch.float64) * 200) / 8
    y[0, 0, 0, 0] = 1e6
    y[1, 1, 0, 0] = -1e6
    fast = model.exact_synthesizer(torch.device("cpu"))(y)
    assert fast.shape == (2, 3, 8 * size[0], 8 * size[1])
    assert torch.equal(fast, reference(model, y))


def test_pixels_do_not_depend_on_the_batch(model: KLTPS, crops: np.ndarray) -> None:
    y = _latents(model, crops)
    run = model.exact_synthesizer(torch.device("cpu"))
    together = run(y)
    alone = torch.cat([run(y[i : i + 1]) for i in range(len(y))])
    reordered = run(y.flip(0)).flip(0)
    assert torch.equal(together, alone) and torch.equal(together, reordered)


def test_training_sees_the_decoders_quantization(model: KLTPS, crops: np.ndarray) -> None:
    y = _latents(model, crops)
    decoded = model.exact_synthesizer(torch.device("cpu"))(y).double()
    with torch.no_grad():
        seen = torch.round(model.synthesize(y.float()).clamp(0, 1) * 255.0).double()
        model.int8 = False
        try:
            float_only = torch.round(model.synthesize(y.float()).clamp(0, 1) * 255.0).double()
        finally:
            model.int8 = True
    # Rounding of the activations moves pixels: the fake-quantized forward must follow the decoder
    # much more closely than the plain float forward does.
    err_seen = float((decoded - seen).abs().mean())
    err_float = float((decoded - float_only).abs().mean())
    assert float((decoded - seen).abs().max()) <= 1.0
    assert err_seen < 0.7 * err_float, (err_seen, err_float)


def test_uncalibrated_models_refuse_to_decode_or_export() -> None:
    m = build("klt-ps8", **ARGS, int8=True)
    assert isinstance(m, KLTPS)
    with pytest.raises(ValueError, match="not calibrated"):
        m.exact_synthesizer(torch.device("cpu"))
    with pytest.raises(ValueError, match="not calibrated"):
        m.snap_synthesis_()
    entropy_only = build("klt-cx8", **CTX, int8_entropy=True)
    with pytest.raises(ValueError, match="not calibrated"):
        entropy_only.snap_synthesis_()


def test_a_layer_that_could_overflow_is_refused(model: KLTPS) -> None:
    m = build("klt-ps8", **ARGS, int8=True)
    assert isinstance(m, KLTPS)
    m.load_state_dict(model.state_dict())
    int8_layers(m)
    with torch.no_grad():
        m.int8_act_max[0] = 1e-9  # layer 1 outputs in tiny units: its multipliers explode
    with pytest.raises(ValueError, match="layer 1: a sum could overflow"):
        int8_layers(m)


def test_older_models_keep_their_config_and_state() -> None:
    old = build("klt-hp8", M=8, N=8, widths=[8, 8], step=0.1, H=8)
    assert "int8" not in old.config and "int8_act_max" not in old.state_dict()
    new = build("klt-hp8", M=8, N=8, widths=[8, 8], step=0.1, H=8, int8=True)
    assert new.config["int8"] is True
    # An int8 model starts from its float parent: only the activation ranges are new.
    missing = load_state(new, old.state_dict(), missing_ok=("int8_",))
    assert missing == ["int8_act_max"]


@pytest.mark.parametrize("flags", [{"int8": True}, {"int8_entropy": True}, {"int8": True, "int8_entropy": True}])
def test_each_integer_option_calibrates_and_trains_alone(flags: dict[str, bool], image: np.ndarray) -> None:
    model = build("klt-cx8", **CTX, **flags)
    x = as_batch(np.stack([image[:64, :64], image[64:128, 64:128]]))
    model.calibrate_int8_(x)
    assert model._int8_ready()
    expected = {"int8_act_max"} if flags.get("int8") else set()
    expected |= {"int8_hyper_max", "int8_ctx_max"} if flags.get("int8_entropy") else set()
    assert {k for k in model.state_dict() if k.startswith("int8_")} == expected
    model.train()
    out = model(x)
    assert out["x_hat"].shape == x.shape and torch.isfinite(out["likelihoods"]).all()


# -- the integer entropy model (int8_entropy = true): hyper-synthesis and context ------------------

CTX = {"M": 24, "N": 8, "widths": [8, 8], "step": 0.08, "H": 8, "slices": [3, 9], "checkerboard": 2, "ctx_width": 8}


def _q8_context(image: np.ndarray) -> torch.nn.Module:
    """A KLT-started klt-cx8 decoded in integers throughout, with random (non-zero) entropy layers."""
    torch.manual_seed(3)
    model = build("klt-cx8", **CTX, int8=True, int8_entropy=True)
    crops = crops_of(image)
    mean, basis, _ = fit_klt(image_blocks(crops))
    model.init_klt(mean, basis)
    with torch.no_grad():
        model.init_prior(model.g_a(as_batch(crops)))
        torch.nn.init.normal_(model.h_s2.weight, std=0.02)
        for conv in model.ctx_out:
            torch.nn.init.normal_(conv.weight, std=0.05)
            torch.nn.init.normal_(conv.bias, std=0.05)
    model.calibrate_int8_(as_batch(np.stack([image[y : y + 128, x : x + 128] for y in (0, 256) for x in (0, 256)])))
    model.eval()
    return model


def test_entropy_layers_equal_their_reference(image: np.ndarray) -> None:
    from tileserver.codecs.models import int8 as q8

    model = _q8_context(image)
    assert model._int8_ready() and bool((model.int8_ctx_max > 0).all())
    torch.manual_seed(4)
    z = torch.round(torch.randn(2, model.H, 3, 5, dtype=torch.float64) * 400) / 64  # some beyond the clamp
    hyper = model.exact_hyper_params(torch.device("cpu"))
    means, logs = hyper(z)
    ctx = model.exact_context(torch.device("cpu"))
    inputs = []
    for k, lo, hi, where in model.passes():
        prev = torch.round(torch.randn(2, lo, 6, 7, dtype=torch.float64) * 3000) / 1024
        own = (
            None
            if where is not False
            else torch.round(torch.randn(2, hi - lo, 6, 7, dtype=torch.float64) * 3000) / 1024
        )
        inputs.append((k, prev, own))
    got = [ctx(*args) for args in inputs]
    # The same layers through the plain-torch reference (float64 products, no numba, no _int_mm).
    orig = q8.small_conv
    q8.small_conv = q8.small_conv_reference  # type: ignore[assignment]
    try:
        ref_means, ref_logs = model.exact_hyper_params(torch.device("cpu"))(z)
        ctx_ref = model.exact_context(torch.device("cpu"))
        want = [ctx_ref(*args) for args in inputs]
    finally:
        q8.small_conv = orig  # type: ignore[assignment]
    assert torch.equal(means, ref_means) and torch.equal(logs, ref_logs)
    assert means.shape == (2, model.M, 12, 20) and len(torch.unique(means)) > 50
    for (_, lo, hi, _), g, wnt in zip(model.passes(), got, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g, wnt, strict=True))
        assert g[0].shape == (2, hi - lo, 6, 7) and bool(g[0].abs().sum() > 0)


@pytest.mark.parametrize("shape", [(6, 7), (1, 1), (4, 9)])
def test_fused_passes_equal_the_generic_passes(image: np.ndarray, shape: tuple[int, int]) -> None:
    # Int8Passes (CPU: residuals kept as int8 halves, context only where a pass codes, sums
    # straight to Gaussians) must give every symbol the Gaussian FloatPasses gives it over the
    # same int8 context: both walk the same passes with the same symbols, extreme ones included.
    from tileserver.codecs.models.context import FloatPasses

    model = _q8_context(image)
    cpu = torch.device("cpu")
    h, w = shape
    coder = model.pass_coder(cpu)
    rng = np.random.default_rng(7)
    for _ in range(2):  # a second latent of the same coder (which keeps what does not depend on it)
        _walk_both(model, coder(h, w), FloatPasses(model.exact_context(cpu), model.M, h, w, cpu), rng)


def _walk_both(model: Any, fused: Any, generic: Any, rng: np.random.Generator) -> None:
    from tileserver.codecs.models.context import Int8Passes, anchor_mask

    assert isinstance(fused, Int8Passes)
    h, w = fused.h, fused.w
    means = np.round(rng.normal(0, 4, (model.M, h * w)) * 2**10) / 2**10
    logs = np.round(rng.normal(0, 2, (model.M, h * w)) * 2**10) / 2**10
    anchors = anchor_mask(h, w).reshape(-1).numpy()
    positions = {True: np.flatnonzero(anchors), False: np.flatnonzero(~anchors), None: np.arange(h * w)}
    y_fused, y_generic = np.full((2, model.M, h * w), np.nan)
    spread = 0
    for k, lo, hi, where in model.passes():
        pos = positions[where]
        got = [(np.empty((hi - lo, len(pos))), np.empty((hi - lo, len(pos)), np.int32)) for _ in range(2)]
        fused.gaussians(k, lo, hi, where, pos, means, logs, *got[0])
        generic.gaussians(k, lo, hi, where, pos, means, logs, *got[1])
        assert np.array_equal(got[0][0], got[1][0]) and np.array_equal(got[0][1], got[1][1])
        if len(pos):  # the context moved the means (every slice of this model has one)
            assert not np.array_equal(got[0][0], means[lo:hi][:, pos])
        spread += len(np.unique(got[0][1]))
        symbols = rng.integers(-60, 60, (hi - lo) * len(pos)).astype(np.int32)
        symbols[:3] = [300, -300, 0][: len(symbols)]  # residuals beyond the int16 latent grid's clamp
        mu = got[0][0]
        fused.update(symbols, mu, means, lo, pos, y_fused)
        generic.update(symbols, mu, means, lo, pos, y_generic)
    assert np.array_equal(y_fused, y_generic) and not np.isnan(y_fused).any()
    if h * w > 1:
        assert spread > 2 * len(model.passes())  # the corrections moved the scale indexes about


def test_integer_entropy_model_codes_what_training_estimates(image: np.ndarray, tmp_path: Path) -> None:
    from tileserver.codecs.neural import NeuralCodec, save_weights

    model = _q8_context(image)
    save_weights(model, name="q8", quality=1, weights_dir=tmp_path)
    codec = NeuralCodec(1, weights_dir=tmp_path)
    tile = np.ascontiguousarray(image[:256, :192])
    with torch.no_grad():
        estimate = float(-torch.log2(model(as_batch(tile[None]))["likelihoods"]).sum()) / 8
    blob = codec.encode(tile)
    assert abs(len(blob) - estimate) < 0.03 * estimate + 64
    out = codec.decode(blob)
    assert out.shape == tile.shape and np.abs(out.astype(int) - tile).mean() < 20
    # A batch decodes to the same pixels as tiles one by one.
    blobs = codec.encode_batch([tile, np.ascontiguousarray(image[256:512, 64:256])])
    assert np.array_equal(codec.decode_batch(blobs)[0], out)


def test_the_matrix_product_other_devices_use_is_exact() -> None:
    # Off the CPU, int8 products are summed in float64 (exact below 2**53): the same integers.
    from tileserver.codecs.models.int8 import _matmul_ref

    torch.manual_seed(5)
    a = torch.randint(-128, 128, (300, 864), dtype=torch.int8)
    b = torch.randint(-128, 128, (864, 40), dtype=torch.int8)
    assert torch.equal(_matmul_ref(a, b), torch._int_mm(a, b).long())
    assert int(_matmul_ref(a, b).abs().max()) > 2**16


def _flat(layers: Any) -> list[Any]:
    """The tensors and numbers of integer layers (``Int8Synthesis``, ``QConv``s, dicts/tuples of them), in order."""
    import dataclasses

    if dataclasses.is_dataclass(layers):
        return [v for f in dataclasses.fields(layers) for v in _flat(getattr(layers, f.name))]
    if isinstance(layers, dict):
        return [v for k in sorted(layers) for v in [k, *_flat(layers[k])]]
    if isinstance(layers, list | tuple):
        return [v for item in layers for v in _flat(item)]
    return [layers.cpu() if isinstance(layers, torch.Tensor) else layers]


def test_integer_layers_refuse_weights_off_the_cpu() -> None:
    # Built on another device they could round differently (CUDA's division by a scalar): refused,
    # so a change that lets device tensors through fails loudly instead of decoding other pixels.
    from tileserver.codecs.models.int8 import quantize_conv

    w, b = torch.zeros(4, 2, 3, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    assert quantize_conv(w, b, in_unit=1.0, halves=False, out_unit=1.0, name="x").w.shape == (18, 4)
    with pytest.raises(ValueError, match="built from CPU tensors"):
        quantize_conv(w.to("meta"), b, in_unit=1.0, halves=False, out_unit=1.0, name="x")


@pytest.mark.gpu
def test_integer_layers_built_from_a_cuda_model_are_the_cpus() -> None:
    # CUDA divides a tensor by a scalar as a product with its reciprocal.  Layers built from CUDA
    # tensors once had a q4 multiplier off by one, and 5 of 16 tiles decoded differently there
    # (bench/decode_gpu.py on an H200); klt.exact_weights now builds on the CPU for every device.
    import copy

    from tileserver.codecs.neural import NeuralCodec, available_qualities

    for q in available_qualities():
        codec = NeuralCodec(q, device="cpu")
        codec.load()
        cpu = codec._model.model  # type: ignore[union-attr]
        cuda = copy.deepcopy(cpu).to("cuda")
        for build_layers in (int8_layers, lambda m: m._int8_context_layers()):
            a, b = _flat(build_layers(cpu)), _flat(build_layers(cuda))
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


_DECODE_IN_CHILD = """
import sys, numpy as np
from pathlib import Path
from typing import Any
from tileserver.codecs.models.int8 import int_mm_is_exact
from tileserver.codecs.neural import NeuralCodec
blob = Path(sys.argv[1]).read_bytes()
np.save(sys.argv[2], NeuralCodec(3).decode(blob))
print("exact" if int_mm_is_exact() else "fallback")
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN ISA switch is x86 only")
def test_a_cpu_without_vnni_decodes_the_same_pixels(image: np.ndarray, tmp_path: Path) -> None:
    # oneDNN's int8 kernels saturate pairs of products without VNNI (AVX2, AVX-512 before
    # Cascade Lake): the decoder must notice and use its exact fallback, not decode other pixels.
    from tileserver.codecs.neural import NeuralCodec

    codec = NeuralCodec(3)
    tile = np.ascontiguousarray(image[:256, :256])
    blob = codec.encode(tile)
    (tmp_path / "tile.nc").write_bytes(blob)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _DECODE_IN_CHILD, str(tmp_path / "tile.nc"), str(tmp_path / "px.npy")],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert done.stdout.strip() == "fallback"
    assert np.array_equal(np.load(tmp_path / "px.npy"), codec.decode(blob))
