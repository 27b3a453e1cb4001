"""Gradle HTTP build cache: Tuist's route, and a path-only route stock Gradle can use.

Stock ``HttpBuildCache`` drops the query string of its URL and requires the URL to
end in ``/``, so ``/gradle/{tenant_id}/{namespace_id}/`` carries both in the path
(``_`` is the tenant-wide namespace). Basic credentials stay in the headers for the
auth hook.
"""
from __future__ import annotations

from flask import Blueprint, Response

from app.http import params
from app.http.artifacts import empty, serve_artifact, store_upload
from app.storage.keys import validate_component

bp = Blueprint("gradle", __name__)
PRODUCER = "gradle"
MAX_BYTES = 100 * 1024 * 1024


def _put(namespace: str, cache_key: str) -> Response:
    key = validate_component(cache_key, "cache key")
    result = store_upload(PRODUCER, namespace, key, MAX_BYTES, "Payload exceeds 100MB limit")
    return empty(201 if result.created else 200)


@bp.put("/api/cache/gradle/<cache_key>")
def put(cache_key: str) -> Response:
    params.tenant_id()
    return _put(params.namespace_id(), cache_key)


@bp.get("/api/cache/gradle/<cache_key>")
def get(cache_key: str) -> Response:
    params.tenant_id()
    return serve_artifact(PRODUCER, params.namespace_id(), validate_component(cache_key, "cache key"))


@bp.put("/gradle/<tenant>/<namespace>/<cache_key>")
def put_by_path(tenant: str, namespace: str, cache_key: str) -> Response:
    validate_component(tenant, "tenant_id")
    return _put(params.path_namespace(namespace), cache_key)


@bp.get("/gradle/<tenant>/<namespace>/<cache_key>")
def get_by_path(tenant: str, namespace: str, cache_key: str) -> Response:
    validate_component(tenant, "tenant_id")
    return serve_artifact(PRODUCER, params.path_namespace(namespace),
                          validate_component(cache_key, "cache key"))
