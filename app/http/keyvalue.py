"""Xcode key-value entries (Tuist): small JSON documents keyed by CAS id."""
from __future__ import annotations

import json

from flask import Blueprint, Response, request

from app.errors import BadRequest, TooLarge
from app.http import params
from app.http.artifacts import empty, serve_artifact, store_document
from app.http.services import services
from app.storage.keys import validate_component

bp = Blueprint("keyvalue", __name__)
PRODUCER = "xcode"
KEY_PREFIX = "action_cache/"
CONTENT_TYPE = "application/json"


def _parse(raw: bytes) -> tuple[str, bytes]:
    def invalid(detail: str) -> BadRequest:
        return BadRequest(f"Invalid key-value payload: {detail}")

    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"malformed JSON ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise invalid("expected a JSON object")
    cas_id = doc.get("cas_id")
    if not isinstance(cas_id, str) or not cas_id:
        raise invalid("cas_id must be a non-empty string")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise invalid("entries must be a list")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), str):
            raise invalid("each entry must be an object with a string value")
    try:
        validate_component(cas_id, "cas_id")
    except BadRequest as exc:
        raise invalid(exc.message) from None
    return cas_id, json.dumps({"entries": entries}, separators=(",", ":")).encode()


@bp.put("/api/cache/keyvalue")
def put_entry() -> Response:
    params.tenant_id()
    namespace = params.namespace_id()
    limit = services().settings.max_keyvalue_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        raise TooLarge(f"Key-value payload exceeds {limit} bytes")
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise TooLarge(f"Key-value payload exceeds {limit} bytes")
    if declared is not None and len(raw) != declared:
        raise BadRequest(f"Incomplete body: received {len(raw)} of {declared} bytes")
    cas_id, document = _parse(raw)
    store_document(PRODUCER, namespace, KEY_PREFIX + cas_id, document)
    return empty(204)


@bp.get("/api/cache/keyvalue/<cas_id>")
def get_entry(cas_id: str) -> Response:
    params.tenant_id()
    key = KEY_PREFIX + validate_component(cas_id, "cas_id")
    return serve_artifact(PRODUCER, params.namespace_id(), key, "Key-value entry not found",
                          content_type=CONTENT_TYPE)
