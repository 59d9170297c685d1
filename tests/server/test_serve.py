"""``tileserver serve`` plumbing: CLI settings, gunicorn hooks, neural decoder seam."""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import tileserver.codecs
from tileserver.errors import ConfigError
from tileserver.server import create_app
from tileserver.server.cli import add_cli, settings_from_args
from tileserver.server.gunicorn import TileServerApplication, _worker_exit, bind_address, prepare_metrics_dir
from tileserver.tiles import NeuralDecoders, TileService

from .conftest import make_settings
from .fakes import FakeStoredSlide


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_options_override_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nworkers = 5\nthreads = 2\nport = 9100\n")
    monkeypatch.setenv("TILESERVER_THREADS", "6")
    args = _parse(["serve", str(tmp_path), "--config", str(cfg), "--workers", "3"])
    s = settings_from_args(args)
    assert (s.slides_dir, s.workers, s.threads, s.port) == (str(tmp_path), 3, 6, 9100)
    with pytest.raises(ConfigError, match="slides_dir"):
        settings_from_args(_parse(["serve", str(tmp_path / "missing")]))


def test_gunicorn_configuration(tmp_path: Path) -> None:
    app = TileServerApplication(make_settings(tmp_path, workers=3, threads=5, port=8123, host="::1"))
    assert app.cfg.worker_class_str == "gthread"
    assert app.cfg.workers == 3 and app.cfg.threads == 5
    assert app.cfg.bind == ["[::1]:8123"]
    assert app.cfg.preload_app is False  # the app (and CUDA) are built after fork
    assert bind_address("0.0.0.0", 80) == "0.0.0.0:80"


def test_worker_exit_closes_the_service(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    closed = []
    app.extensions["tileserver"].close = lambda: closed.append(True)

    class Worker:
        wsgi = app

    _worker_exit(None, Worker())
    assert closed == [True]


def test_metrics_dir_is_wiped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "counter_1.db").write_bytes(b"stale")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert prepare_metrics_dir() == tmp_path
    assert list(tmp_path.iterdir()) == []
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)


class _FakeNeural:
    """Stands in for the neural codec: doubles pixel values, counts batches."""

    name = "neural"

    def __init__(self, **params: Any) -> None:
        self.params = {k: v for k, v in params.items() if k == "quality"}
        self.built_with = params
        self.batches: list[int] = []
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    def decode_batch(self, blobs: Sequence[bytes]) -> list[npt.NDArray[np.uint8]]:
        self.batches.append(len(blobs))
        return [np.full((2, 2, 3), b[0], np.uint8) for b in blobs]


class _NeuralSlide(FakeStoredSlide):
    def __init__(self, path: Path, quality: int) -> None:
        super().__init__(path, 300, 300)
        self.tile_codec = _FakeNeural(quality=quality)
        self.decoder: Any = None

    @property
    def codec(self) -> str | None:
        return "neural"

    def set_decoder(self, fn: Any) -> None:
        self.decoder = fn


def test_one_batcher_per_neural_codec_and_quality(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[_FakeNeural] = []

    def fake_get(name: str, **params: Any) -> _FakeNeural:
        built.append(_FakeNeural(**params))
        return built[-1]

    monkeypatch.setattr(tileserver.codecs, "get", fake_get)
    decoders = NeuralDecoders(make_settings(tmp_path, device="cpu", torch_threads=1, batch_max_delay_ms=50))
    try:
        d1 = decoders(_NeuralSlide(tmp_path / "a", 3))
        d2 = decoders(_NeuralSlide(tmp_path / "b", 3))
        d3 = decoders(_NeuralSlide(tmp_path / "c", 5))
        assert d1 is not None and d2 is not None and d3 is not None
        assert len(built) == 2  # quality 3 shared, quality 5 separate
        assert all(c.loaded for c in built)  # weights loaded when the batcher is made, not in a request
        assert built[0].built_with == {"quality": 3, "device": "cpu", "threads": 1}
        assert decoders(FakeStoredSlide(tmp_path / "d")) is None  # not neural: keeps its own decoder
        results: list[int] = []
        threads = [threading.Thread(target=lambda i=i: results.append(int(d1(bytes([i]))[0, 0, 0]))) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == list(range(6))
        assert sum(built[0].batches) == 6 and max(built[0].batches) > 1  # concurrent requests were batched
        assert not decoders.loading()
    finally:
        decoders.close()


def test_readyz_waits_for_model_preload(tmp_path: Path) -> None:
    release = threading.Event()

    class SlowDecoders:
        def __call__(self, slide: Any) -> None:
            return None

        def preload(self) -> None:
            release.wait(30)

        def close(self) -> None:
            pass

        def loading(self) -> bool:
            return False

    svc = TileService(make_settings(tmp_path, preload_models=True), decoders=SlowDecoders())
    svc.start()
    client = create_app(svc.settings, service=svc).test_client()
    try:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.get_json()["reason"] == "loading models"
    finally:
        release.set()
    assert svc._preload is not None
    svc._preload.join(10)
    assert client.get("/readyz").status_code == 200


def test_codecs_that_differ_only_in_encoding_share_one_batcher(tmp_path: Path) -> None:
    # Refinement and the encoder add-on are recorded in a slide's codec parameters but do not change
    # how it decodes: such slides share one model in memory and one batcher's batches.
    neural = pytest.importorskip("tileserver.codecs.neural")
    decoders = NeuralDecoders(make_settings(tmp_path, device="cpu", torch_threads=1))
    try:
        plain = decoders._decoder_for(neural.NeuralCodec(1, encoder="base"))
        refined = decoders._decoder_for(neural.NeuralCodec(1, refine=5))
        other = decoders._decoder_for(neural.NeuralCodec(2, refine=5))
        assert getattr(plain, "__self__", None) is getattr(refined, "__self__", object())
        assert [k[1] for k in decoders._batchers] == [
            (("model", repr(neural.NeuralCodec(q).params["model"])), ("quality", repr(q))) for q in (1, 2)
        ]
        assert other.__self__ is not plain.__self__  # type: ignore[attr-defined]
    finally:
        decoders.close()


def test_preload_builds_a_batcher_per_installed_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    neural = pytest.importorskip("tileserver.codecs.neural")
    monkeypatch.setattr(neural, "available_qualities", lambda *a: [2, 4])
    monkeypatch.setattr(tileserver.codecs, "get", lambda name, **params: _FakeNeural(**params))
    decoders = NeuralDecoders(make_settings(tmp_path, device="cpu", torch_threads=1))
    try:
        decoders.preload()
        assert sorted(k[1] for k in decoders._batchers) == [(("quality", "2"),), (("quality", "4"),)]
        assert not decoders.loading()
    finally:
        decoders.close()
