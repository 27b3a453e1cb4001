"""The internal peer API served on ``KURA_INTERNAL_PORT`` (SPEC section 6.2).

Only ``/_internal/status`` so far; the replicate and bootstrap routes come with
replication. Never reachable on the public port.
"""
from __future__ import annotations

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from app.settings import Settings


def create_internal_app(settings: Settings) -> Flask:
    app = Flask("kura-internal", static_folder=None)

    @app.get("/_internal/status")
    def status():  # type: ignore[no-untyped-def]
        return jsonify({"region": settings.region, "tenant_id": settings.tenant_id,
                        "node_url": settings.resolved_node_url})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        response = jsonify({"message": exc.description or exc.name})
        response.status_code = exc.code or 500
        return response

    return app
