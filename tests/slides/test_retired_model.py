"""Slides converted with a neural model keep opening after that model is replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tileserver
from tileserver.errors import MissingModel

from ..conftest import DICOM

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.shared_data

TINY = {"M": 8, "N": 8, "widths": [8, 8], "step": 0.05, "H": 8}


def test_slide_decodes_with_its_retired_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tileserver import convert
    from tileserver.codecs import neural
    from tileserver.codecs.models import build

    weights = tmp_path / "weights"
    monkeypatch.setattr(neural, "WEIGHTS_DIR", weights)
    torch.manual_seed(0)
    first = neural.save_weights(build("klt-hp8", **TINY), name="first", quality=1)
    dst = tmp_path / "slide.tiff"
    convert.convert(DICOM, dst, codec="neural", quality=1, glass="drop", progress=False, quality_samples=2)
    with tileserver.open_slide(dst) as slide:
        w, h = slide.level_dimensions[-1]
        before = np.asarray(slide.read_region((0, 0), slide.level_count - 1, (w, h)))
        assert before[..., :3].std() > 0  # a real picture, so equality below means something

    torch.manual_seed(1)
    neural.save_weights(build("klt-hp8", **TINY), name="second", quality=1)  # a new model for quality 1
    with tileserver.open_slide(dst) as slide:
        after = np.asarray(slide.read_region((0, 0), slide.level_count - 1, (w, h)))
    assert np.array_equal(before, after)

    # Deleting the retired file is what strands the slide: a clear error naming the model.
    (weights / "first.pt").unlink()
    with pytest.raises(MissingModel, match=first["sha256"][:16]):
        tileserver.open_slide(dst)
