"""Fixtures for the server tests: settings over the shared slides, apps, fake slides."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import SLIDES
from tileserver.config import Settings


def make_settings(slides_dir: Path, **kw: object) -> Settings:
    """Settings for tests: the given folder, everything else default unless overridden."""
    kw.setdefault("preload_models", False)  # tests that want it say so: loading torch models is slow
    return Settings(slides_dir=str(slides_dir), **kw)  # type: ignore[arg-type]


@pytest.fixture
def shared_app() -> Iterator[Flask]:
    from tileserver.server import create_app

    app = create_app(make_settings(SLIDES))
    app.config["TESTING"] = True
    yield app
    app.extensions["tileserver"].close()


@pytest.fixture
def client(shared_app: Flask) -> FlaskClient:
    return shared_app.test_client()
