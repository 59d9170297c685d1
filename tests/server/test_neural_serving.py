"""Serving a neural-coded slide: decodes go through the worker's DecodeBatcher, pixels as the reader's own."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image
from prometheus_client import REGISTRY

import tileserver
from tests.conftest import DICOM
from tileserver.server import create_app

from .conftest import make_settings

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


@pytest.fixture(scope="module")
def neural_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    neural = pytest.importorskip("tileserver.codecs.neural")
    convert = pytest.importorskip("tileserver.convert")
    if not neural.available_qualities():
        pytest.skip("no neural model installed")
    root = tmp_path_factory.mktemp("neural")
    q = neural.available_qualities()[0]
    convert.convert(DICOM, root / "n.tiff", codec="neural", quality=q, glass="drop", progress=False, quality_samples=2)
    return root


@pytest.fixture
def app(neural_root: Path) -> Iterator[Flask]:
    app = create_app(make_settings(neural_root, device="cpu", torch_threads=1, batch_max_delay_ms=20))
    yield app
    app.extensions["tileserver"].close()


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_neural_tiles_decode_through_the_batcher(app: Flask, neural_root: Path) -> None:
    path = neural_root / "n.tiff"
    with tileserver.open_slide(path) as slide:
        assert slide.codec == "neural"
        ref = DeepZoomGenerator(slide, 256, 0, limit_bounds=True)
        top = ref.level_count - 1
        cols, rows = ref.level_tiles[top]
        addresses = [(top, c, r) for c in range(cols) for r in range(rows)] + [(top - 1, 0, 0), (top - 4, 0, 0)]
        expected = {a: np.asarray(ref.get_tile(a[0], (a[1], a[2])).convert("RGB")) for a in addresses}
    batches = _value("tileserver_decode_batch_size_count", codec="neural", device="cpu")
    decoded = _value("tileserver_decode_batch_size_sum", codec="neural", device="cpu")
    client = app.test_client()

    def get(a: tuple[int, int, int]) -> tuple[tuple[int, int, int], bytes, str, int]:
        r = client.get(f"/n.tiff_files/{a[0]}/{a[1]}_{a[2]}.png")
        return a, r.data, r.headers.get("X-Tile-Source", ""), r.status_code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(get, addresses))
    for a, data, source, status in results:
        assert status == 200, a
        assert source in ("decode", "glass")
        got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        # batched decodes give the same pixels as the reader decoding tile by tile
        np.testing.assert_array_equal(got, expected[a], err_msg=str(a))
    assert _value("tileserver_decode_batch_size_count", codec="neural", device="cpu") > batches
    assert _value("tileserver_decode_batch_size_sum", codec="neural", device="cpu") > decoded
    assert _value("tileserver_decode_seconds_count", codec="neural", device="cpu") > 0
    assert _value("tileserver_model_load_seconds_count", codec="neural", device="cpu") > 0
