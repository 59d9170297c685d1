"""``tileserver report``: HTML + JSON for a tiny converted slide built from a real tissue patch."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import PATCHES
from tileserver.cli import main
from tileserver.convert import convert
from tileserver.errors import ConfigError, UnsupportedFormat
from tileserver.report import find_source, make_report

pytestmark = pytest.mark.shared_data

PATCH = PATCHES / "tissue" / "histolab+histolab__tissue-level0-4302-10273-4814-10785.png"
GLASS = (238, 236, 240)
#: level-0 size of the tiny slide: a 3 x 3 grid of 256-pixel tiles, tissue in the top-left 2 x 2
WIDTH, HEIGHT = 768, 640


def _write_source(path: Path) -> None:
    """A two-level tiled TIFF (lossless, so the source pixels are exact) that OpenSlide reads as generic-tiff."""
    patch = np.asarray(Image.open(PATCH).convert("RGB"))[:420, :420]
    canvas = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    canvas[:] = GLASS
    canvas[60:480, 90:510] = patch
    with tifffile.TiffWriter(path) as tif:
        tif.write(canvas, tile=(256, 256), compression="zlib", photometric="rgb")
        tif.write(np.ascontiguousarray(canvas[::2, ::2]), tile=(256, 256), compression="zlib", subfiletype=1)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    src = root / "tiny.tiff"
    _write_source(src)
    out = {"source": src}
    for glass in ("drop", "keep"):
        dst = root / "converted" / f"tiny-{glass}.tiff"
        convert(src, dst, codec="jpeg", quality=80, glass=glass, progress=False)
        out[glass] = dst
    return out


@pytest.fixture(scope="module")
def drop_report(slides: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("drop-report")
    # through the CLI, source given explicitly
    rc = main(["report", str(slides["drop"]), "--out", str(out), "--source", str(slides["source"])])
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def test_html_references_existing_images(drop_report: tuple[Path, dict[str, Any]]) -> None:
    out, report = drop_report
    html = (out / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    expected = set(report["images"].values()) | {t["image"] for t in report["worst_tiles"]}
    assert set(srcs) == expected
    for name in srcs:
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            assert im.size[0] > 100


def test_json_bytes_per_level(drop_report: tuple[Path, dict[str, Any]], slides: dict[str, Path]) -> None:
    _, r = drop_report
    assert r["codec"] == "jpeg" and r["codec_params"]["quality"] == 80
    assert r["glass"] == "drop"
    assert [lv["level"] for lv in r["levels"]] == [0, 1, 2]
    assert r["levels"][0]["tiles"] == 9
    assert r["pyramid_bytes"] == sum(lv["bytes"] for lv in r["levels"])
    assert 0 < r["pyramid_bytes"] < r["file_bytes"] == slides["drop"].stat().st_size
    # the five glass tiles of level 0 are zero-byte entries
    assert r["levels"][0]["zero_byte_tiles"] == r["glass_tiles"] == 5
    assert r["tissue_tiles"] == 4
    assert 0.3 < r["tissue_fraction"] < 0.7
    assert r["source"]["bytes"] == slides["source"].stat().st_size
    assert r["saved_vs_source"] == pytest.approx(1 - r["file_bytes"] / r["source"]["bytes"])


def test_json_fidelity(drop_report: tuple[Path, dict[str, Any]]) -> None:
    _, r = drop_report
    q = r["quality"]
    assert q["tiles"] == q["of_tissue_tiles"] == 4
    assert 0.9 < q["ssim"]["min"] <= q["ssim"]["mean"] <= q["ssim"]["max"] < 1.0
    assert 30 < q["psnr"]["mean"] < 50
    assert sum(q["ssim_histogram"]["counts"]) == 4
    worst = [t["ssim"] for t in r["worst_tiles"]]
    assert worst == sorted(worst) and worst[0] == pytest.approx(q["ssim"]["min"])


def test_rate_distortion_of_a_jpeg_slide_lies_on_the_jpeg_curve(drop_report: tuple[Path, dict[str, Any]]) -> None:
    _, r = drop_report
    rd = r["rate_distortion"]
    # only full 256 x 256 tissue tiles: the 2 x 2 block at the top left
    assert rd["sample_tiles"] == 4
    assert set(rd["jpeg"]) == {"420", "444"}
    sub = r["codec_params"]["subsampling"]
    q80 = next(p for p in rd["jpeg"][sub] if p["quality"] == 80)
    # the slide was coded with the same JPEG settings, so it is that point of the curve
    assert rd["slide"]["bpp"] == pytest.approx(q80["bpp"], rel=1e-6)
    assert rd["slide"]["ssim"] == pytest.approx(q80["ssim"], abs=1e-9)
    assert rd["saving_vs_jpeg_by_subsampling"][sub] == pytest.approx(0.0, abs=0.01)
    # the reference is the better of the two subsamplings: never easier to beat than either
    assert rd["saving_vs_jpeg"] <= rd["saving_vs_jpeg_by_subsampling"][sub] + 1e-9


def test_keep_uses_the_detector_and_finds_the_source_by_name(slides: dict[str, Path], tmp_path: Path) -> None:
    # the source lies in the parent of the converted file's folder: found by its recorded name
    r = make_report(slides["keep"], tmp_path, worst=2)
    assert r["source"]["path"] == str(slides["source"])
    assert r["glass"] == "keep"
    assert r["levels"][0]["zero_byte_tiles"] == 0
    assert r["glass_tiles"] == 5 and r["tissue_tiles"] == 4
    assert len(r["worst_tiles"]) == 2
    assert (tmp_path / "report.html").is_file()


def test_without_source_reports_bytes_only(slides: dict[str, Path], tmp_path: Path) -> None:
    lone = tmp_path / "alone" / "deep" / "slide.tiff"
    lone.parent.mkdir(parents=True)
    shutil.copy(slides["drop"], lone)
    assert find_source(lone, "tiny.tiff") is None
    r = make_report(lone, tmp_path / "out")
    assert r["quality"] is None and r["rate_distortion"] is None and r["worst_tiles"] == []
    assert any("not found" in n for n in r["notes"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "not found" in html and "levels.png" in html


def test_folder_gets_an_index(slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "all"
    rc = main(["report", str(slides["drop"].parent), "--out", str(out), "--source", str(slides["source"].parent)])
    assert rc == 0
    index = (out / "index.html").read_text()
    for name in ("tiny-drop", "tiny-keep"):
        assert f'href="{name}/report.html"' in index
        assert (out / name / "report.html").is_file()
    assert len(json.loads((out / "report.json").read_text())["slides"]) == 2


def test_not_a_converted_slide(slides: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormat, match="not a tileserver compressed slide"):
        make_report(slides["source"], tmp_path)
    assert main(["report", str(slides["source"]), "--out", str(tmp_path)]) == 1


def test_wrong_source_is_refused(slides: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other.tiff"
    tifffile.imwrite(other, np.zeros((300, 300, 3), np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(UnsupportedFormat, match="not its source"):
        make_report(slides["drop"], tmp_path / "out", source=other)


def test_bad_options(slides: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        make_report(slides["drop"], tmp_path, max_tiles=0)
