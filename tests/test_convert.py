"""``tileserver convert`` / ``info``: real slides in, containers out; bad input; interruption."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import tifffile
from openslide.deepzoom import DeepZoomGenerator

import tileserver
from tileserver import codecs
from tileserver.cli import main as cli_main
from tileserver.convert import ConversionSummary, _downsample2, convert, find_slides, psnr, ssim
from tileserver.errors import ConversionError
from tileserver.slides.compressed import CompressedSlide

from .conftest import CMU, DICOM, FIXTURES, NDPI

pytestmark = pytest.mark.shared_data

SLIDES = {"cmu": CMU, "ndpi": NDPI, "dicom": DICOM}
# fast settings: the matrix checks the plumbing, rate-distortion lives in bench/
FAST = {"jpeg": {"quality": 60}, "jpegxl": {"quality": 60, "effort": 1}, "jpeg2000": {"quality": 35},
        "webp": {"quality": 60, "method": 0}, "avif": {"quality": 40, "speed": 10}}  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cmu_jpeg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ConversionSummary]:
    """The acceptance conversion: CMU, jpeg quality 90, glass dropped."""
    dst = tmp_path_factory.mktemp("acc") / "out.tiff"
    summary = convert(CMU, dst, codec="jpeg", quality=90, glass="drop", progress=False)
    return dst, summary


def _source_rgb(location: tuple[int, int], size: tuple[int, int], src: Path = CMU) -> np.ndarray:
    with tileserver.open_slide(src) as s:
        return np.asarray(s.read_region(location, 0, size).convert("RGB"))


# -- acceptance ---------------------------------------------------------------------------------
def test_openslide_opens_the_result(cmu_jpeg: tuple[Path, ConversionSummary]) -> None:
    dst, _ = cmu_jpeg
    with openslide.OpenSlide(CMU) as src, openslide.OpenSlide(dst) as out:
        assert out.dimensions == src.dimensions == (2220, 2967)
        assert out.level_count >= 4
        for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
            assert float(out.properties[key]) == pytest.approx(float(src.properties[key]), rel=1e-6)


def test_tissue_psnr_at_level_0(cmu_jpeg: tuple[Path, ConversionSummary]) -> None:
    dst, summary = cmu_jpeg
    assert summary.mean_psnr is not None and summary.mean_psnr >= 35
    assert summary.mean_ssim is not None and 0.9 < summary.mean_ssim <= 1
    assert summary.quality_samples == summary.tiles - summary.glass_tiles  # small slide: every tissue tile
    assert summary.ssim_samples == summary.quality_samples
    # measured again, independently, through the public reader
    src_full = _source_rgb((0, 0), (2220, 2967))
    values = []
    with tileserver.open_slide(dst) as s:
        st = s.stored_tiles()
        assert st is not None
        cols, rows = st.grid(0)
        for r in range(rows):
            for c in range(cols):
                if not st.is_glass(0, c, r):
                    tile = st.read_tile(0, c, r)
                    ref = src_full[r * 256 : r * 256 + tile.shape[0], c * 256 : c * 256 + tile.shape[1]]
                    values.append(psnr(tile, ref))
    assert np.mean(values) >= 35
    assert np.mean(values) == pytest.approx(summary.mean_psnr, abs=1e-6)


def test_glass_is_zero_bytes_and_reads_as_glass_colour(cmu_jpeg: tuple[Path, ConversionSummary]) -> None:
    dst, summary = cmu_jpeg
    with tifffile.TiffFile(dst) as tf:
        counts = list(tf.pages[0].databytecounts)  # type: ignore[union-attr]
    zero = [i for i, n in enumerate(counts) if n == 0]
    assert len(zero) == summary.glass_tiles > 0
    assert 0 < summary.tissue_fraction < 1
    with tileserver.open_slide(dst) as s:
        assert isinstance(s, CompressedSlide)
        col, row = zero[0] % 9, zero[0] // 9
        assert s.is_glass(0, col, row)
        region = np.asarray(s.read_region((col * 256, row * 256), 0, (64, 64)))
        assert (region[:, :, :3] == s.glass_color).all() and (region[:, :, 3] == 255).all()
        assert s.glass_color == summary.glass_color
        assert min(s.glass_color) > 200  # brightfield glass is light
        assert s.properties["tileserver.glass-color"] == "#{:02x}{:02x}{:02x}".format(*s.glass_color)


def test_openslide_and_our_reader_agree_on_tissue(cmu_jpeg: tuple[Path, ConversionSummary]) -> None:
    dst, _ = cmu_jpeg
    with openslide.OpenSlide(dst) as osr, tileserver.open_slide(dst) as ours:
        for level in range(osr.level_count):
            size = osr.level_dimensions[level]
            a = np.asarray(osr.read_region((0, 0), level, size))
            b = np.asarray(ours.read_region((0, 0), level, size))
            opaque = a[:, :, 3] == 255
            assert opaque.mean() > 0.5
            np.testing.assert_array_equal(a[opaque], b[opaque])  # same decoder colours, pixel for pixel


def test_lower_levels_come_from_source_pixels(cmu_jpeg: tuple[Path, ConversionSummary]) -> None:
    dst, _ = cmu_jpeg
    src = _source_rgb((0, 1024), (1024, 512))  # level-0 rows 1024.. (tissue)
    expected = _downsample2(src)
    with tileserver.open_slide(dst) as s:
        got = np.asarray(s.read_region((0, 1024), 1, (512, 256)).convert("RGB"))
    assert psnr(got, expected) > 33


def test_deepzoom_over_converted_slide(cmu_jpeg: tuple[Path, ConversionSummary]) -> None:
    dst, _ = cmu_jpeg
    with tileserver.open_slide(dst) as ours, openslide.OpenSlide(dst) as osr:
        dz = DeepZoomGenerator(ours, tile_size=254, overlap=1)
        dz_os = DeepZoomGenerator(osr, tile_size=254, overlap=1)
        assert dz.level_count == math.ceil(math.log2(2967)) + 1
        assert dz.level_tiles == dz_os.level_tiles
        level = dz.level_count - 1
        tile = np.asarray(dz.get_tile(level, (4, 5)))  # tissue in the middle of the slide
        ref = np.asarray(dz_os.get_tile(level, (4, 5)))
        np.testing.assert_array_equal(tile, ref)
        assert dz.get_tile(0, (0, 0)).size == (1, 1)


def test_associated_images_and_properties_carried_over(cmu_jpeg: tuple[Path, ConversionSummary]) -> None:
    dst, summary = cmu_jpeg
    with tileserver.open_slide(CMU) as src, tileserver.open_slide(dst) as out:
        assert sorted(out.associated_images) == ["label", "macro", "thumbnail"]
        for name, img in src.associated_images.items():
            assert out.associated_images[name].size == img.size
        assert out.properties["aperio.AppMag"] == src.properties["aperio.AppMag"]
        assert out.properties["tileserver.codec"] == "jpeg"
        assert out.properties["tileserver.quality"] == "90"
        assert out.properties["tileserver.glass"] == "drop"
        assert int(out.properties["tileserver.source-bytes"]) == CMU.stat().st_size == summary.source_bytes
        assert out.properties["tileserver.source-name"] == CMU.name
    assert summary.output_bytes == dst.stat().st_size
    assert summary.dropped_tiles >= summary.glass_tiles


def test_summary_text_and_dict(cmu_jpeg: tuple[Path, ConversionSummary]) -> None:
    _, summary = cmu_jpeg
    text = summary.format()
    for word in ("ratio", "tissue", "PSNR", "SSIM", "dropped"):
        assert word in text
    d = summary.to_dict()
    assert json.loads(json.dumps(d))["ratio"] == pytest.approx(summary.ratio)


# -- every classic codec on every shared slide ----------------------------------------------------
def _matrix() -> list[Any]:
    out = []
    for slide in SLIDES:
        for codec in FAST:
            slow = slide == "ndpi" or (codec in ("jpegxl", "avif") and slide != "dicom")
            out.append(pytest.param(slide, codec, marks=[pytest.mark.slow] if slow else [], id=f"{slide}-{codec}"))
    return out


@pytest.mark.parametrize(("slide", "codec"), _matrix())
def test_codec_round_trip(tmp_path: Path, slide: str, codec: str) -> None:
    src = SLIDES[slide]
    dst = tmp_path / f"{slide}.tiff"
    summary = convert(src, dst, codec=codecs.get(codec, **FAST[codec]), glass="drop", progress=False,
                      quality_samples=4)  # fmt: skip
    with tileserver.open_slide(src) as s, tileserver.open_slide(dst) as out:
        assert out.codec == codec
        assert out.dimensions == s.dimensions
        assert out.mpp == pytest.approx(s.mpp)
        st = out.stored_tiles()
        assert st is not None
        cols, rows = st.grid(0)
        tissue = [(c, r) for r in range(rows) for c in range(cols) if not st.is_glass(0, c, r)]
        assert tissue
        c, r = tissue[len(tissue) // 2]
        loc, size = (c * 256, r * 256), out.stored_tiles().read_tile(0, c, r).shape[1::-1]  # type: ignore[union-attr]
        got = np.asarray(out.read_region(loc, 0, size))
        ref = np.asarray(s.read_region(loc, 0, size).convert("RGB"))
    assert (got[:, :, 3] == 255).all()
    assert psnr(got[:, :, :3], ref) > 25
    assert summary.output_bytes > 0 and summary.levels == len(out.level_dimensions)


@pytest.mark.parametrize("glass", ["keep", "fill"])
def test_keep_and_fill_store_every_tile(tmp_path: Path, glass: str) -> None:
    dst = tmp_path / "d.tiff"
    summary = convert(DICOM, dst, codec="jpeg", quality=80, glass=glass, progress=False)
    assert summary.dropped_tiles == 0
    with tifffile.TiffFile(dst) as tf:
        assert all(n > 0 for p in tf.pages[: summary.levels] for n in p.databytecounts)  # type: ignore[union-attr]
    with tileserver.open_slide(dst) as s:
        assert s.properties["tileserver.glass"] == glass
        st = s.stored_tiles()
        assert st is not None
        cols, rows = st.grid(0)
        assert not any(st.is_glass(0, c, r) for c in range(cols) for r in range(rows))


def test_fill_codes_glass_as_the_glass_colour(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"codec": "jpeg", "quality": 80, "progress": False, "quality_samples": 0}
    drop = convert(CMU, tmp_path / "drop.tiff", glass="drop", **kw)
    fill = convert(CMU, tmp_path / "fill.tiff", glass="fill", **kw)
    assert fill.mean_psnr is None and fill.quality_samples == 0
    assert fill.dropped_tiles == 0 and drop.dropped_tiles > 0
    with tileserver.open_slide(tmp_path / "drop.tiff") as d, tileserver.open_slide(tmp_path / "fill.tiff") as f:
        dst, fst = d.stored_tiles(), f.stored_tiles()
        assert dst is not None and fst is not None
        glass = [(c, r) for r in range(12) for c in range(9) if dst.is_glass(0, c, r)]
        c, r = glass[0]
        tile = fst.read_tile(0, c, r)
        assert np.abs(tile.astype(int) - np.array(fst.glass_color)).max() <= 3
        # same pyramid geometry and tissue pixels either way
        assert d.level_dimensions == f.level_dimensions


# -- CLI, bad input, overwrite, interruption ---------------------------------------------------------
def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli_main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def _garbled_cmu(folder: Path) -> Path:
    """A CMU copy whose structure is intact (OpenSlide detects it) but whose level-0 tile data is zeroed."""
    bad = folder / "garbled.svs"
    data = bytearray(CMU.read_bytes())
    data[200_000:600_000] = bytes(400_000)
    bad.write_bytes(bytes(data))
    return bad


def _truncated_cmu(tmp_path: Path) -> Path:
    bad = tmp_path / "truncated.svs"
    data = CMU.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


@pytest.mark.parametrize("kind", ["broken", "truncated", "garbled", "text", "missing", "empty-dir"])
def test_bad_source_is_one_line_error_and_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if kind == "broken":
        src = FIXTURES / "broken.svs"
    elif kind == "truncated":
        src = _truncated_cmu(tmp_path)
    elif kind == "garbled":
        src = _garbled_cmu(tmp_path)
    elif kind == "text":
        src = tmp_path / "notes.txt"
        src.write_text("this is not a slide\n" * 100)
    elif kind == "missing":
        src = tmp_path / "nope.svs"
    else:
        src = tmp_path / "empty"
        src.mkdir()
    dst = out_dir / "x.tiff"
    rc, _, err = _run_cli(["convert", str(src), str(dst), "--no-progress"], capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(src) in lines[0] or src.name in lines[0]
    assert not dst.exists()
    assert list(out_dir.iterdir()) == []  # no temporary files either


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "x.tiff"
    dst.write_bytes(b"precious")
    rc, _, err = _run_cli(["convert", str(DICOM), str(dst), "--no-progress"], capsys)
    assert rc != 0 and "--force" in err and str(dst) in err
    assert dst.read_bytes() == b"precious"
    rc, out, _ = _run_cli(["convert", str(DICOM), str(dst), "--no-progress", "--force", "--quality", "70"], capsys)
    assert rc == 0 and "ratio" in out
    assert tileserver.open_slide(dst).codec == "jpeg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tiff"]


def test_unknown_codec_and_bad_quality(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run_cli(["convert", str(DICOM), str(tmp_path / "a.tiff"), "--codec", "gif"], capsys)
    assert rc != 0 and "gif" in err
    rc, _, err = _run_cli(["convert", str(DICOM), str(tmp_path / "a.tiff"), "--quality", "500"], capsys)
    assert rc != 0 and "quality" in err
    assert list(tmp_path.iterdir()) == []


def test_convert_onto_itself_is_refused(tmp_path: Path) -> None:
    dst = tmp_path / "a.tiff"
    convert(DICOM, dst, progress=False)
    with pytest.raises(ConversionError, match="itself"):
        convert(dst, dst, force=True, progress=False)
    assert tileserver.open_slide(dst).codec == "jpeg"


def test_converting_our_own_file_works(tmp_path: Path) -> None:
    first = tmp_path / "a.tiff"
    convert(DICOM, first, codec="jpeg", quality=95, progress=False)
    second = convert(first, tmp_path / "b.tiff", codec="webp", quality=80, progress=False)
    assert second.width == 1152 and second.height == 700
    assert tileserver.open_slide(tmp_path / "b.tiff").codec == "webp"


def _start_convert(src: Path, dst: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # avif at a slow setting: long enough to interrupt halfway through
    code = (
        "import sys; from tileserver import codecs; from tileserver.convert import convert; "
        "convert(sys.argv[1], sys.argv[2], codec=codecs.get('avif', quality=90, speed=3), glass='keep', "
        "progress=False, workers=1)"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(src), str(dst)], env=env, stderr=subprocess.PIPE)


def _wait_for_spool(proc: subprocess.Popen[bytes], folder: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        spools = [p for p in folder.iterdir() if p.name.endswith(".spool")]
        if spools and spools[0].stat().st_size > 0:
            return
        if proc.poll() is not None:
            pytest.fail(f"conversion ended early: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("conversion never started writing")


@pytest.mark.slow
def test_killed_conversion_leaves_no_file_at_dst(tmp_path: Path) -> None:
    dst = tmp_path / "out.tiff"
    with _start_convert(CMU, dst) as proc:
        _wait_for_spool(proc, tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not dst.exists()
    leftovers = list(tmp_path.iterdir())
    assert leftovers and all(p.name.startswith(".out.tiff.partial-") for p in leftovers)
    # the next run cleans up after the dead one
    convert(DICOM, dst, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tiff"]


@pytest.mark.slow
def test_sigterm_cleans_up_and_exits(tmp_path: Path) -> None:
    dst = tmp_path / "out.tiff"
    with _start_convert(CMU, dst) as proc:
        _wait_for_spool(proc, tmp_path)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc != 0
    assert list(tmp_path.iterdir()) == []


def test_convert_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    (src / "lab1" / "case7").mkdir(parents=True)
    shutil.copytree(DICOM, src / "lab1" / "case7" / "dicom-slide")
    shutil.copy(FIXTURES / "small.svs", src / "tiny.svs")
    (src / "notes.txt").write_text("not a slide")
    _garbled_cmu(src / "lab1")  # looks like an Aperio slide, fails halfway
    _truncated_cmu(src / "lab1")  # not recognised as a slide at all: skipped
    found = [p.relative_to(src) for p in find_slides(src)]
    assert found == [Path("tiny.svs"), Path("lab1/garbled.svs"), Path("lab1/case7/dicom-slide")]
    dst = tmp_path / "out"
    rc, out, err = _run_cli(["convert", str(src), str(dst), "--no-progress", "--quality", "70"], capsys)
    made = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    assert made == ["lab1", "lab1/case7", "lab1/case7/dicom-slide.tiff", "tiny.tiff"]  # no partial files
    assert "2 slides converted, 1 failed" in out
    assert rc != 0  # one slide failed, the others were still converted
    assert err.count("\n") == 1 and "garbled.svs" in err
    with tileserver.open_slide(dst / "tiny.tiff") as s, tileserver.open_slide(FIXTURES / "small.svs") as ref:
        assert s.dimensions == ref.dimensions


def test_info_command(cmu_jpeg: tuple[Path, ConversionSummary], capsys: pytest.CaptureFixture[str]) -> None:
    dst, summary = cmu_jpeg
    rc, out, _ = _run_cli(["info", str(dst), "--json"], capsys)
    assert rc == 0
    info = json.loads(out)
    assert info["format"] == "tileserver" and info["codec"] == "jpeg"
    assert info["dimensions"] == [2220, 2967] and info["level_count"] >= 4
    assert info["mpp"] == pytest.approx([0.499, 0.499])
    assert info["file_bytes"] == dst.stat().st_size
    assert info["glass_fraction"] == pytest.approx(summary.glass_tiles / summary.tiles)
    rc, out, _ = _run_cli(["info", str(DICOM), "--json"], capsys)
    info = json.loads(out)
    assert info["format"] == "dicom" and info["codec"] is None and info["glass_fraction"] is None
    assert info["file_bytes"] == sum(p.stat().st_size for p in DICOM.iterdir())
    rc, out, _ = _run_cli(["info", str(CMU)], capsys)
    assert rc == 0 and "2220 x 2967" in out
    rc, _, err = _run_cli(["info", str(FIXTURES / "nope.svs")], capsys)
    assert rc != 0 and "nope.svs" in err


# -- quality measures -------------------------------------------------------------------------------
def test_ssim_matches_pytorch_msssim() -> None:
    torch = pytest.importorskip("torch")
    from pytorch_msssim import ssim as torch_ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    ours = ssim(a, b)
    t = [torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None] for x in (a, b)]
    ref = float(torch_ssim(t[0], t[1], data_range=255))
    assert ours == pytest.approx(ref, abs=1e-4)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a[:8], b[:8]) is None


def test_psnr() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == 100.0
    b = a.copy()
    b[0, 0, 0] = 255
    assert psnr(a, b) == pytest.approx(10 * math.log10(48))


def test_downsample_is_area_average() -> None:
    a = np.array([[[0, 0, 0], [4, 8, 255]], [[4, 0, 255], [4, 0, 255]]], np.uint8)
    np.testing.assert_array_equal(_downsample2(a), [[[3, 2, 191]]])
    odd = np.arange(3 * 3 * 3, dtype=np.uint8).reshape(3, 3, 3)
    assert _downsample2(odd).shape == (2, 2, 3)
    np.testing.assert_array_equal(_downsample2(odd)[1, 1], odd[2, 2])  # edge replicated


@pytest.mark.shared_data
def test_neural_refuses_fluorescence_unless_told(tmp_path: Path) -> None:
    """The shipped neural models never saw fluorescence (SSIM 0.20 measured): refuse, name the way out."""
    from tests.conftest import NDPI

    dst = tmp_path / "ndpi.tiff"
    with pytest.raises(tileserver.ConversionError, match=r"fluorescence.*--any-modality"):
        convert(NDPI, dst, codec="neural", quality=1, progress=False)
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.shared_data
def test_neural_refinement_is_a_codec_parameter_recorded_in_the_slide(tmp_path: Path) -> None:
    """``--param refine=N`` refines each tile's latent at encode time; the slide records it and opens
    with the ordinary decoder."""
    dst = tmp_path / "refined.tiff"
    argv = ["convert", str(DICOM), str(dst), "--codec", "neural", "--quality", "1", "--param", "refine=2"]
    assert cli_main([*argv, "--no-progress"]) == 0
    with tileserver.open_slide(dst) as slide:
        assert json.loads(slide.properties["tileserver.codec-params"])["refine"] == 2
        w, h = slide.level_dimensions[-1]
        assert np.asarray(slide.read_region((0, 0), slide.level_count - 1, (w, h)))[..., :3].std() > 0
