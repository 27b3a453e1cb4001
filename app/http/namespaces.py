"""Namespace clean: tombstone + delete every artifact of a namespace, replicated."""
from __future__ import annotations

import logging

from flask import Blueprint, Response

from app.http import params
from app.http.artifacts import empty
from app.http.services import store

bp = Blueprint("namespaces", __name__)
log = logging.getLogger("kura.http")


@bp.delete("/api/cache/clean")
def clean() -> Response:
    params.tenant_id()
    namespace = params.namespace_id()
    version = store().delete_namespace(namespace)
    log.info("event=namespace_cleaned namespace=%r version_ms=%d", namespace, version)
    return empty(204)
