"""The one place where errors become HTTP responses: JSON ``{"message": ...}`` always."""
from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from app.errors import Draining, KuraError, RangeNotSatisfiable
from app.http.ranges import unsatisfied_content_range

log = logging.getLogger("kura.http")


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify({"message": message})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _http_exception(exc: HTTPException) -> Response:
    headers: dict[str, str] = {}
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        headers["Allow"] = ", ".join(sorted(exc.valid_methods))
    message = {404: "Not found", 405: "Method not allowed",
               413: "Payload too large"}.get(exc.code or 500, exc.description or exc.name)
    return json_error(exc.code or 500, message, headers)


def _kura_error(exc: KuraError) -> Response:
    headers = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if isinstance(exc, Draining):
        headers["Connection"] = "close"
    if isinstance(exc, RangeNotSatisfiable):
        headers["Content-Range"] = unsatisfied_content_range(exc.size)
    return json_error(exc.http_status, exc.message, headers)


def _unexpected(exc: Exception) -> Response:
    log.exception("event=http_unhandled_error error=%s", type(exc).__name__)
    return json_error(500, "Internal server error")


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(KuraError, _kura_error)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(Exception, _unexpected)
