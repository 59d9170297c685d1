"""One table mapping our exceptions to HTTP statuses, registered by ``create_app``.

Only 5xx answers are logged (with the traceback); 4xx are the client's business.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from ..errors import (
    BadTileAddress,
    ConfigError,
    ConversionError,
    CorruptSlide,
    CorruptTile,
    MissingModel,
    SlideNotFound,
    TileServerError,
    UnsupportedFormat,
)

__all__ = ["STATUS", "register_error_handlers", "status_for"]

_log = logging.getLogger("tileserver.server")

#: exception class -> HTTP status (looked up along the exception's MRO)
STATUS: dict[type[BaseException], int] = {
    SlideNotFound: 404,
    UnsupportedFormat: 404,  # a file that is not a slide is, to a client, no slide
    BadTileAddress: 404,
    CorruptTile: 500,
    CorruptSlide: 500,
    MissingModel: 503,  # the server cannot decode this slide until the model is installed
    ConfigError: 500,
    ConversionError: 500,
    TileServerError: 500,
}


def status_for(exc: BaseException) -> int:
    """HTTP status for ``exc`` (500 for anything not in the table)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _handle(exc: Exception) -> Response | HTTPException:
    if isinstance(exc, HTTPException):
        return exc  # Flask's own 404/405/...: answered as usual
    status = status_for(exc)
    if status >= 500:
        _log.error("%s: %s", type(exc).__name__, exc, exc_info=exc)
    message = str(exc) if isinstance(exc, TileServerError) else "internal server error"
    resp = jsonify(error=message, type=type(exc).__name__)
    resp.status_code = status
    return resp


def register_error_handlers(app: Flask) -> None:
    """Install the table on ``app``."""
    app.register_error_handler(Exception, _handle)
