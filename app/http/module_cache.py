"""Tuist module cache: multipart uploads of built modules, then HEAD/GET by hash + name."""
from __future__ import annotations

import json
import re

from flask import Blueprint, Response, jsonify, request

from app import metrics
from app.errors import BadRequest, TooLarge
from app.http import params
from app.http.artifacts import empty, serve_artifact
from app.http.bodies import receive_body
from app.http.services import services, store
from app.storage.keys import validate_component
from app.storage.multipart import MAX_PART_BYTES

bp = Blueprint("module_cache", __name__)
PRODUCER = "module"
NO_BODY_VERSION = (4, 202, 0)  # clients from here on understand 204 for "already cached"
MAX_PART_NUMBER = 10_000
MAX_COMPLETE_BODY = 1024 * 1024  # {"parts": [1..10000]} is ~60 KiB
_VERSION = re.compile(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def _module_key() -> str:
    hash_ = validate_component(params.required_query("hash"), "hash")
    name = validate_component(params.required_query("name"), "name")
    category = validate_component(request.args.get("cache_category") or "builds", "cache_category")
    return f"{category}/{hash_}/{name}"


def _supports_no_content(header: str | None) -> bool:
    """``x-tuist-cli-version`` >= 4.202.0; a pre-release suffix (``-rc.1``) is ignored."""
    match = _VERSION.match(header or "")
    if not match:
        return False
    version = tuple(int(part) if part else 0 for part in match.groups())
    return version >= NO_BODY_VERSION


def _upload_id() -> str:
    return validate_component(params.required_query("upload_id"), "upload_id")


@bp.post("/api/cache/module/start")
def start() -> Response:
    params.tenant_id()
    namespace = params.namespace_id()
    key = _module_key()
    if store().exists(PRODUCER, namespace, key):
        metrics.ARTIFACT_WRITES.labels(PRODUCER, "exists").inc()
        if _supports_no_content(request.headers.get("x-tuist-cli-version")):
            return empty(204)
        return jsonify({"upload_id": None})
    store().check_write_budget()
    return jsonify({"upload_id": services().uploads.start(PRODUCER, namespace, key)})


@bp.post("/api/cache/module/part")
def part() -> Response:
    upload_id = _upload_id()
    raw_number = request.args.get("part_number", "")
    if not raw_number.isdigit() or not 1 <= int(raw_number) <= MAX_PART_NUMBER:
        raise BadRequest("Invalid part_number")
    uploads = services().uploads
    uploads.get(upload_id)  # 404 before reading the body
    with receive_body(MAX_PART_BYTES, "Part exceeds 10MB limit") as staged:
        uploads.put_part(upload_id, int(raw_number), staged)
    return empty(204)


@bp.post("/api/cache/module/complete")
def complete() -> Response:
    upload_id = _upload_id()
    uploads = services().uploads
    uploads.get(upload_id)
    raw = request.stream.read(MAX_COMPLETE_BODY + 1)
    if len(raw) > MAX_COMPLETE_BODY:
        raise TooLarge("Complete request body too large")
    try:
        doc = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("Invalid JSON body") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("parts"), list):
        raise BadRequest("Parts mismatch or missing parts")
    result = uploads.complete(upload_id, doc["parts"])
    metrics.ARTIFACT_WRITES.labels(PRODUCER, "created" if result.created else "updated").inc()
    return empty(204)


@bp.route("/api/cache/module/<module_id>", methods=["GET", "HEAD"])
def download(module_id: str) -> Response:
    params.tenant_id()
    namespace = params.namespace_id()
    key = _module_key()
    if request.method == "HEAD":
        if not store().exists(PRODUCER, namespace, key):
            metrics.ARTIFACT_READS.labels(PRODUCER, "miss").inc()
            return empty(404)
        return empty(204)
    return serve_artifact(PRODUCER, namespace, key)
