"""Xcode compilation cache (Tuist): content-addressed blobs."""
from __future__ import annotations

from flask import Blueprint, Response

from app import metrics
from app.http.artifacts import empty, store_upload
from app.http.routes import WRITE, download, route
from app.http.services import store
from app.http.targets import QUERY_NAMESPACE, QUERY_TENANT, PathKey, Target, Targets

bp = Blueprint("xcode_cas", __name__)
PRODUCER = "xcode"
MAX_BYTES = 256 * 1024 * 1024
TEMPLATE = "/api/cache/cas/{id}"
TARGET = Targets(QUERY_TENANT, QUERY_NAMESPACE, PathKey("id", "CAS id", prefix="blob/"))


@route(bp, TEMPLATE, methods=["POST"], operation=WRITE, producer=PRODUCER, target=TARGET)
def upload(target: Target) -> Response:
    if store().exists(PRODUCER, target.namespace_id, target.key):
        # Already stored: answer without reading the body.
        metrics.artifact_write(PRODUCER, metrics.EXISTS)
        return empty(204)
    store_upload(PRODUCER, target.namespace_id, target.key, MAX_BYTES, "Payload exceeds 256MB limit")
    return empty(204)


download(bp, TEMPLATE, producer=PRODUCER, target=TARGET, name="download")
