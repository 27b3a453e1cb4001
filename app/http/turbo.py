"""Turborepo remote cache (Vercel's ``/v8/artifacts`` API, as ``turbo`` calls it).

``PUT|GET|HEAD /v8/artifacts/{hash}``, ``POST /v8/artifacts`` (what is known about several
hashes), ``GET /v8/artifacts/status`` and ``POST /v8/artifacts/events`` (usage events:
accepted and dropped). The team (``teamId``, else ``slug``) is the namespace, ``turbo``
without one; Turborepo sends no tenant, so the hooks see the node's tenant (as for Nx).
The ``Authorization: Bearer`` token reaches the hooks in ``ctx.headers``.

An upload's ``x-artifact-duration`` (the task's run time, ms) and ``x-artifact-tag`` (the
client's signature of the artifact) are kept with it (``Manifest.headers``), replicated
with it and sent back with every download, the fast path's too. Errors keep
``message`` and add Vercel's ``{"error": {"code", "message"}}``, which ``turbo`` reads: a
hook's 403 is ``forbidden`` ("Insufficient permissions to write to remote cache").
"""
from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from flask import Blueprint, Response, jsonify, request

from app.errors import BadRequest
from app.extensions.context import CAPABILITIES_READ, REQUEST
from app.http.artifacts import store_upload
from app.http.bodies import decode_json, read_document
from app.http.errors import register_blueprint_errors
from app.http.routes import INSPECT, WRITE, download, route
from app.http.services import services, store
from app.http.targets import NODE_TENANT, KeyRead, PathKey, Sources, Target, Targets
from app.storage.keys import parse_decimal, validate_component
from app.storage.manifest import stored_headers

bp = Blueprint("turbo", __name__)
PRODUCER = "turbo"
DEFAULT_NAMESPACE = "turbo"
MAX_BYTES = 2 * 1024 * 1024 * 1024
MAX_QUERY_HASHES = 1000
MAX_DURATION_MS = (1 << 53) - 1
TEMPLATE = "/v8/artifacts/{hash}"
DURATION = "x-artifact-duration"
TAG = "x-artifact-tag"
KEPT_HEADERS = (DURATION, TAG)
# Paths of their own under /v8/artifacts/: never an artifact's hash.
RESERVED_HASHES = frozenset({"status", "events"})


def error_document(status: int, message: str) -> dict[str, Any]:
    """Kura's ``message`` plus Vercel's error object (``turbo`` reads ``error.code``)."""
    try:
        code = HTTPStatus(status).phrase.lower().replace(" ", "_")  # 403: "forbidden"
    except ValueError:
        code = "error"
    return {"message": message, "error": {"code": code, "message": message}}


register_blueprint_errors(bp, error_document)


class TeamNamespace:
    """The namespace is the team: query ``teamId``, else ``slug``; ``turbo`` without one."""

    def read(self, s: Sources) -> str:
        for name in ("teamId", "slug"):
            team = s.query.get(name)
            if team:
                return validate_component(team, name)
        return DEFAULT_NAMESPACE


@dataclass(frozen=True)
class ArtifactHash:
    """The ``{hash}`` segment; ``status`` and ``events`` are routes, not hashes."""

    key: PathKey = PathKey("hash", "hash")

    def read(self, s: Sources) -> KeyRead:
        read = self.key.read(s)
        if read.key in RESERVED_HASHES:
            raise BadRequest(f"Invalid hash: {read.key!r} is reserved")
        return read


TEAM = Targets(NODE_TENANT, TeamNamespace())
ARTIFACT = Targets(NODE_TENANT, TeamNamespace(), ArtifactHash())


def _kept_headers() -> tuple[tuple[str, str], ...]:
    """The upload's headers kept with the artifact; ``BadRequest`` for a malformed one."""
    kept = {name: request.headers[name] for name in KEPT_HEADERS if name in request.headers}
    if DURATION in kept:
        kept[DURATION] = str(parse_decimal(kept[DURATION], DURATION, maximum=MAX_DURATION_MS))
    return stored_headers(kept)


@route(bp, TEMPLATE, methods=["PUT"], operation=WRITE, producer=PRODUCER, target=ARTIFACT)
def put(target: Target) -> Response:
    store_upload(PRODUCER, target.namespace_id, target.key or "", MAX_BYTES,
                 "Payload exceeds 2GB limit", content_type="application/octet-stream",
                 headers=_kept_headers())
    response = jsonify({"urls": [f"/v8/artifacts/{target.key}"]})
    response.status_code = 202
    return response


download(bp, TEMPLATE, producer=PRODUCER, target=ARTIFACT)


@route(bp, "/v8/artifacts", methods=["POST"], operation=INSPECT, producer=PRODUCER, target=TEAM)
def query(target: Target) -> Response:
    """``{"hashes": [...]}`` → each hash's ``{size, taskDurationMs[, tag]}``, null if absent."""
    doc = decode_json(read_document(services().settings.max_keyvalue_bytes, "Query too large"),
                      "Invalid artifact query")
    hashes = doc.get("hashes") if isinstance(doc, dict) else None
    if (not isinstance(hashes, list) or len(hashes) > MAX_QUERY_HASHES
            or not all(isinstance(h, str) for h in hashes)):
        raise BadRequest(f"Invalid artifact query: expected {{\"hashes\": [...]}} with at most "
                         f"{MAX_QUERY_HASHES} strings")
    found: dict[str, Any] = {}
    for artifact_hash in hashes:
        located = store().lookup(PRODUCER, target.namespace_id, validate_component(artifact_hash, "hash"))
        if located is None:
            found[artifact_hash] = None
            continue
        kept = dict(located.manifest.headers)
        info: dict[str, Any] = {"size": located.size, "taskDurationMs": int(kept.get(DURATION, 0))}
        if TAG in kept:
            info["tag"] = kept[TAG]
        found[artifact_hash] = info
    return jsonify(found)


@route(bp, "/v8/artifacts/status", methods=["GET"], operation=CAPABILITIES_READ, producer=PRODUCER,
       target=TEAM)
def status(target: Target) -> Response:
    return jsonify({"status": "enabled"})


@route(bp, "/v8/artifacts/events", methods=["POST"], operation=REQUEST, producer=PRODUCER,
       target=TEAM)
def events(target: Target) -> Response:
    """Cache usage events: checked to be a JSON array, then dropped."""
    doc = decode_json(read_document(services().settings.max_keyvalue_bytes, "Events too large"),
                      "Invalid events")
    if not isinstance(doc, list):
        raise BadRequest("Invalid events: expected a JSON array")
    return Response(b"", status=200)
