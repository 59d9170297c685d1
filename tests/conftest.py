"""Shared fixtures: where the shared data lives, and small synthetic inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("TILESERVER_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SLIDES = DATA / "slides"
FIXTURES = DATA / "fixtures"
PATCHES = DATA / "patches"

CMU = SLIDES / "CMU-1-Small-Region.svs"
NDPI = SLIDES / "test3-TRITC 2 (560).ndpi"
DICOM = SLIDES / "camelyon-dicom"

SHARED_SLIDES = [CMU, NDPI, DICOM]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not DATA.is_dir():
        skip = pytest.mark.skip(reason=f"shared data not found at {DATA} (set TILESERVER_TEST_DATA)")
        for item in items:
            if "shared_data" in item.keywords:
                item.add_marker(skip)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip_gpu = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
