"""Views: parse the request, call the ``TileService``, wrap the answer.  Nothing else."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

from flask import Blueprint, Response, abort, current_app, g, jsonify, render_template, request

from .. import metrics
from ..tiles import TileService

__all__ = ["bp"]

bp = Blueprint("tileserver", __name__)

#: browsers may reuse a tile this long without asking; ETag revalidation after that
TILE_CACHE_CONTROL = "public, max-age=3600"


def _service() -> TileService:
    svc = current_app.extensions["tileserver"]
    assert isinstance(svc, TileService)
    return svc


@bp.get("/")
def index() -> str:
    slides = _service().list_slides()
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in slides:
        groups[s.get("folder", "")].append(s)
    return render_template("index.html", groups=sorted(groups.items()), count=len(slides))


@bp.get("/view/<path:path>")
def view(path: str) -> str:
    info = _service().slide_info(path)
    return render_template("view.html", info=info, info_json=json.dumps(info))


@bp.get("/slides.json")
def slides() -> Response:
    return jsonify(_service().list_slides())


@bp.get("/<path:path>.dzi")
def dzi(path: str) -> Response:
    return Response(_service().dzi(path), mimetype="application/xml")


@bp.get("/<path:path>_files/<int:level>/<int:col>_<int:row>.<fmt>")
def tile(path: str, level: int, col: int, row: int, fmt: str) -> Response:
    result = _service().tile(path, level, col, row, fmt, request.headers.get("If-None-Match"))
    g.tile_source = result.source
    g.tile_seconds = result.seconds
    if result.not_modified:
        resp = Response(status=304)
    else:
        resp = Response(result.data, mimetype=result.media_type)
    resp.headers["ETag"] = result.etag
    resp.headers["Cache-Control"] = TILE_CACHE_CONTROL
    resp.headers["X-Tile-Source"] = result.source
    return resp


@bp.get("/<path:path>/properties.json")
def properties(path: str) -> Response:
    return jsonify(_service().properties(path))


@bp.get("/<path:path>/thumbnail.jpeg")
def thumbnail(path: str) -> Response:
    size = request.args.get("size", type=int)
    resp = Response(_service().thumbnail(path, size), mimetype="image/jpeg")
    resp.headers["Cache-Control"] = TILE_CACHE_CONTROL
    return resp


@bp.get("/<path:path>/associated/<name>.jpeg")
def associated(path: str, name: str) -> Response:
    resp = Response(_service().associated(path, name), mimetype="image/jpeg")
    resp.headers["Cache-Control"] = TILE_CACHE_CONTROL
    return resp


@bp.get("/healthz")
def healthz() -> Response:
    # the pid tells which gunicorn worker answered (used to check metrics add up across workers)
    return jsonify(status="ok", pid=os.getpid())


@bp.get("/readyz")
def readyz() -> Response:
    ok, reason = _service().ready()
    resp = jsonify(ready=ok, reason=reason)
    resp.status_code = 200 if ok else 503
    return resp


@bp.get("/metrics", endpoint="metrics")
def metrics_view() -> Response:
    if not current_app.config["TILESERVER_SETTINGS"].metrics:
        abort(404)
    return Response(
        metrics.render(),
        mimetype=metrics.CONTENT_TYPE_LATEST.split(";")[0],
        headers={"Content-Type": metrics.CONTENT_TYPE_LATEST},
    )
