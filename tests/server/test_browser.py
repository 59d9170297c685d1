"""The viewer in headless Chromium: OpenSeadragon loads every tile of an SVS and a compressed slide."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CMU
from tileserver.server import create_app

from .conftest import make_settings

pytestmark = [pytest.mark.browser, pytest.mark.shared_data, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from werkzeug.serving import make_server

    root = tmp_path_factory.mktemp("browser-slides")
    shutil.copy(CMU, root / CMU.name)
    try:
        from tileserver.convert import convert

        (root / "compressed").mkdir()
        convert(CMU, root / "compressed" / "cmu-jpeg.tiff", codec="jpeg", glass="drop", progress=False)
    except ImportError:
        pass
    app = create_app(make_settings(root))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        app.extensions["tileserver"].close()


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian chromium / chromium-driver not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="tileserver-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait_loaded(driver: Any, timeout: float = 40) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state: dict[str, Any] = driver.execute_script("return window.tileserverState || null") or {}
        if state.get("openFailed") or (state.get("fullyLoaded") and state.get("loadedTiles")):
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"viewer not fully loaded after {timeout} s: {state}")
        time.sleep(0.2)


@pytest.mark.parametrize("slide", ["CMU-1-Small-Region.svs", "compressed/cmu-jpeg.tiff"])
def test_viewer_loads_every_tile(base_url: str, driver: Any, slide: str, tmp_path: Path) -> None:
    if slide.startswith("compressed/"):
        pytest.importorskip("tileserver.convert", reason="tileserver.convert not available")
    driver.get(f"{base_url}/view/{quote(slide)}")
    state = _wait_loaded(driver)
    assert state["openFailed"] is None
    assert state["failedTiles"] == []
    assert state["loadedTiles"] > 0
    # the viewer settles (animations, navigator) before the screenshot
    time.sleep(0.5)
    shot = tmp_path / (slide.replace("/", "_") + ".png")
    driver.save_screenshot(str(shot))
    if os.environ.get("TILESERVER_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["TILESERVER_SCREENSHOTS"]) / shot.name)
    rect = driver.execute_script("return document.getElementById('viewer').getBoundingClientRect().toJSON()")
    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=np.float64)
    x0, y0 = int(rect["x"]), int(rect["y"])
    viewer = img[y0 : y0 + int(rect["height"]), x0 : x0 + int(rect["width"])]
    assert viewer.size > 0
    assert viewer.std() > 10, "the viewer area is blank"
    # the page shows what it claims: codec, scale bar from mpp, properties, associated images
    assert driver.execute_script("return document.getElementById('scalebar').hidden") is False
    label = driver.execute_script("return document.querySelector('#scalebar .bar-label').textContent")
    assert "µm" in label or "mm" in label
    rows = driver.execute_script("return document.querySelectorAll('#properties tr').length")
    assert rows > 5
    assert driver.execute_script("return document.querySelectorAll('.associated img').length") == 3
    codec = driver.execute_script("return document.getElementById('codec').textContent")
    assert ("jpeg" in codec) == slide.endswith(".tiff")
