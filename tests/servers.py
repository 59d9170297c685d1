"""Start ``tileserver serve`` for tests: a free loopback port and a server that is stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(
    slides: Path, log: Path, *, workers: int = 2, threads: int = 4, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``tileserver serve`` (gunicorn) on a free loopback port; yields (base URL, master process)."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TILESERVER_", "PROMETHEUS_"))}
    clean.update(env or {})
    cmd = [sys.executable, "-m", "tileserver", "serve", str(slides), "--port", str(port)]
    cmd += ["--workers", str(workers), "--threads", str(threads)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=clean, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(base + "/readyz", timeout=5).ok:
                    break
            except requests.RequestException:
                pass  # not listening yet, or a worker still importing
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tileserver serve did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
