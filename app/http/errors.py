"""The one place where errors become HTTP responses: JSON ``{"message": ...}`` always.

A protocol whose clients read errors in another shape adds its fields to that document
(``ErrorDocument``, registered for its blueprint with ``register_blueprint_errors``); the
``message`` field stays.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from flask import Blueprint, Flask, Response, jsonify
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from app.errors import Draining, KuraError, RangeNotSatisfiable
from app.http.ranges import unsatisfied_content_range

log = logging.getLogger("kura.http")


ErrorDocument = Callable[[int, str], dict[str, Any]]


def message_document(status: int, message: str) -> dict[str, Any]:
    return {"message": message}


def json_error(status: int, message: str, headers: dict[str, str] | None = None,
               document: ErrorDocument = message_document) -> Response:
    response = jsonify(document(status, message))
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _http_exception(exc: HTTPException, document: ErrorDocument = message_document) -> Response:
    headers: dict[str, str] = {}
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        headers["Allow"] = ", ".join(sorted(exc.valid_methods))
    message = {404: "Not found", 405: "Method not allowed",
               413: "Payload too large"}.get(exc.code or 500, exc.description or exc.name)
    return json_error(exc.code or 500, message, headers, document)


def _kura_error(exc: KuraError, document: ErrorDocument = message_document) -> Response:
    headers = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if isinstance(exc, Draining):
        headers["Connection"] = "close"
    if isinstance(exc, RangeNotSatisfiable):
        headers["Content-Range"] = unsatisfied_content_range(exc.size)
    return json_error(exc.http_status, exc.message, headers, document)


def _unexpected(exc: Exception, document: ErrorDocument = message_document) -> Response:
    log.exception("event=http_unhandled_error error=%s", type(exc).__name__)
    return json_error(500, "Internal server error", document=document)


def _register(target: Flask | Blueprint, document: ErrorDocument) -> None:
    target.register_error_handler(KuraError, lambda exc: _kura_error(exc, document))
    target.register_error_handler(HTTPException, lambda exc: _http_exception(exc, document))
    target.register_error_handler(Exception, lambda exc: _unexpected(exc, document))


def register_error_handlers(app: Flask) -> None:
    _register(app, message_document)


def register_blueprint_errors(bp: Blueprint, document: ErrorDocument) -> None:
    """Errors of ``bp``'s routes (hook denials and draining included: they are raised once
    Flask has matched the route) answer with ``document``."""
    _register(bp, document)
