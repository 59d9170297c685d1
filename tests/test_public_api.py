"""Pin the curated public API: additions are deliberate, removals break users."""

from __future__ import annotations

import tileserver
import tileserver.codecs


def test_tileserver_all() -> None:
    assert sorted(tileserver.__all__) == sorted(
        [
            "BadTileAddress",
            "ConfigError",
            "ConversionError",
            "CorruptSlide",
            "CorruptTile",
            "MissingModel",
            "SlideNotFound",
            "SlideReader",
            "TileServerError",
            "UnsupportedFormat",
            "__version__",
            "detect_format",
            "open_slide",
        ]
    )
    for name in tileserver.__all__:
        assert hasattr(tileserver, name)


def test_codecs_all() -> None:
    assert sorted(tileserver.codecs.__all__) == ["Tile", "TileCodec", "available", "get", "register"]


def test_errors_share_one_base() -> None:
    for name in tileserver.__all__:
        obj = getattr(tileserver, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, tileserver.TileServerError)


def test_importing_codecs_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, tileserver, tileserver.codecs; tileserver.codecs.get('jpeg'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
