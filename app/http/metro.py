"""React Native Metro ``HttpStore``: opaque (client-gzipped) bodies, often chunked.

Metro sends no tenant: the hooks see the node's tenant, as in Kura.
"""
from __future__ import annotations

from flask import Blueprint, Response

from app.http.artifacts import empty, store_upload
from app.http.routes import WRITE, download, route
from app.http.targets import NODE_TENANT, PathKey, QueryNamespace, Target, Targets

bp = Blueprint("metro", __name__)
PRODUCER = "metro"
DEFAULT_NAMESPACE = "metro"
MAX_BYTES = 2 * 1024 * 1024 * 1024
TEMPLATE = "/api/metro/cache/{cache_key}"
TARGET = Targets(NODE_TENANT, QueryNamespace(DEFAULT_NAMESPACE), PathKey("cache_key", "cache key"))


@route(bp, TEMPLATE, methods=["PUT"], operation=WRITE, producer=PRODUCER, target=TARGET)
def put(target: Target) -> Response:
    store_upload(PRODUCER, target.namespace_id, target.key, MAX_BYTES, "Payload exceeds 2GB limit",
                 content_type="application/octet-stream")
    return empty(200)


download(bp, TEMPLATE, producer=PRODUCER, target=TARGET)
