"""Namespace clean: tombstone + delete every artifact of a namespace, replicated."""
from __future__ import annotations

import logging

from flask import Blueprint, Response

from app.http.artifacts import empty
from app.http.routes import NAMESPACE_DELETE, route
from app.http.services import store
from app.http.targets import QUERY_NAMESPACE, QUERY_TENANT, Target, Targets

bp = Blueprint("namespaces", __name__)
log = logging.getLogger("kura.http")


@route(bp, "/api/cache/clean", methods=["DELETE"], operation=NAMESPACE_DELETE,
       target=Targets(QUERY_TENANT, QUERY_NAMESPACE))
def clean(target: Target) -> Response:
    version = store().delete_namespace(target.namespace_id)
    log.info("event=namespace_cleaned namespace=%r version_ms=%d", target.namespace_id, version)
    return empty(204)
