"""Tuist module cache: multipart uploads of built modules, then HEAD/GET by hash + name.

Every route names its tenant (``tenant_id``, as Tuist's cache API requires even on
``part`` and ``complete``). ``part`` and ``complete`` write into the upload that ``start``
opened, so what they address (namespace, key, hash) is read from that upload, not from
the query: the hooks authorize the namespace that is actually written.
"""
from __future__ import annotations

import re

from flask import Blueprint, Response, jsonify, request

from app import metrics
from app.errors import BadRequest, NotFound, TooLarge, Unprocessable
from app.http.artifacts import empty, serve_artifact
from app.http.bodies import decode_json, read_document, receive_body
from app.http.routes import READ, WRITE, route
from app.http.services import services, store
from app.http.targets import QUERY_NAMESPACE, QUERY_TENANT, KeyRead, Sources, Target, Targets
from app.storage.keys import decimal_value, parse_decimal, validate_component
from app.storage.multipart import MAX_PART_BYTES, Upload

bp = Blueprint("module_cache", __name__)
PRODUCER = "module"
NO_BODY_VERSION = (4, 202, 0)  # clients from here on understand 204 for "already cached"
MAX_PART_NUMBER = 10_000
MAX_COMPLETE_BODY = 1024 * 1024  # {"parts": [1..10000]} is ~60 KiB
_VERSION = re.compile(r"^\s*v?([0-9]+)(?:\.([0-9]+))?(?:\.([0-9]+))?")
_VERSION_PART_MAX = 10**9


class ModuleKey:
    """``{cache_category}/{hash}/{name}`` from the query (``cache_category`` defaults to builds)."""

    def read(self, s: Sources) -> KeyRead:
        hash_ = validate_component(s.query.required("hash"), "hash")
        name = validate_component(s.query.required("name"), "name")
        category = validate_component(s.query.get("cache_category") or "builds", "cache_category")
        return KeyRead(f"{category}/{hash_}/{name}", hash_)


MODULE_TARGET = Targets(QUERY_TENANT, QUERY_NAMESPACE, ModuleKey())


class UploadTarget:
    """``part`` / ``complete``: the tenant from the query, the rest from the open upload.

    An unknown ``upload_id`` leaves the key empty (the hooks still run, with the query's
    namespace); the view then answers 404 ``Upload not found``.
    """

    def parse(self, s: Sources) -> Target:
        tenant = QUERY_TENANT.read(s)
        upload_id = validate_component(s.query.required("upload_id"), "upload_id")
        assert s.uploads is not None, "module uploads need the node's multipart store"
        try:
            upload = s.uploads.get(upload_id)
        except NotFound:
            return Target(tenant, QUERY_NAMESPACE.read(s), None, None, s.query)
        return Target(tenant, upload.namespace_id, upload.key, upload.key.split("/")[1], s.query,
                      upload=upload)


UPLOAD_TARGET = UploadTarget()


def _supports_no_content(header: str | None) -> bool:
    """``x-tuist-cli-version`` >= 4.202.0; a pre-release suffix (``-rc.1``) is ignored."""
    match = _VERSION.match(header or "")
    if not match:
        return False
    version = tuple(decimal_value(part or "0", _VERSION_PART_MAX) for part in match.groups())
    if None in version:
        return False  # a component no real version has: an old client's answer is the safe one
    return version >= NO_BODY_VERSION


def _open_upload(target: Target) -> Upload:
    if target.upload is None:
        raise NotFound("Upload not found")
    return target.upload


@route(bp, "/api/cache/module/start", methods=["POST"], operation=WRITE, producer=PRODUCER,
       target=MODULE_TARGET)
def start(target: Target) -> Response:
    if store().exists(PRODUCER, target.namespace_id, target.key):
        metrics.artifact_write(PRODUCER, metrics.EXISTS)
        if _supports_no_content(request.headers.get("x-tuist-cli-version")):
            return empty(204)
        return jsonify({"upload_id": None})
    store().check_write_budget()
    return jsonify({"upload_id": services().uploads.start(PRODUCER, target.namespace_id, target.key)})


@route(bp, "/api/cache/module/part", methods=["POST"], operation=WRITE, producer=PRODUCER,
       target=UPLOAD_TARGET)
def part(target: Target) -> Response:
    try:
        upload = _open_upload(target)  # 404 before reading the body
        number = parse_decimal(target.query.get("part_number", ""), "part_number",
                               minimum=1, maximum=MAX_PART_NUMBER)
        with receive_body(MAX_PART_BYTES, "Part exceeds 10MB limit") as staged:
            services().uploads.put_part(upload.upload_id, number, staged)
    except Exception as exc:
        metrics.MULTIPART_PARTS.labels(_part_result(exc)).inc()
        raise
    metrics.MULTIPART_PARTS.labels(metrics.OK).inc()
    return empty(204)


def _part_result(exc: BaseException) -> str:
    """Kura's ``kura_multipart_parts_total`` result for a part that failed."""
    if isinstance(exc, NotFound):
        return metrics.NOT_FOUND
    if isinstance(exc, (TooLarge, Unprocessable)):  # the part (413) or the upload (422)
        return metrics.TOO_LARGE
    return metrics.failed_write_result(exc)


@route(bp, "/api/cache/module/complete", methods=["POST"], operation=WRITE, producer=PRODUCER,
       target=UPLOAD_TARGET)
def complete(target: Target) -> Response:
    upload = _open_upload(target)
    try:
        raw = read_document(MAX_COMPLETE_BODY, "Complete request body too large")
        doc = decode_json(raw, "Invalid JSON body") if raw else None
        if not isinstance(doc, dict) or not isinstance(doc.get("parts"), list):
            raise BadRequest("Parts mismatch or missing parts")
        services().uploads.complete(upload.upload_id, doc["parts"])
    except Exception as exc:
        metrics.artifact_write(PRODUCER, metrics.failed_write_result(exc))
        raise
    metrics.artifact_write(PRODUCER, metrics.OK, upload.total_bytes)
    return empty(204)


@route(bp, "/api/cache/module/{id}", methods=["GET", "HEAD"], operation=READ, producer=PRODUCER,
       target=MODULE_TARGET)
def download(target: Target) -> Response:
    # ``{id}`` is ignored: the module is named by the query.
    if request.method == "HEAD":
        if not store().exists(PRODUCER, target.namespace_id, target.key):
            metrics.artifact_read(PRODUCER, metrics.NOT_FOUND)
            return empty(404)
        metrics.artifact_read(PRODUCER, metrics.OK)
        return empty(204)
    return serve_artifact(PRODUCER, target.namespace_id, target.key)
