"""The web server: ``create_app(settings)`` builds the Flask app; ``tileserver serve`` runs it under gunicorn.

Only this package imports Flask.  Nothing is built at import time.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import time
from pathlib import Path

from flask import Flask, Response, g, request

from .. import __version__, metrics
from ..config import Settings, load_settings
from ..tiles import TileService
from .errors import register_error_handlers
from .views import bp

__all__ = ["create_app"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent
EXTENSION = "tileserver"

_access = logging.getLogger("tileserver.access")


def create_app(settings: Settings | None = None, *, service: TileService | None = None) -> Flask:
    """The Flask app serving ``settings.slides_dir`` (settings from the environment when None).

    ``service`` replaces the ``TileService`` built from ``settings`` (tests use it
    to inject fakes).  ``app.extensions["tileserver"]`` holds the service; call its
    ``close()`` at shutdown to drain decodes.
    """
    if settings is None:
        settings = load_settings()
    app = Flask(
        __name__,
        static_folder=str(PACKAGE_DIR / "static"),
        static_url_path="/static",
        template_folder=str(PACKAGE_DIR / "templates"),
    )
    app.config["TILESERVER_SETTINGS"] = settings
    if service is None:
        service = TileService(settings)
        service.start()
    app.extensions[EXTENSION] = service
    app.register_blueprint(bp)
    register_error_handlers(app)
    _install_access_log(app, settings)
    _build_info(settings)
    return app


def _build_info(settings: Settings) -> None:
    # The installed version, read from package metadata: importing torch here would load it
    # into every worker even when no neural slide is ever served.
    try:
        torch_version = importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - torch is a dependency
        torch_version = "none"
    metrics.get().build_info.labels(__version__, torch_version, settings.device).set(1)


def _install_access_log(app: Flask, settings: Settings) -> None:
    as_json = settings.access_log_json

    @app.before_request
    def _start() -> None:
        g.start = time.perf_counter()

    @app.after_request
    def _log(response: Response) -> Response:
        seconds = time.perf_counter() - g.get("start", time.perf_counter())
        kind = request.url_rule.endpoint.rsplit(".", 1)[-1] if request.url_rule is not None else "unmatched"
        m = metrics.get()
        m.http_requests.labels(kind, str(response.status_code)).inc()
        m.http_request_seconds.labels(kind).observe(seconds)
        source = g.get("tile_source")
        if as_json:
            record = {
                "time": round(time.time(), 3),
                "remote": request.remote_addr,
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "bytes": response.content_length,
                "ms": round(seconds * 1000, 2),
                "endpoint": kind,
            }
            if source is not None:
                record["source"] = source
                record["tile_ms"] = round(g.get("tile_seconds", 0.0) * 1000, 2)
            _access.info(json.dumps(record))
        else:
            extra = f" source={source}" if source is not None else ""
            _access.info(
                '%s "%s %s" %s %s %.1fms%s',
                request.remote_addr,
                request.method,
                request.full_path.rstrip("?"),
                response.status_code,
                response.content_length or 0,
                seconds * 1000,
                extra,
            )
        return response
