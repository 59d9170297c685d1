"""Issue 5's decode-parity measures: JPEG 2000's decode time read off at another codec's SSIM
(``bench/decode.py``) and a model cut to its first K latent channels (``bench/symbols.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.bench_modules import bench_module


def test_jpeg2000_time_is_read_between_the_qualities_that_bracket_an_ssim() -> None:
    decode = bench_module("decode")
    points = [(0.96, 4.0), (0.94, 3.0), (0.98, 6.0)]  # any order
    assert decode.at_ssim(points, 0.95) == pytest.approx(3.5)
    assert decode.at_ssim(points, 0.98) == pytest.approx(6.0)
    # No extrapolation: a codec better or worse than the whole sweep has no equal-quality time.
    assert decode.at_ssim(points, 0.99) is None
    assert decode.at_ssim(points, 0.93) is None
    assert decode.at_ssim([], 0.95) is None


def _random_model() -> Any:
    from tileserver.codecs.models import build

    torch.manual_seed(0)
    model = build("klt-cx8", M=24, N=8, widths=[8, 8], step=0.2, H=8, slices=[4, 12], checkerboard=2, ctx_width=8)
    with torch.no_grad():
        for p in model.parameters():  # the layers that start at zero would hide a wrong cut
            p.normal_(0.0, 0.1)
    return model.eval()


def _payload(model: Any) -> dict[str, Any]:
    return {"architecture": "klt-cx8", "args": dict(model.config), "state_dict": model.state_dict()}


@pytest.mark.parametrize("k", [16, 12])  # inside the last slice; at a slice boundary (the slice goes)
def test_a_cut_model_keeps_every_layer_of_its_first_k_channels(k: int) -> None:
    symbols = bench_module("symbols")
    full = _random_model()
    cut = symbols.truncate(_payload(full), k)
    assert cut.M == k and cut.bounds == [b for b in full.bounds if b < k] + [k]
    x = torch.rand(2, 3, 32, 32)
    y = torch.randn(2, 24, 4, 4)
    y_zeroed = torch.cat([y[:, :k], torch.zeros(2, 24 - k, 4, 4)], dim=1)
    with torch.no_grad():
        # analysis: the KLT's first k outputs
        assert torch.equal(cut.g_a.klt(x), full.g_a.klt(x)[:, :k])
        # hyper-synthesis: means and log-scales of the first k channels (output c * 4 + s is channel c)
        z = torch.randn(2, 8, 1, 1)
        m_cut, s_cut = cut.hyper_synthesize(z, (4, 4))
        m_full, s_full = full.hyper_synthesize(z, (4, 4))
        torch.testing.assert_close(m_cut, m_full[:, :k], rtol=0, atol=1e-6)
        torch.testing.assert_close(s_cut, s_full[:, :k], rtol=0, atol=1e-6)
        # each kept slice's context corrections, from the same residuals decoded before it
        for s in range(len(cut.bounds) - 1):
            lo, hi = cut.bounds[s], cut.bounds[s + 1]
            own = y[:, lo:hi] if s < cut.n_checkerboard else None
            args = (s, y[:, :lo], own, cut._float_conv, cut._float_act(s))
            d_mean, d_log = cut._correction(*args)
            f_mean, f_log = full._correction(s, y[:, :lo], own, full._float_conv, full._float_act(s))
            torch.testing.assert_close(d_mean, f_mean[:, : hi - lo], rtol=0, atol=1e-6)
            torch.testing.assert_close(d_log, f_log[:, : hi - lo], rtol=0, atol=1e-6)
        # synthesis: the cut channels read as zero
        torch.testing.assert_close(cut.synthesize(y[:, :k]), full.synthesize(y_zeroed), rtol=0, atol=1e-5)


def test_only_context_models_within_their_channels_can_be_cut() -> None:
    symbols = bench_module("symbols")
    payload = _payload(_random_model())
    with pytest.raises(ValueError, match="k must be"):
        symbols.truncate(payload, 25)
    with pytest.raises(ValueError, match="only klt-cx8"):
        symbols.truncate({**payload, "architecture": "klt-hp8"}, 12)
