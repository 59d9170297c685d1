"""The channel/checkerboard context model (klt-cx8): causal training path, exact coder, clean start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .conftest import as_batch, crops_of

torch = pytest.importorskip("torch")

from tileserver.codecs.models import build, load_state  # noqa: E402
from tileserver.codecs.models.context import KLTContext, anchor_mask  # noqa: E402
from tileserver.codecs.models.klt import fit_klt, image_blocks  # noqa: E402
from tileserver.codecs.neural import NeuralCodec, save_weights  # noqa: E402

pytestmark = pytest.mark.shared_data

ARGS = {"M": 24, "N": 8, "widths": [8, 8], "step": 0.08, "H": 8}
CTX = {"slices": [3, 9], "checkerboard": 2, "ctx_width": 8}


def _hyper(image: np.ndarray) -> torch.nn.Module:
    """A KLT-started hyperprior whose Gaussians vary (random hyper-synthesis)."""
    torch.manual_seed(0)
    model = build("klt-hp8", **ARGS)
    crops = crops_of(image)
    mean, basis, _ = fit_klt(image_blocks(crops))
    model.init_klt(mean, basis)
    with torch.no_grad():
        x = as_batch(crops)
        model.init_prior(model.g_a(x))
        torch.nn.init.normal_(model.h_s2.weight, std=0.02)
    return model


def _context(hyper: torch.nn.Module, *, random: bool) -> KLTContext:
    model = build("klt-cx8", **ARGS, **CTX)
    assert isinstance(model, KLTContext)
    fresh = load_state(model, hyper.state_dict(), missing_ok=("ctx_",))
    assert fresh and all(k.startswith("ctx_") for k in fresh)
    if random:
        torch.manual_seed(1)
        with torch.no_grad():
            for conv in model.ctx_out:
                torch.nn.init.normal_(conv.weight, std=0.05)
                torch.nn.init.normal_(conv.bias, std=0.05)
    return model


def test_passes_cover_every_symbol_once() -> None:
    model = build("klt-cx8", **ARGS, **CTX)
    assert isinstance(model, KLTContext)
    h, w = 5, 7
    count = torch.zeros(model.M, h, w)
    anchors = anchor_mask(h, w)
    assert int(anchors.sum()) == 18 and bool(anchors[0, 0]) and not bool(anchors[0, 1])
    for _, lo, hi, where in model.passes():
        count[lo:hi] += 1.0 if where is None else (anchors if where else ~anchors).float()
    assert torch.equal(count, torch.ones_like(count))
    assert [p[3] for p in model.passes()] == [True, False, True, False, None]


def test_bad_context_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="slices"):
        build("klt-cx8", **ARGS, slices=[9, 3])
    with pytest.raises(ValueError, match="slices"):
        build("klt-cx8", **ARGS, slices=[0, 3])
    with pytest.raises(ValueError, match="checkerboard"):
        build("klt-cx8", **ARGS, slices=[3], checkerboard=3)


def test_training_path_is_causal(image: np.ndarray) -> None:
    # Changing a latent may only move the Gaussians of symbols coded after it: the
    # non-anchors of its own slice (if it is an anchor) and the later slices.
    model = _context(_hyper(image), random=True)
    y = torch.randn(1, model.M, 6, 6) * 3
    means, logs = torch.zeros_like(y), torch.zeros_like(y)
    base_m, base_l, _ = model.latent_params(y, means, logs)
    anchors = anchor_mask(6, 6)
    for c, i, j in [(0, 2, 2), (4, 2, 3), (10, 3, 3)]:
        y2 = y.clone()
        y2[0, c, i, j] += 5.0
        m2, l2 = model.latent_params(y2, means, logs)[:2]
        changed = ((m2 - base_m).abs() + (l2 - base_l).abs())[0] > 0
        k = next(k for k in range(3) if model.bounds[k] <= c < model.bounds[k + 1])
        lo, hi = model.bounds[k], model.bounds[k + 1]
        assert not changed[:lo].any()  # earlier slices never depend on it
        if k < model.n_checkerboard and bool(anchors[i, j]):
            assert not changed[lo:hi][:, anchors].any()  # nor other anchors of its slice
            assert changed[lo:hi][:, ~anchors].any()  # its non-anchor neighbours do
        else:
            assert not changed[lo:hi].any()
        assert hi == model.M or changed[hi:].any()  # later slices see it


def test_fresh_context_decodes_like_its_hyperprior(image: np.ndarray, tmp_path: Path) -> None:
    # Zero-initialised corrections: same Gaussians, so the same latents and pixels
    # (the stream itself is ordered by passes, so the bytes differ).
    hyper = _hyper(image)
    save_weights(hyper, name="hp", quality=1, weights_dir=tmp_path / "hp")
    save_weights(_context(hyper, random=False), name="cx", quality=1, weights_dir=tmp_path / "cx")
    tile = np.ascontiguousarray(image[:256, :200])
    a = NeuralCodec(1, weights_dir=tmp_path / "hp")
    b = NeuralCodec(1, weights_dir=tmp_path / "cx")
    blob_a, blob_b = a.encode(tile), b.encode(tile)
    assert np.array_equal(a.decode(blob_a), b.decode(blob_b))
    assert abs(len(blob_a) - len(blob_b)) < 0.01 * len(blob_a)


def test_coded_size_matches_training_estimate(image: np.ndarray, tmp_path: Path) -> None:
    # The exact coder and the float training path must walk the same passes with the
    # same inputs: otherwise training optimises a rate the bitstream does not have.
    model = _context(_hyper(image), random=True)
    save_weights(model, name="cx", quality=1, weights_dir=tmp_path)
    codec = NeuralCodec(1, weights_dir=tmp_path)
    tile = np.ascontiguousarray(image[:256, :256])
    x = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255.0
    model.eval()
    with torch.no_grad():
        estimate = float(-torch.log2(model(x)["likelihoods"]).sum()) / 8
    blob = codec.encode(tile)
    assert abs(len(blob) - estimate) < 0.02 * estimate + 64
    # And the random context really moves the rate (else this test could not fail).
    hyper = NeuralCodec(1, weights_dir=_save_hyper(image, tmp_path / "hp"))
    assert abs(len(hyper.encode(tile)) - len(blob)) > 0.02 * len(blob)
    out = codec.decode(blob)
    assert out.shape == tile.shape and np.abs(out.astype(int) - tile).mean() < 20


def _save_hyper(image: np.ndarray, d: Path) -> Path:
    save_weights(_hyper(image), name="hp", quality=1, weights_dir=d)
    return d


def test_rate_only_fine_tuning_trains_the_entropy_model_alone() -> None:
    from tileserver.train import load_config, rd_loss

    src = Path(__file__).resolve().parents[2] / "tileserver" / "codecs" / "configs"
    cfg = load_config(src / "klt-cx-s140.toml")
    assert cfg.freeze == ["g_a.", "inverse.", "g_s."] and cfg.architecture == "klt-cx8"
    model = build("klt-cx8", **ARGS, **CTX)
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(tuple(cfg.freeze)))
    model.train()
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    assert out["x_hat"] is None  # nothing in the synthesis can learn
    loss, parts = rd_loss(cfg, x, out)
    assert set(parts) == {"bpp"} and float(loss.detach()) == pytest.approx(parts["bpp"])
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    assert any(n.startswith("ctx_") for n in grads) and any(n.startswith("h_s") for n in grads)
    assert not any(n.startswith(tuple(cfg.freeze)) for n in grads)
    model.eval()
    with torch.no_grad():
        assert model(x)["x_hat"] is not None  # evaluation still reconstructs


def test_export_refuses_context_weights_outside_the_exact_range() -> None:
    model = build("klt-cx8", **ARGS, **CTX)
    assert isinstance(model, KLTContext)
    model.snap_synthesis_()
    with torch.no_grad():
        model.ctx_in[2].weight[0, 0, 0, 0] = 100.0  # 9 * 9 terms leave room for |w| < 32 only
    with pytest.raises(ValueError, match=r"\(8, 9, 3, 3\) weight exceeds the exact-decoding range"):
        model.snap_synthesis_()


def test_numpy_and_torch_index_and_grid_arithmetic_agree() -> None:
    # The coder does its book-keeping in numpy, training and the hyperprior coder in torch:
    # the two must give the same scale indexes and grid values, ties and extremes included.
    from tileserver.codecs.models.context import grid_residual
    from tileserver.codecs.models.klt import SCALE_LOG_MIN, SCALE_LOG_STEP, scale_indexes

    rng = np.random.default_rng(0)
    logs = np.concatenate(
        [rng.uniform(-6, 9, 5000), SCALE_LOG_MIN + SCALE_LOG_STEP * np.arange(-3, 62), [np.nextafter(SCALE_LOG_MIN, 0)]]
    )
    assert np.array_equal(scale_indexes(logs), scale_indexes(torch.from_numpy(logs)).numpy())
    ties = (np.arange(-4000, 4000) + 0.5) / 1024  # exactly half-way between grid points
    y = np.concatenate([rng.normal(0, 300, 5000), ties, [5000.0, -5000.0]])
    mu = np.concatenate([rng.normal(0, 3, 5000) * 2.0**-20, np.zeros(len(ties) + 2)])
    got = grid_residual(y, mu)
    assert np.array_equal(got, grid_residual(torch.from_numpy(y), torch.from_numpy(mu)).numpy())
    assert np.all(np.abs(got) < 1024)


def test_compiled_book_keeping_equals_the_numpy_arithmetic() -> None:
    # The coder's per-pass kernels must compute exactly what scale_indexes and grid_residual
    # compute (encoder and decoder both use them, but older streams were coded with numpy).
    from tileserver.codecs.models.context import grid_residual, pass_gaussians, pass_update
    from tileserver.codecs.models.klt import SCALE_LOG_MIN, SCALE_LOG_STEP, scale_indexes

    rng = np.random.default_rng(1)
    m, p, lo, c = 6, 40, 2, 3
    means = np.round(rng.normal(0, 5, (m, p)) * 2**10) / 2**10
    logs = rng.uniform(-6, 9, (m, p))
    logs[lo, :10] = SCALE_LOG_MIN + SCALE_LOG_STEP * np.arange(-2, 8)  # exactly on table entries
    d_mean = np.round(rng.normal(0, 1, (c, p)) * 2**10) / 2**10
    d_log = rng.normal(0, 0.5, (c, p))
    d_log[0, :10] = 0.0
    pos = np.flatnonzero(rng.random(p) < 0.5)
    mu, indexes = np.empty((c, len(pos))), np.empty((c, len(pos)), dtype=np.int32)
    pass_gaussians(means, logs, d_mean, d_log, lo, pos, mu, indexes)
    assert np.array_equal(mu, means[lo : lo + c, pos] + d_mean[:, pos])
    assert np.array_equal(indexes, scale_indexes(logs[lo : lo + c, pos] + d_log[:, pos]))
    symbols = rng.integers(-40, 40, (c, len(pos))).astype(np.int32)
    mu[0, :4] = means[lo, pos[:4]] + 0.5 / 2**10  # residuals exactly half-way between grid points
    y_hat, residual = np.full((m, p), np.nan), np.zeros((m, p))
    pass_update(symbols.reshape(-1), mu, means, lo, pos, y_hat, residual)
    yk = symbols + mu
    assert np.array_equal(y_hat[lo : lo + c, pos], yk)
    assert np.array_equal(residual[lo : lo + c, pos], grid_residual(yk, means[lo : lo + c, pos]))
    untouched = np.ones((m, p), dtype=bool)
    untouched[lo : lo + c, pos] = False
    assert np.isnan(y_hat[untouched]).all() and not residual[untouched].any()
