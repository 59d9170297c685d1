"""The KLT-initialised architectures: the closed-form start, exact synthesis, scale indexes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .conftest import as_batch

torch = pytest.importorskip("torch")

from tileserver.codecs.models import build  # noqa: E402
from tileserver.codecs.models.klt import KLTPS, SCALE_LOG_TABLE, KLTHyper, fit_klt, image_blocks  # noqa: E402

pytestmark = pytest.mark.shared_data


def test_complete_klt_start_reconstructs_exactly(crops: np.ndarray) -> None:
    mean, basis, var = fit_klt(image_blocks(crops))
    assert np.all(np.diff(var) <= 1e-12)  # falling variance
    model = build("klt-ps8", M=192, N=8, widths=[8, 8], step=0.1)
    assert isinstance(model, KLTPS)
    model.init_klt(mean, basis)
    with torch.no_grad():
        x = as_batch(crops)
        out = model.synthesize(model.g_a(x))
    assert float((out - x).abs().max()) < 1e-4


def test_truncated_klt_start_is_the_linear_optimum(crops: np.ndarray) -> None:
    # With M < 192 the start must equal projecting each 8x8 block on the top M
    # principal directions; a wrong reshape anywhere would not.
    blocks = image_blocks(crops)
    mean, basis, _ = fit_klt(blocks)
    m = 24
    proj = (blocks - mean) @ basis[:, :m] @ basis[:, :m].T + mean
    model = build("klt-ps8", M=m, N=8, widths=[8, 8], step=0.1)
    assert isinstance(model, KLTPS)
    model.init_klt(mean, basis)
    with torch.no_grad():
        out = model.synthesize(model.g_a(as_batch(crops))).permute(0, 2, 3, 1).double().numpy()
    got = image_blocks(out * 255.0)  # back to blocks, same ordering
    assert np.allclose(got, proj, atol=1e-4)
    err_model = float(np.mean((out - as_batch(crops).permute(0, 2, 3, 1).numpy()) ** 2))
    err_linear = float(np.mean((proj - blocks) ** 2))
    assert err_model == pytest.approx(err_linear, rel=1e-3)
    assert err_linear > 1e-5  # the truncation really loses something


@pytest.mark.parametrize("arch", ["klt-ps8", "klt-hp8"])
def test_exact_synthesis_follows_the_float_synthesis(arch: str, crops: np.ndarray) -> None:
    torch.manual_seed(0)
    model = build(arch, M=16, N=8, widths=[8, 8], step=0.1)
    mean, basis, _ = fit_klt(image_blocks(crops))
    model.init_klt(mean, basis)
    with torch.no_grad():
        for stage in model.g_s:
            torch.nn.init.normal_(stage.conv.weight, std=0.02)
        y = torch.round(model.g_a(as_batch(crops)))
        ref = torch.round(model.synthesize(y).clamp(0, 1) * 255.0)
    exact = model.exact_synthesizer(torch.device("cpu"))(y.double()).double()
    assert float((exact - ref).abs().max()) <= 1.0
    assert len(torch.unique(exact)) > 50


def test_exact_scale_indexes_agree_with_compressai(crops: np.ndarray) -> None:
    torch.manual_seed(0)
    model = build("klt-hp8", M=16, N=8, widths=[8, 8], step=0.1, H=8)
    assert isinstance(model, KLTHyper)
    with torch.no_grad():
        torch.nn.init.normal_(model.h_s2.weight, std=0.5)
        torch.nn.init.normal_(model.h_s2.bias, std=1.5)
        model.update_entropy_models()
        z_hat = torch.round(torch.randn(2, 8, 3, 3) * 3)
        _, log_scales = model.hyper_synthesize(z_hat, (12, 12))
        theirs = model.gaussian_conditional.build_indexes(torch.exp(log_scales))
    ours, _ = model.exact_hyper(torch.device("cpu"))(z_hat.double())
    ours = ours[:, :, :12, :12]
    # The exact path and float32 exp() may differ only at a table boundary.
    assert float((ours == theirs).float().mean()) > 0.99
    assert len(torch.unique(ours)) > 10
    assert len(SCALE_LOG_TABLE) == len(model.gaussian_conditional.scale_table)


def test_config_rejects_unknown_distortion(tmp_path: Path) -> None:
    from tileserver.errors import ConfigError
    from tileserver.train import load_config

    src = Path(__file__).resolve().parents[2] / "tileserver" / "codecs" / "configs"
    text = next(iter(sorted(src.glob("klt-hp-s*.toml")))).read_text().replace('"ssim"', '"psnr"')
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match="distortion"):
        load_config(bad)


@pytest.mark.parametrize(
    "aug",
    [
        "{ p = 1.5, quality = [70, 95] }",
        "{ p = 0.5, quality = [95, 70] }",
        "{ p = 0.5 }",
        "0.5",
        '{ p = "x", quality = [70, 95] }',
        "{ p = true, quality = [70, 95] }",
        "{ p = 0.5, quality = 70 }",
    ],
)
def test_config_rejects_a_bad_jpeg_augment(tmp_path: Path, aug: str) -> None:
    from tileserver.errors import ConfigError
    from tileserver.train import load_config

    src = Path(__file__).resolve().parents[2] / "tileserver" / "codecs" / "configs"
    text = (src / "klt-cx-s140-jq.toml").read_text()
    assert "jpeg_augment = { p = 0.5, quality = [70, 95] }" in text
    assert load_config(src / "klt-cx-s140-jq.toml").jpeg_augment == {"p": 0.5, "quality": [70, 95]}
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("{ p = 0.5, quality = [70, 95] }", aug))
    with pytest.raises(ConfigError, match="jpeg_augment"):
        load_config(bad)


def test_jpeg_augment_codes_that_share_of_crops_as_a_scanner_would(image: np.ndarray) -> None:
    import imagecodecs

    from tileserver.train import CropSampler

    plain = CropSampler([image], 64, seed=5).batch(40)
    never = CropSampler([image], 64, seed=5, jpeg={"p": 0.0, "quality": [70, 95]}).batch(40)
    assert np.array_equal(plain, never)
    coded = CropSampler([image], 64, seed=5, jpeg={"p": 0.5, "quality": [70, 70]}).batch(40)
    # The same crops, each as it was or through JPEG 4:2:0 at quality 70.
    jpeg = [imagecodecs.jpeg_decode(imagecodecs.jpeg_encode(c, level=70, subsampling=(2, 2))) for c in plain]
    n_coded = sum(np.array_equal(c, j) and not np.array_equal(c, p) for c, j, p in zip(coded, jpeg, plain, strict=True))
    assert 8 <= n_coded <= 32
    assert n_coded + sum(np.array_equal(c, p) for c, p in zip(coded, plain, strict=True)) == 40


def test_ssim_loss_is_lambda_times_one_minus_ssim_plus_rate() -> None:
    from pytorch_msssim import ssim

    from tileserver.train import load_config, rd_loss

    src = Path(__file__).resolve().parents[2] / "tileserver" / "codecs" / "configs"
    cfg = load_config(next(iter(sorted(src.glob("klt-hp-s*.toml")))))
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    x_hat = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    lik = torch.full((100,), 0.5)
    loss, parts = rd_loss(cfg, x, {"x_hat": x_hat, "likelihoods": lik})
    s = float(ssim(x_hat, x, data_range=1.0))
    bpp = 100 / (2 * 32 * 32)
    assert parts["ssim"] == pytest.approx(s, rel=1e-5)
    assert float(loss) == pytest.approx(cfg.lmbda * (1 - s) + bpp, rel=1e-5)


def test_export_refuses_weights_outside_the_exact_range() -> None:
    model = build("klt-hp8", M=8, N=8, widths=[8, 8], step=0.1, H=8)
    with torch.no_grad():
        model.h_s2.weight[0, 0, 0, 0] = 3.0  # fine: a sum of 48 terms has room for it
    model.snap_synthesis_()
    with torch.no_grad():
        model.h_s2.weight[0, 0, 0, 0] = 600.0
    with pytest.raises(ValueError, match=r"\(64, 48, 1, 1\) weight exceeds the exact-decoding range"):
        model.snap_synthesis_()
