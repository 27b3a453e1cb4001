"""Xcode key-value entries (Tuist): small JSON documents keyed by CAS id.

As in Kura, the stored document is exactly ``{"entries":[{"value":...},...]}``: ``cas_id``
and any other field, at the top or inside an entry, are dropped.
"""
from __future__ import annotations

import json

from flask import Blueprint, Response

from app.errors import BadRequest
from app.http.artifacts import empty, store_document
from app.http.bodies import decode_json
from app.http.routes import WRITE, download, route
from app.http.targets import QUERY_NAMESPACE, QUERY_TENANT, KeyRead, PathKey, Sources, Target, Targets
from app.storage.keys import validate_component

bp = Blueprint("keyvalue", __name__)
PRODUCER = "xcode"
KEY_PREFIX = "action_cache/"
CONTENT_TYPE = "application/json"
INVALID = "Invalid key-value payload"


def _invalid(detail: str) -> BadRequest:
    return BadRequest(f"{INVALID}: {detail}")


def parse_document(raw: bytes) -> tuple[str, bytes]:
    """``(cas_id, document as stored)`` from a PUT body."""
    doc = decode_json(raw, INVALID)
    if not isinstance(doc, dict):
        raise _invalid("expected a JSON object")
    cas_id = doc.get("cas_id")
    if not isinstance(cas_id, str) or not cas_id:
        raise _invalid("cas_id must be a non-empty string")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise _invalid("entries must be a list")
    values = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), str):
            raise _invalid("each entry must be an object with a string value")
        values.append({"value": entry["value"]})
    try:
        validate_component(cas_id, "cas_id")
    except BadRequest as exc:
        raise _invalid(exc.message) from None
    # Kura (serde_json) writes compact UTF-8; so do we, byte for byte.
    stored = json.dumps({"entries": values}, separators=(",", ":"), ensure_ascii=False)
    return cas_id, stored.encode("utf-8")


class DocumentKey:
    """The PUT's key is ``action_cache/{cas_id}`` from its JSON body, read whole (it is small)."""

    def read(self, s: Sources) -> KeyRead:
        assert s.read_body is not None, "keyvalue PUT needs the request body"
        limit = s.max_document_bytes
        cas_id, document = parse_document(s.read_body(limit, f"Key-value payload exceeds {limit} bytes"))
        return KeyRead(KEY_PREFIX + cas_id, None, document)


@route(bp, "/api/cache/keyvalue", methods=["PUT"], operation=WRITE, producer=PRODUCER,
       target=Targets(QUERY_TENANT, QUERY_NAMESPACE, DocumentKey()))
def put_entry(target: Target) -> Response:
    assert target.document is not None
    store_document(PRODUCER, target.namespace_id, target.key, target.document)
    return empty(204)


download(bp, "/api/cache/keyvalue/{cas_id}", producer=PRODUCER, name="get_entry",
         target=Targets(QUERY_TENANT, QUERY_NAMESPACE, PathKey("cas_id", "cas_id", prefix=KEY_PREFIX,
                                                               hashed=False)),
         not_found="Key-value entry not found", content_type=CONTENT_TYPE)
