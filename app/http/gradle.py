"""Gradle HTTP build cache: Tuist's route, and a path-only route stock Gradle can use.

Stock ``HttpBuildCache`` drops the query string of its URL and requires the URL to
end in ``/``, so ``/gradle/{tenant_id}/{namespace_id}/`` carries both in the path
(``_`` is the tenant-wide namespace). Basic credentials stay in the headers for the
auth hook.
"""
from __future__ import annotations

from flask import Blueprint, Response

from app.http.artifacts import empty, store_upload
from app.http.routes import WRITE, download, route
from app.http.targets import (QUERY_NAMESPACE, QUERY_TENANT, PathKey, PathNamespace, PathTenant,
                              Target, Targets)

bp = Blueprint("gradle", __name__)
PRODUCER = "gradle"
MAX_BYTES = 100 * 1024 * 1024
TEMPLATE = "/api/cache/gradle/{cache_key}"
PATH_TEMPLATE = "/gradle/{tenant_id}/{namespace_id}/{cache_key}"
KEY = PathKey("cache_key", "cache key")
TARGET = Targets(QUERY_TENANT, QUERY_NAMESPACE, KEY)
PATH_TARGET = Targets(PathTenant(), PathNamespace(), KEY)


@route(bp, TEMPLATE, methods=["PUT"], operation=WRITE, producer=PRODUCER, target=TARGET)
@route(bp, PATH_TEMPLATE, methods=["PUT"], operation=WRITE, producer=PRODUCER, target=PATH_TARGET,
       name="put_by_path", trailing_slash=True)
def put(target: Target) -> Response:
    result = store_upload(PRODUCER, target.namespace_id, target.key, MAX_BYTES,
                          "Payload exceeds 100MB limit")
    return empty(201 if result.created else 200)


download(bp, TEMPLATE, producer=PRODUCER, target=TARGET)
download(bp, PATH_TEMPLATE, producer=PRODUCER, target=PATH_TARGET, name="get_by_path",
         trailing_slash=True)
