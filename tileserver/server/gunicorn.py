"""Running the app under gunicorn (threaded workers), programmatically.

* The app is built inside each worker (no preload): CUDA and models are
  initialised after fork, never before.
* Prometheus multiprocess mode: ``prepare_metrics_dir`` creates and wipes
  ``PROMETHEUS_MULTIPROC_DIR`` before any worker exists; ``child_exit`` marks a
  dead worker's files so its live gauges disappear.
* Graceful shutdown: ``worker_exit`` closes the worker's ``TileService``, which
  drains in-flight decodes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from .. import metrics
from ..config import Settings

__all__ = ["TileServerApplication", "bind_address", "prepare_metrics_dir"]


def bind_address(host: str, port: int) -> str:
    """gunicorn's ``bind`` for ``host`` and ``port`` (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def prepare_metrics_dir() -> Path:
    """Create (or wipe) the prometheus multiprocess directory and export it.

    Uses ``PROMETHEUS_MULTIPROC_DIR`` when set (its ``*.db`` files are removed:
    counts from a previous run must not leak in), else a fresh temporary
    directory removed when the master exits.
    """
    configured = metrics.multiprocess_dir()
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="tileserver-metrics-"))
        master = os.getpid()

        def _cleanup() -> None:
            if os.getpid() == master:  # workers run atexit handlers too
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(_cleanup)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def _child_exit(server: Any, worker: Any) -> None:
    metrics.mark_process_dead(worker.pid)


def _worker_exit(server: Any, worker: Any) -> None:
    app = getattr(worker, "wsgi", None)
    service = getattr(app, "extensions", {}).get("tileserver") if app is not None else None
    if service is not None:
        service.close()


class TileServerApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn application serving ``create_app(settings)`` with gthread workers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "bind": bind_address(s.host, s.port),
            "workers": s.resolved_workers(),
            "threads": s.threads,
            "worker_class": "gthread",
            "timeout": s.timeout,
            "graceful_timeout": s.timeout,
            "loglevel": s.log_level,
            "accesslog": None,  # the app logs requests itself, with tile source and timing
            "preload_app": False,
            "child_exit": _child_exit,
            "worker_exit": _worker_exit,
            "proc_name": "tileserver",
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from . import create_app

        return create_app(self.settings)
