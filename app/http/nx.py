"""Nx self-hosted remote cache (OpenAPI ``/v1/cache/{hash}``).

Namespace ``nx`` unless ``namespace_id`` is given; ``/nx/{namespace_id}/v1/cache/{hash}``
gives per-project namespaces to clients that keep a base-URL path prefix. Nx sends no
tenant: the hooks see the node's tenant, as in Kura.
"""
from __future__ import annotations

from flask import Blueprint, Response

from app.http.artifacts import empty, serve_artifact, store_upload
from app.http.routes import READ, WRITE, route
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


def _put(target: Target) -> Response:
    store_upload(PRODUCER, target.namespace_id, target.key, MAX_BYTES, "Payload exceeds 2GB limit")
    return empty(200)


@route(bp, TEMPLATE, methods=["PUT"], operation=WRITE, producer=PRODUCER, target=TARGET)
def put(target: Target) -> Response:
    return _put(target)


@route(bp, TEMPLATE, methods=["GET"], operation=READ, producer=PRODUCER, target=TARGET,
       fast_path=True)
def get(target: Target) -> Response:
    return serve_artifact(PRODUCER, target.namespace_id, target.key)


@route(bp, NAMESPACED_TEMPLATE, methods=["PUT"], operation=WRITE, producer=PRODUCER,
       target=NAMESPACED_TARGET)
def put_in_namespace(target: Target) -> Response:
    return _put(target)


@route(bp, NAMESPACED_TEMPLATE, methods=["GET"], operation=READ, producer=PRODUCER,
       target=NAMESPACED_TARGET, fast_path=True)
def get_in_namespace(target: Target) -> Response:
    return serve_artifact(PRODUCER, target.namespace_id, target.key)
