"""Xcode compilation cache (Tuist): content-addressed blobs."""
from __future__ import annotations

from flask import Blueprint, Response

from app import metrics
from app.http import params
from app.http.artifacts import empty, serve_artifact, store_upload
from app.http.services import store
from app.storage.keys import validate_component

bp = Blueprint("xcode_cas", __name__)
PRODUCER = "xcode"
KEY_PREFIX = "blob/"
MAX_BYTES = 256 * 1024 * 1024


@bp.post("/api/cache/cas/<cas_id>")
def upload(cas_id: str) -> Response:
    params.tenant_id()
    namespace = params.namespace_id()
    key = KEY_PREFIX + validate_component(cas_id, "CAS id")
    if store().exists(PRODUCER, namespace, key):
        # Already stored: answer without reading the body.
        metrics.ARTIFACT_WRITES.labels(PRODUCER, "exists").inc()
        return empty(204)
    store_upload(PRODUCER, namespace, key, MAX_BYTES, "Payload exceeds 256MB limit")
    return empty(204)


@bp.get("/api/cache/cas/<cas_id>")
def download(cas_id: str) -> Response:
    params.tenant_id()
    key = KEY_PREFIX + validate_component(cas_id, "CAS id")
    return serve_artifact(PRODUCER, params.namespace_id(), key)
