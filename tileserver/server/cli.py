"""``tileserver serve DIR``: the server under gunicorn (or Flask's server with ``--dev``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import Settings, load_settings
from ..errors import ConfigError

__all__ = ["add_cli", "run_serve", "settings_from_args"]

_log = logging.getLogger(__name__)


def add_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``serve``."""
    p = subparsers.add_parser(
        "serve",
        help="serve a folder of slides (Deep Zoom + viewer)",
        description="Serve every slide under DIR with Deep Zoom tiles, an OpenSeadragon viewer and Prometheus "
        "metrics. Settings: defaults < --config FILE < TILESERVER_* environment < these options.",
    )
    p.add_argument("slides_dir", metavar="DIR", nargs="?", default=None, help="folder of slides")
    p.add_argument("--config", metavar="FILE", default=None, help="TOML settings file (see config.example.toml)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8080)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: min(4, cores // 2))")
    p.add_argument("--threads", type=int, default=None, help="threads per worker (default 8)")
    p.add_argument("--dev", action="store_true", help="Flask's development server (one process, reloader off)")
    p.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings for ``serve``: defaults < ``--config`` < TILESERVER_* < the options given."""
    settings = load_settings(
        args.config,
        slides_dir=args.slides_dir,
        host=args.host,
        port=args.port,
        workers=args.workers,
        threads=args.threads,
    )
    if not Path(settings.slides_dir).is_dir():
        raise ConfigError(f"setting 'slides_dir': {settings.slides_dir!r} is not a folder")
    return settings


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted."""
    settings = settings_from_args(args)
    logging.getLogger("tileserver").setLevel(settings.log_level.upper())
    if args.dev:
        from . import create_app

        app = create_app(settings)
        try:
            app.run(settings.host, settings.port, threaded=True, use_reloader=False)
        finally:
            app.extensions["tileserver"].close()
        return 0
    from .gunicorn import TileServerApplication, prepare_metrics_dir

    if settings.metrics:
        prepare_metrics_dir()
    _log.info(
        "serving %s on http://%s:%d (%d workers x %d threads)",
        Path(settings.slides_dir).resolve(),
        settings.host,
        settings.port,
        settings.resolved_workers(),
        settings.threads,
    )
    TileServerApplication(settings).run()
    return 0
