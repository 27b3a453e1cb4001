"""Nx self-hosted remote cache (OpenAPI ``/v1/cache/{hash}``).

Namespace ``nx`` unless ``namespace_id`` is given; ``/nx/{namespace_id}/v1/cache/{hash}``
gives per-project namespaces to clients that keep a base-URL path prefix. Nx sends no
tenant: the hooks see the node's tenant, as in Kura.
"""
from __future__ import annotations

from flask import Blueprint, Response

from app.http.artifacts import empty, store_upload
from app.http.routes import WRITE, download, route
from app.http.targets import NODE_TENANT, PathKey, PathNamespace, QueryNamespace, Target, Targets

bp = Blueprint("nx", __name__)
PRODUCER = "nx"
DEFAULT_NAMESPACE = "nx"
MAX_BYTES = 2 * 1024 * 1024 * 1024
TEMPLATE = "/v1/cache/{hash}"
NAMESPACED_TEMPLATE = "/nx/{namespace_id}/v1/cache/{hash}"
KEY = PathKey("hash", "hash")
TARGET = Targets(NODE_TENANT, QueryNamespace(DEFAULT_NAMESPACE), KEY)
NAMESPACED_TARGET = Targets(NODE_TENANT, PathNamespace(), KEY)


@route(bp, TEMPLATE, methods=["PUT"], operation=WRITE, producer=PRODUCER, target=TARGET)
@route(bp, NAMESPACED_TEMPLATE, methods=["PUT"], operation=WRITE, producer=PRODUCER,
       target=NAMESPACED_TARGET, name="put_in_namespace")
def put(target: Target) -> Response:
    store_upload(PRODUCER, target.namespace_id, target.key, MAX_BYTES, "Payload exceeds 2GB limit")
    return empty(200)


download(bp, TEMPLATE, producer=PRODUCER, target=TARGET)
download(bp, NAMESPACED_TEMPLATE, producer=PRODUCER, target=NAMESPACED_TARGET, name="get_in_namespace")
