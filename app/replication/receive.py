"""Receiving artifact versions from a peer: validate, stage, apply last-writer-wins.

Used by the internal API (a peer's outbox delivery) and by bootstrap (bodies pulled
from a peer). Bodies are streamed into one staged file (never whole in memory), the
stream must end exactly at a frame boundary, and only then does
``ArtifactStore.apply_replicated`` publish the winning versions in one durable
commit. A truncated or malformed stream applies nothing.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from app import metrics
from app.errors import BadRequest
from app.replication.frames import FrameReader
from app.storage.keys import MAX_KEY_BYTES, PRODUCERS, parse_decimal, validate_component
from app.storage.manifest import stored_headers
from app.storage.staging import StagedBody
from app.storage.store import ArtifactStore, ReplicatedArtifact, WriteResult

MAX_ARTIFACT_BYTES = 1 << 40
MAX_CONTENT_TYPE = 256
SOURCE_REPLICATION = "replication"
SOURCE_BOOTSTRAP = "bootstrap"


@dataclass
class Received:
    """What one stream carried and what became of it."""

    outcomes: Counter = field(default_factory=Counter)
    artifacts: int = 0
    missing: int = 0
    bytes: int = 0

    @property
    def applied(self) -> int:
        return self.outcomes["applied"]


def artifact_from_fields(fields: dict[str, Any], body: bytes | tuple[int, int] = b"") -> ReplicatedArtifact:
    """Validate a peer's manifest fields (frame header or Kura's query parameters)."""
    producer = fields.get("producer")
    if producer not in PRODUCERS:
        raise BadRequest(f"Invalid producer {str(producer)[:40]!r}")
    namespace = fields.get("namespace_id", "")
    key = fields.get("key")
    content_type = fields.get("content_type") or "application/octet-stream"
    origin = fields.get("origin") or ""
    if not isinstance(namespace, str) or not isinstance(key, str) or not isinstance(origin, str):
        raise BadRequest("Invalid replicated artifact: namespace_id, key and origin must be strings")
    validate_component(namespace, "namespace_id", allow_slash=True, allow_empty=True)
    validate_component(key, "key", allow_slash=True)
    if (not isinstance(content_type, str) or len(content_type) > MAX_CONTENT_TYPE
            or any(ord(c) < 32 or ord(c) == 127 for c in content_type)):
        raise BadRequest("Invalid content_type")
    if len(origin.encode()) > MAX_KEY_BYTES:
        raise BadRequest("Invalid origin")
    version = _integer(fields.get("version_ms"), "version_ms", minimum=1)
    size = _integer(fields.get("size"), "size", minimum=0, maximum=MAX_ARTIFACT_BYTES)
    inline = fields.get("inline", False)
    if isinstance(inline, str) and inline in ("true", "false"):
        inline = inline == "true"
    if not isinstance(inline, bool):
        raise BadRequest("Invalid inline: expected true or false")
    headers = stored_headers(fields.get("headers", {}))
    return ReplicatedArtifact(producer, namespace, key, content_type, version, origin, size,
                              inline, body, headers)


def _integer(value: Any, name: str, minimum: int, maximum: int = 1 << 62) -> int:
    if isinstance(value, str):
        value = parse_decimal(value, name, minimum=minimum, maximum=maximum)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise BadRequest(f"Invalid {name}")
    return value


def count_outcomes(source: str, results: Iterable[WriteResult], into: Counter | None = None) -> None:
    for result in results:
        metrics.REPLICATION_APPLY_RESULTS.labels(source, "artifact", result.outcome).inc()
        if into is not None:
            into[result.outcome] += 1


def receive_frames(store: ArtifactStore, read: Callable[[int], bytes], source: str,
                   staged: StagedBody) -> Received:
    """Stage every artifact of a frame stream into ``staged``, then apply them together.
    The caller owns (and closes) ``staged``; it may have reserved budget up front."""
    reader = FrameReader(read)
    items: list[ReplicatedArtifact] = []
    received = Received()
    for header in reader.headers():
        kind = header.get("t")
        if kind == "missing":
            received.missing += 1
            continue
        if kind != "artifact":
            raise BadRequest(f"Invalid frame type {str(kind)[:40]!r}")
        item = artifact_from_fields(header)
        offset = staged.size
        reader.copy_body(item.size, staged.write)
        items.append(replace(item, body=(staged.fd, offset)))
        received.bytes += item.size
    staged.finish()
    received.artifacts = len(items)
    if items:
        count_outcomes(source, store.apply_replicated(items, staged=staged), received.outcomes)
    return received
