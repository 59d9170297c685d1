"""``bench/compress.py``'s measuring helpers: how a set of tiles' PSNR is averaged, where bpp is read
off a curve, and which tiles the held-out subsets take (the benchmark itself runs outside the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.bench_modules import bench_module


def test_psnr_of_a_set_comes_from_its_mean_squared_error() -> None:
    """A tile recoded almost exactly (JPEG meeting its own quantisation: 148 dB, the cap) must not lift
    the set's PSNR by tens of decibels, as a mean of per-tile PSNRs does."""
    compress = bench_module("compress")
    assert compress.psnr_of_mean_mse(np.array([30.0, 30.0])) == pytest.approx(30.0)
    # MSEs 65.0 and ~0: the mean MSE halves, +3.01 dB, where the mean of the PSNRs says 89 dB.
    assert compress.psnr_of_mean_mse(np.array([30.0, 148.0])) == pytest.approx(30.0 + 10 * np.log10(2), abs=1e-6)
    assert compress.psnr_of_mean_mse(np.array([20.0, 40.0])) == pytest.approx(22.967, abs=1e-3)


def test_ssim_is_pytorch_msssims() -> None:
    """The benchmarks' numpy SSIM computes design §8's definition (pytorch_msssim, float64)."""
    import torch
    from pytorch_msssim import ssim

    common = bench_module("_common")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (3, 64, 48, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    b[2] = a[2]
    x, y = (torch.from_numpy(t).permute(0, 3, 1, 2).double() for t in (a, b))
    want = ssim(x, y, data_range=255, size_average=False).numpy()
    got = common.ssim_batch(a, b)
    assert got == pytest.approx(want, abs=1e-12)
    assert got[2] == pytest.approx(1.0) and got[0] < 0.99


def test_bpp_at_a_quality_is_read_between_neighbouring_points() -> None:
    compress = bench_module("compress")
    curve = [{"bpp": 1.0, "ssim": 0.94}, {"bpp": 4.0, "ssim": 0.96}, {"bpp": 0.5, "ssim": 0.90}]
    assert compress.interp_bpp(curve, 0.95) == pytest.approx(2.0)  # log-bpp linear: the geometric mean
    assert compress.interp_bpp(curve, 0.99) is None  # never extrapolated


def test_load_tiles_can_take_only_named_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``held_out_all`` takes every tissue tile of the held-out files; the main set at most ``per_patch``."""
    tiles_mod = bench_module("_tiles")
    patches = tmp_path / "patches" / "tissue"
    patches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):  # H&E-like pink, textured: tissue by any measure
        img = np.clip(rng.normal((200, 120, 170), 25, (512, 512, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(patches / name)
    monkeypatch.setattr(tiles_mod, "DATA", tmp_path)
    assert len(tiles_mod.load_tiles(per_patch=2)) == 4
    every = tiles_mod.load_tiles(per_patch=10**6, only={"a.png"})
    assert [(t.source, t.x, t.y) for t in every] == [("a.png", x, y) for y in (0, 256) for x in (0, 256)]
    assert tiles_mod.load_tiles(only=set()) == []


def test_held_out_is_what_no_training_config_read() -> None:
    """A tile is held out if its file is an evaluation file, if no config's ``sources`` reads its file
    (the Camelyon slide), or if it lies wholly in the rows a config cut off a file's bottom."""
    compress = bench_module("compress")
    tiles = bench_module("_tiles")
    held = compress.HeldOut(
        sources=frozenset({"patches/tissue/*", "slides/a.svs"}),
        files=frozenset({"patches/tissue/eval.png"}),
        rows=(("slides/a.svs", 512),),
    )

    def tile(rel: str, y: int = 0, height: int = 2000) -> object:
        return tiles.EvalTile("x", Path(rel).name, 0, y, np.zeros((1, 1, 3), np.uint8), "unknown", rel, height)

    assert held(tile("patches/tissue/eval.png"))
    assert not held(tile("patches/tissue/train.png"))
    assert held(tile("slides/never-read"))
    assert not held(tile("slides/a.svs", y=1000))
    assert not held(tile("slides/a.svs", y=1487))  # its top row was trained on
    assert held(tile("slides/a.svs", y=1488))
    assert not compress.HeldOut()(tile("slides/never-read"))  # no configs: nothing known


def test_held_out_follows_the_shipped_configs() -> None:
    """Every shipped config reads the same data; what they leave out is the held-out set."""
    held = bench_module("compress").held_out()
    assert "slides/CMU-1-Small-Region.svs" in {g for g in held.sources}
    assert dict(held.rows) == {"slides/CMU-1-Small-Region.svs": 512}
    assert "patches/tissue/TissueImageAnalytics+tiatoolbox__target_image.png" in held.files


def test_held_out_subsets_split_by_group_and_keep_extras_out_of_the_main_set() -> None:
    compress = bench_module("compress")
    groups = np.array(["slides", "slides", "patches", "patches", "slides", "patches"])
    sourced = np.array(["jpeg", "jpeg", "unknown", "jpeg", "jpeg", "unknown"])
    held = np.array([False, True, False, True, True, True])
    extra = np.array([False, False, False, False, True, True])  # held-out tiles beyond the main set
    s = {k: list(np.flatnonzero(v)) for k, v in compress.subset_masks(groups, sourced, held, extra).items()}
    assert s["all"] == [0, 1, 2, 3]
    assert s["held_out"] == [1, 3] and s["trained_on"] == [0, 2]
    assert s["held_out_all"] == [1, 3, 4, 5]
    assert s["held_out_all_slides"] == [1, 4] and s["held_out_all_patches"] == [3, 5]
    assert s["trained_on_slides"] == [0] and s["trained_on_patches"] == [2]
    assert s["jpeg_sourced"] == [0, 1, 3] and "jpeg2000_sourced" not in s
    # A group with nothing trained on has no within-group comparison.
    none_trained = compress.subset_masks(groups, sourced, groups == "slides", extra)
    assert "held_out_all_slides" not in none_trained and "trained_on_slides" not in none_trained
