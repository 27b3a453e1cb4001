"""React Native Metro ``HttpStore``: opaque (client-gzipped) bodies, often chunked."""
from __future__ import annotations

from flask import Blueprint, Response

from app.http import params
from app.http.artifacts import empty, serve_artifact, store_upload
from app.storage.keys import validate_component

bp = Blueprint("metro", __name__)
PRODUCER = "metro"
DEFAULT_NAMESPACE = "metro"
MAX_BYTES = 2 * 1024 * 1024 * 1024


@bp.put("/api/metro/cache/<cache_key>")
def put(cache_key: str) -> Response:
    store_upload(PRODUCER, params.namespace_id(DEFAULT_NAMESPACE),
                 validate_component(cache_key, "cache key"), MAX_BYTES, "Payload exceeds 2GB limit",
                 content_type="application/octet-stream")
    return empty(200)


@bp.get("/api/metro/cache/<cache_key>")
def get(cache_key: str) -> Response:
    return serve_artifact(PRODUCER, params.namespace_id(DEFAULT_NAMESPACE),
                          validate_component(cache_key, "cache key"))
