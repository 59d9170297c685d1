"""Conversion faults: an interrupted or starved ``tileserver convert`` never leaves a half slide at DST.

* SIGTERM and SIGKILL at random moments of a CLI conversion that overwrites a
  previous complete output (``--force``): afterwards DST is either the previous
  file, byte for byte, or a complete new conversion; anything else left in the
  folder is a hidden partial that the server does not list (and SIGTERM leaves
  nothing at all).
* Disk full (a 200 KB tmpfs, or a simulated ENOSPC where mounting is not
  allowed): a one-line CLI error / ``ConversionError`` and no file at DST.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tileserver
from tests.conftest import CMU
from tileserver.convert import convert
from tileserver.errors import ConversionError
from tileserver.tiles import TileService

from ..server.conftest import make_settings
from .conftest import REPO, record

pytestmark = [pytest.mark.shared_data]

CLI = [sys.executable, "-m", "tileserver", "convert"]
#: the interrupted conversions: (signal, seed of the random delay)
#: (seed 0: after the run has ended, so the new output is complete)
INTERRUPTS = [
    (signal.SIGTERM, 1),
    (signal.SIGTERM, 2),
    (signal.SIGTERM, 3),
    (signal.SIGKILL, 4),
    (signal.SIGKILL, 5),
    (signal.SIGKILL, 6),
    (signal.SIGTERM, 0),
]

_RESULTS: dict[str, list[str]] = {}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_complete(path: Path) -> bool:
    """A conversion of CMU that opens and whose every stored tile decodes."""
    with tileserver.open_slide(path) as slide:
        if slide.dimensions != (2220, 2967):
            return False
        stored = slide.stored_tiles()
        assert stored is not None
        for level in range(slide.level_count):
            cols, rows = stored.grid(level)
            for row in range(rows):
                for col in range(cols):
                    stored.read_tile(level, col, row)
    return True


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A complete earlier output (webp, so a new JPEG conversion is told apart), and a JPEG run's duration."""
    d = tmp_path_factory.mktemp("previous")
    out = d / "cmu.tiff"
    subprocess.run(
        [*CLI, str(CMU), str(out), "--codec", "webp", "--no-progress"], cwd=REPO, check=True, capture_output=True
    )
    start = time.monotonic()
    subprocess.run(
        [*CLI, str(CMU), str(d / "timing.tiff"), "--codec", "jpeg", "--no-progress"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return out, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "seed"), INTERRUPTS, ids=[f"{s.name}-{n}" for s, n in INTERRUPTS])
def test_interrupted_conversion_keeps_previous_output(
    previous: tuple[Path, float], tmp_path: Path, sig: signal.Signals, seed: int
) -> None:
    prev, duration = previous
    dst = tmp_path / "cmu.tiff"
    shutil.copy(prev, dst)
    before = _sha(dst)
    # a random moment from interpreter start to just past the usual end of the run
    delay = random.Random(seed).uniform(0.1, duration * 1.1)
    proc = subprocess.Popen(
        [*CLI, str(CMU), str(dst), "--codec", "jpeg", "--force", "--no-progress"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if seed:
        time.sleep(delay)
    else:  # the signal comes after the end: the new output must be there, complete
        proc.wait(timeout=120)
        delay = duration
    proc.send_signal(sig)  # a no-op once the process has ended
    try:
        rc = proc.wait(timeout=120)
    finally:
        if proc.stderr is not None:
            proc.stderr.close()
    if _sha(dst) == before:
        outcome = "previous kept"
    else:
        assert _is_complete(dst), "DST changed but is not a complete conversion"
        assert tileserver.open_slide(dst).codec == "jpeg"
        outcome = "replaced by complete"
    others = sorted(p.name for p in tmp_path.iterdir() if p != dst)
    assert all(n.startswith(".cmu.tiff.partial-") for n in others), others
    if sig == signal.SIGTERM:
        assert others == [], "SIGTERM must clean up its temporary files"
    # what the server would list: DST only, never a partial
    assert TileService(make_settings(tmp_path)).discover() == ["cmu.tiff"]
    _RESULTS.setdefault(sig.name, []).append(f"{delay:.2f}s: {outcome} (exit {rc}, {len(others)} hidden leftovers)")
    record("conversion_interrupts", {**_RESULTS, "jpeg_run_seconds": round(duration, 2)})


@contextlib.contextmanager
def _tiny_disk(path: Path, size: str = "200k") -> Iterator[bool]:
    """Mount a tmpfs of ``size`` at ``path``; yields False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
            ).returncode
            == 0
        )
    except FileNotFoundError:
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("room", [0.1, 1.4], ids=["spool-fails", "tiff-fails"])
def test_disk_full_cli_is_one_line_error_and_no_file(previous: tuple[Path, float], tmp_path: Path, room: float) -> None:
    # room x the output's size: at 0.1 the tile spool does not fit; at 1.4 the spool (about the
    # output's size) fits, the TIFF written beside it does not
    size = f"{int(room * (previous[0].parent / 'timing.tiff').stat().st_size / 1024)}k"
    disk = tmp_path / "disk"
    with _tiny_disk(disk, size) as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (test_disk_full_simulated covers the same path)")
        dst = disk / "cmu.tiff"
        proc = subprocess.run(
            [*CLI, str(CMU), str(dst), "--codec", "jpeg", "--no-progress"], cwd=REPO, capture_output=True, text=True
        )
        leftovers = sorted(p.name for p in disk.iterdir())
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tileserver")]
    assert len(lines) == 1 and lines[0].startswith("tileserver: error:"), proc.stderr
    assert "No space left on device" in lines[0]
    assert "Traceback" not in proc.stderr
    assert leftovers == []
    stage = "spool" if room < 1 else "tiff"
    record(f"conversion_disk_full_{stage}", {"tmpfs": size, "exit": proc.returncode, "message": lines[0][:200]})


def test_disk_full_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ENOSPC at the n-th write, wherever the writer is (spool, TIFF, rename): always a ConversionError
    real_pwrite = os.pwrite
    failures = []
    for n in (0, 5, 40):
        calls = {"n": 0}

        def pwrite(fd: int, data: bytes, offset: int, *, _n: int = n, _c: dict[str, int] = calls) -> int:
            _c["n"] += 1
            if _c["n"] > _n:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)  # the container writer spools tiles with os.pwrite
        dst = tmp_path / f"out{n}.tiff"
        try:
            convert(CMU, dst, codec="jpeg", progress=False, quality_samples=4)
        except ConversionError as exc:
            assert "No space left" in str(exc)
        else:
            failures.append(f"write {n}: no error")
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        assert not dst.exists()
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".out{n}.tiff")]
        assert leftovers == [], leftovers
    assert not failures, failures
