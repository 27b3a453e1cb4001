"""Nx self-hosted remote cache (OpenAPI ``/v1/cache/{hash}``).

Namespace ``nx`` unless ``namespace_id`` is given; ``/nx/{namespace_id}/v1/cache/{hash}``
gives per-project namespaces to clients that keep a base-URL path prefix.
"""
from __future__ import annotations

from flask import Blueprint, Response

from app.http import params
from app.http.artifacts import empty, serve_artifact, store_upload
from app.storage.keys import validate_component

bp = Blueprint("nx", __name__)
PRODUCER = "nx"
DEFAULT_NAMESPACE = "nx"
MAX_BYTES = 2 * 1024 * 1024 * 1024


def _put(namespace: str, hash_: str) -> Response:
    store_upload(PRODUCER, namespace, validate_component(hash_, "hash"), MAX_BYTES,
                 "Payload exceeds 2GB limit")
    return empty(200)


@bp.put("/v1/cache/<hash_>")
def put(hash_: str) -> Response:
    return _put(params.namespace_id(DEFAULT_NAMESPACE), hash_)


@bp.get("/v1/cache/<hash_>")
def get(hash_: str) -> Response:
    return serve_artifact(PRODUCER, params.namespace_id(DEFAULT_NAMESPACE),
                          validate_component(hash_, "hash"))


@bp.put("/nx/<namespace>/v1/cache/<hash_>")
def put_in_namespace(namespace: str, hash_: str) -> Response:
    return _put(params.path_namespace(namespace), hash_)


@bp.get("/nx/<namespace>/v1/cache/<hash_>")
def get_in_namespace(namespace: str, hash_: str) -> Response:
    return serve_artifact(PRODUCER, params.path_namespace(namespace), validate_component(hash_, "hash"))
