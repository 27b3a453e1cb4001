"""Read-only listings of what a node holds, for peers that bootstrap from it.

A joining node asks a peer for its namespace tombstones, then for a digest of its
manifests per bucket (artifact-id prefix), and lists manifests only in the buckets
whose digests differ from its own. Everything here is a read transaction over the
store's LMDB; nothing is cached, so answers are always current. Only visible
artifacts are listed (a manifest behind a newer namespace tombstone is not).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import lmdb

from app.errors import BadRequest
from app.storage.lmdb_env import Databases, namespace_key
from app.storage.manifest import Manifest

MAX_PAGE = 1000
MAX_PREFIX_LEN = 8
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class ManifestEntry:
    artifact_id: str  # hex
    manifest: Manifest

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        doc = {"artifact_id": self.artifact_id, "producer": m.producer,
               "namespace_id": m.namespace_id, "key": m.key, "content_type": m.content_type,
               "inline": m.inline, "size": m.size, "version_ms": m.version_ms, "origin": m.origin}
        if m.headers:
            doc["headers"] = dict(m.headers)
        return doc


def check_prefix(prefix: str, what: str = "prefix") -> str:
    prefix = prefix.lower()
    if len(prefix) > MAX_PREFIX_LEN or not set(prefix) <= _HEX:
        raise BadRequest(f"Invalid {what}: expected up to {MAX_PREFIX_LEN} hex characters")
    return prefix


def _start_key(prefix: str) -> bytes:
    return bytes.fromhex(prefix + "0" * (len(prefix) % 2))


class Catalog:
    def __init__(self, env: lmdb.Environment, dbs: Databases) -> None:
        self._env = env
        self._dbs = dbs

    def tombstones_page(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """Namespace tombstones ordered by their key; ``next_after`` is None on the last page."""
        limit = max(1, min(limit, MAX_PAGE))
        if after and (len(after) != 32 or not set(after.lower()) <= _HEX):
            raise BadRequest("Invalid after: expected a cursor from a previous page")
        start = bytes.fromhex(after) if after else b""
        rows: list[dict[str, Any]] = []
        last = None
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._dbs.ns_tombstones)
            if not cursor.set_range(start):
                return [], None
            for key, raw in cursor:
                if key == start and after:
                    continue
                if len(rows) >= limit:
                    return rows, last
                doc = json.loads(raw)
                rows.append({"namespace_id": doc["ns"], "version_ms": doc["v"]})
                last = key.hex()
        return rows, None

    def manifests_page(self, after: str | None, limit: int, prefix: str = ""
                       ) -> tuple[list[ManifestEntry], str | None]:
        """Visible manifests ordered by artifact id, restricted to ids starting with the hex
        ``prefix``, strictly after the hex id ``after``."""
        limit = max(1, min(limit, MAX_PAGE))
        prefix = check_prefix(prefix)
        start = _start_key(prefix)
        if after:
            if len(after) != 64 or not set(after.lower()) <= _HEX:
                raise BadRequest("Invalid after: expected an artifact id (64 hex characters)")
            after = after.lower()
            start = max(start, bytes.fromhex(after))
        entries: list[ManifestEntry] = []
        with self._env.begin() as txn:
            tombs = _TombstoneCache(txn, self._dbs)
            cursor = txn.cursor(db=self._dbs.manifests)
            if not cursor.set_range(start):
                return [], None
            for aid, raw in cursor:
                hex_id = aid.hex()
                if not hex_id.startswith(prefix):
                    if hex_id > prefix:
                        break
                    continue
                if after and hex_id <= after:
                    continue
                manifest = Manifest.decode(raw)
                if manifest.version_ms <= tombs.version(manifest.namespace_id):
                    continue
                if len(entries) >= limit:
                    return entries, entries[-1].artifact_id
                entries.append(ManifestEntry(hex_id, manifest))
        return entries, None

    def bucket_digests(self, prefix_len: int) -> dict[str, dict[str, Any]]:
        """For every non-empty bucket (the first ``prefix_len`` hex characters of the
        artifact id): the number of visible artifacts and a hash of their versions in id
        order (Kura's: sha256 over each hex artifact id and its ``version_ms`` as 8 bytes
        little-endian; kura-py adds the origin when it breaks a tie). Two nodes holding the
        same versions in a bucket give the same answer, so a joining node skips it."""
        if not 1 <= prefix_len <= MAX_PREFIX_LEN:
            raise BadRequest(f"Invalid prefix_len: must be between 1 and {MAX_PREFIX_LEN}")
        buckets: dict[str, dict[str, Any]] = {}
        current = None
        count = 0
        digest = hashlib.sha256()

        def close() -> None:
            if current is not None and count:
                buckets[current] = {"count": count, "hash": digest.hexdigest()}

        with self._env.begin() as txn:
            tombs = _TombstoneCache(txn, self._dbs)
            for aid, raw in txn.cursor(db=self._dbs.manifests):
                manifest = Manifest.decode(raw)
                if manifest.version_ms <= tombs.version(manifest.namespace_id):
                    continue
                hex_id = aid.hex()
                bucket = hex_id[:prefix_len]
                if bucket != current:
                    close()
                    current, count, digest = bucket, 0, hashlib.sha256()
                count += 1
                digest.update(hex_id.encode() + manifest.version_ms.to_bytes(8, "little"))
                if manifest.origin:
                    digest.update(manifest.origin.encode() + b"\0")
        close()
        return buckets


class _TombstoneCache:
    """Tombstone versions by namespace id within one read transaction."""

    def __init__(self, txn: lmdb.Transaction, dbs: Databases) -> None:
        self._txn = txn
        self._db = dbs.ns_tombstones
        self._versions: dict[str, int] = {}

    def version(self, namespace_id: str) -> int:
        version = self._versions.get(namespace_id)
        if version is None:
            raw = self._txn.get(namespace_key(namespace_id), db=self._db)
            version = json.loads(raw)["v"] if raw else 0
            self._versions[namespace_id] = version
        return version
