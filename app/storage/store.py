"""The storage interface every frontend uses (HTTP blueprints, REAPI servicers, replicator).

Frontends parse and validate, then call this class; they never see LMDB or a
segment path. One instance per process, opened after any fork.

Invariant for every write: the body is in a segment and fdatasync'ed before
one short LMDB write transaction publishes manifest + indexes + outbox rows, and
the write is acknowledged only once that transaction is durable. Local writes of
one process (single artifacts and ``put_many`` batches) go through ``GroupCommit``,
so concurrent ones share those syncs and that transaction. Nothing may yield to
another greenlet while a write transaction is open.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Sequence

import lmdb

from app import metrics
from app.errors import BudgetExhausted, NotFound
from app.node_state import NodeState, state_path
from app.settings import Settings
from app.storage.keys import artifact_id as compute_artifact_id
from app.storage.keys import artifact_ids as compute_artifact_ids
from app.members import MemberList
from app.storage.catalog import Catalog
from app.storage.content_digests import SHA256
from app.storage.group_commit import GroupCommit
from app.storage.lmdb_env import (MULTIPART_BYTES, PARTIAL_UPLOAD_BYTES, Databases, namespace_key,
                                   open_environment, read_counter, u64, write_txn)
from app.storage.manifest import Manifest, version_order
from app.storage.outbox import Outbox
from app.storage.backpressure import DISK_FULL_MESSAGE, raise_if_disk_full
from app.storage.segments import (Extent, Offload, SegmentWriter, direct_call, publishable,
                                  segment_path)
from app.storage.staging import StagedBody, StagingArea

log = logging.getLogger("kura.storage")

DELETE_BATCH = 2000
ADOPT_MIN_BYTES = 8 * 1024 * 1024  # bodies from here on get a segment of their own
HOT_WATERMARK_REFRESH_S = 5.0
HOT_BATCH = 256
HOT_FLUSH_S = 1.0


@dataclass(frozen=True)
class Located:
    """A visible artifact: its manifest, and its body when stored inline."""

    artifact_id: bytes
    manifest: Manifest
    inline_body: bytes | None = None

    @property
    def size(self) -> int:
        return self.manifest.size


@dataclass
class _LocalWrites:
    """Read once per write transaction for the local writes to one namespace."""

    tombstone: int
    peers: tuple[str, ...]
    now_ms: int
    ns_key: bytes
    publishable: set[int] = field(default_factory=set)  # segments checked in this transaction


# Outcomes of applying a change that came from a peer (metric label values, Kura's names).
APPLIED = "applied"
IGNORED_STALE = "ignored_stale"  # we hold this version or a newer one
IGNORED_TOMBSTONE = "ignored_tombstone"  # its namespace was cleaned after it was written
IGNORED_OLDER = "ignored_older"  # a namespace delete older than the tombstone we hold


@dataclass(frozen=True)
class WriteResult:
    artifact_id: bytes
    created: bool  # no visible artifact existed under this key before
    version_ms: int
    outcome: str = APPLIED  # for replicated writes: APPLIED, IGNORED_STALE or IGNORED_TOMBSTONE

    @property
    def applied(self) -> bool:
        return self.outcome == APPLIED


@dataclass(frozen=True)
class ReplicatedArtifact:
    """One artifact version as a peer sent it (replication or bootstrap).

    ``body`` is where its bytes are on this node before they are applied: the bytes
    themselves (small and inline bodies) or ``(fd, offset)`` in a staged file.
    """

    producer: str
    namespace_id: str
    key: str
    content_type: str
    version_ms: int
    origin: str
    size: int
    inline: bool
    body: bytes | tuple[int, int] = b""
    headers: tuple[tuple[str, str], ...] = ()  # see ``Manifest.headers``

    @property
    def order(self) -> tuple[int, str]:
        return version_order(self.version_ms, self.origin)

    def manifest(self) -> Manifest:
        return Manifest(self.producer, self.namespace_id, self.key, self.content_type,
                        self.version_ms, self.size, origin=self.origin, headers=self.headers)


class ArtifactStore:
    def __init__(self, settings: Settings, *, node_state: NodeState | None = None,
                 offload: Offload = direct_call, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.tenant_id = settings.tenant_id
        self._clock = clock
        os.makedirs(settings.data_dir, exist_ok=True)
        self.node_state = node_state or NodeState(state_path(settings.resolved_run_dir))
        self.env, self.dbs = open_environment(settings.data_dir, settings.lmdb_map_size)
        self.segments_dir = os.path.join(settings.data_dir, "segments")
        self.segments = SegmentWriter(self.env, self.dbs, self.segments_dir,
                                      settings.segment_max_bytes, offload, clock)
        self.outbox = Outbox(self.env, self.dbs, settings.outbox_max_depth)
        self._commits = GroupCommit(self.env, self.segments, offload)
        self.catalog = Catalog(self.env, self.dbs)
        self.staging = StagingArea(os.path.join(settings.resolved_tmp_dir, "staging"),
                                   settings.tmp_dir_max_bytes, self.node_state,
                                   self._held_bytes)
        self.multipart_dir = os.path.join(settings.resolved_tmp_dir, "multipart")
        os.makedirs(self.multipart_dir, exist_ok=True)
        # Kept partial ByteStream uploads (app.storage.partial_uploads); not wiped at start.
        self.partial_uploads_dir = os.path.join(settings.resolved_tmp_dir, "uploads")
        os.makedirs(self.partial_uploads_dir, exist_ok=True)
        self.node_url = settings.resolved_node_url
        self._members = MemberList(settings.resolved_run_dir, self.node_url)
        self._hot_watermark = 0
        self._hot_checked = 0.0
        self._hot_pending: set[bytes] = set()
        self._hot_flushed = 0.0

    # -- identity ---------------------------------------------------------------
    @property
    def peers(self) -> tuple[str, ...]:
        """The mesh members a local write is replicated to (published by the replicator)."""
        return self._members.current()

    def artifact_id(self, producer: str, namespace_id: str, key: str) -> bytes:
        return compute_artifact_id(producer, self.tenant_id, namespace_id, key)

    def artifact_ids(self, producer: str, namespace_id: str, keys: Iterable[str]) -> list[bytes]:
        return compute_artifact_ids(producer, self.tenant_id, namespace_id, keys)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- reads --------------------------------------------------------------------
    @staticmethod
    def _tombstone(txn: lmdb.Transaction, dbs: Databases, namespace_id: str) -> int:
        raw = txn.get(namespace_key(namespace_id), db=dbs.ns_tombstones)
        return json.loads(raw)["v"] if raw else 0

    def _visible(self, txn: lmdb.Transaction, aid: bytes) -> Manifest | None:
        raw = txn.get(aid, db=self.dbs.manifests)
        if raw is None:
            return None
        manifest = Manifest.decode(raw)
        if manifest.version_ms <= self._tombstone(txn, self.dbs, manifest.namespace_id):
            return None
        return manifest

    def _located(self, txn: lmdb.Transaction, aid: bytes,
                 tombstone: int | None = None) -> Located | None:
        """``tombstone``: the artifact's namespace tombstone when the caller read it already."""
        if tombstone is None:
            manifest = self._visible(txn, aid)
        else:
            raw = txn.get(aid, db=self.dbs.manifests)
            manifest = None if raw is None else Manifest.decode(raw)
            if manifest is not None and manifest.version_ms <= tombstone:
                manifest = None
        if manifest is None:
            return None
        if not manifest.inline:
            return Located(aid, manifest)
        body = txn.get(aid, db=self.dbs.inline)
        return None if body is None else Located(aid, manifest, body)

    def lookup_id(self, aid: bytes) -> Located | None:
        with self.env.begin(buffers=False) as txn:
            return self._located(txn, aid)

    def manifest_for(self, aid: bytes) -> Manifest | None:
        """The stored manifest of ``aid`` if it is visible (not behind a namespace tombstone)."""
        with self.env.begin() as txn:
            return self._visible(txn, aid)

    def lookup(self, producer: str, namespace_id: str, key: str) -> Located | None:
        return self.lookup_id(self.artifact_id(producer, namespace_id, key))

    def exists(self, producer: str, namespace_id: str, key: str) -> bool:
        aid = self.artifact_id(producer, namespace_id, key)
        with self.env.begin() as txn:
            return self._visible(txn, aid) is not None

    def lookup_many(self, producer: str, namespace_id: str,
                    keys: Sequence[str]) -> list[Located | None]:
        """:meth:`lookup` of each key, in one read transaction."""
        aids = self.artifact_ids(producer, namespace_id, keys)
        with self.env.begin(buffers=False) as txn:
            tombstone = self._tombstone(txn, self.dbs, namespace_id)
            return [self._located(txn, aid, tombstone) for aid in aids]

    def missing(self, producer: str, namespace_id: str, keys: Sequence[str]) -> list[str]:
        """The subset of ``keys`` with no visible artifact, in one read transaction."""
        aids = self.artifact_ids(producer, namespace_id, keys)
        absent = []
        with self.env.begin() as txn:
            tomb = self._tombstone(txn, self.dbs, namespace_id)
            get = txn.get
            manifests = self.dbs.manifests
            for key, aid in zip(keys, aids):
                raw = get(aid, db=manifests)
                # Without a tombstone every stored manifest is visible: no need to decode it.
                if raw is None or (tomb and Manifest.decode(raw).version_ms <= tomb):
                    absent.append(key)
        return absent

    def open_body(self, located: Located) -> BinaryIO:
        """An unbuffered file positioned at the artifact's first byte (segment bodies only).

        The caller streams ``located.size`` bytes from it and closes it. If the
        segment was evicted after the lookup, the artifact is looked up again once
        (copy-forward may have moved it) before answering NotFound.
        """
        fd, located = self._open_segment(located)
        os.lseek(fd, located.manifest.offset, os.SEEK_SET)
        return os.fdopen(fd, "rb", buffering=0)

    def _open_segment(self, located: Located) -> tuple[int, Located]:
        """A read-only descriptor of the segment holding ``located``'s body, and where the
        body is (looked up again if its segment was evicted meanwhile; see ``open_body``)."""
        for attempt in (0, 1):
            try:
                fd = os.open(segment_path(self.segments_dir, located.manifest.segment_id), os.O_RDONLY)
            except FileNotFoundError:
                again = self.lookup_id(located.artifact_id)
                if again is None or again.manifest.inline or attempt:
                    raise NotFound("Artifact not found") from None
                located = again
                continue
            except OSError as exc:
                raise_if_disk_full(exc)
                raise
            self._note_read(located)
            return fd, located
        raise NotFound("Artifact not found")

    def read_bytes(self, located: Located, offset: int = 0, length: int | None = None) -> bytes:
        """Read (part of) a body into memory: for small bodies and bounded chunks only."""
        size = located.size
        length = size - offset if length is None else min(length, size - offset)
        if length <= 0:
            return b""
        if located.inline_body is not None:
            return located.inline_body[offset:offset + length]
        fd, located = self._open_segment(located)
        try:
            data = os.pread(fd, length, located.manifest.offset + offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise NotFound("Artifact not found")
        return data

    def read_many(self, located: Sequence[Located]) -> list[bytes | NotFound]:
        """The whole bodies of small artifacts (batch reads): each segment is opened once
        for all the bodies in it, and bodies stored back to back (a batch written together)
        are read with one pread. A body that cannot be read is NotFound in its place."""
        out: list[bytes | NotFound] = [b""] * len(located)
        by_segment: dict[int, list[int]] = {}
        for index, item in enumerate(located):
            if item.inline_body is not None:
                out[index] = item.inline_body
            elif item.size:
                by_segment.setdefault(item.manifest.segment_id, []).append(index)
        for segment_id, indexes in by_segment.items():
            try:
                fd = os.open(segment_path(self.segments_dir, segment_id), os.O_RDONLY)
            except FileNotFoundError:
                # Evicted since the lookup: each body is looked up again (it may have been
                # copied forward) and read on its own.
                for index in indexes:
                    out[index] = self._read_or_missing(located[index])
                continue
            except OSError as exc:
                raise_if_disk_full(exc)
                raise
            try:
                for run in _adjacent_runs(located, indexes):
                    first = located[run[0]].manifest.offset
                    last = located[run[-1]]
                    data = os.pread(fd, last.manifest.offset + last.size - first, first)
                    for index in run:
                        item = located[index]
                        start = item.manifest.offset - first
                        body = data[start:start + item.size] if len(run) > 1 else data
                        self._note_read(item)
                        out[index] = body if len(body) == item.size else NotFound("Artifact not found")
            finally:
                os.close(fd)
        return out

    def _read_or_missing(self, located: Located) -> bytes | NotFound:
        try:
            return self.read_bytes(located)
        except NotFound as exc:
            return exc

    def _note_read(self, located: Located) -> None:
        """Remember an artifact read from one of the oldest segments, so eviction copies it
        forward. Marks are batched into one write transaction (a lost batch only makes the
        LRU a little less exact); the watermark is 0 unless the store nears its capacity."""
        now = self._clock()
        if now - self._hot_checked > HOT_WATERMARK_REFRESH_S:
            with self.env.begin() as txn:
                self._hot_watermark = read_counter(txn, self.dbs.meta, b"hot_watermark")
            self._hot_checked = now
        segment_id = located.manifest.segment_id
        if not segment_id or segment_id > self._hot_watermark:
            return
        self._hot_pending.add(located.artifact_id)
        if len(self._hot_pending) >= HOT_BATCH or now - self._hot_flushed > HOT_FLUSH_S:
            self.flush_read_marks()

    def flush_read_marks(self) -> None:
        """Write the pending read marks. A read never fails for them: when they cannot be
        written (a full disk, an I/O error) they are dropped."""
        pending, self._hot_pending = self._hot_pending, set()
        self._hot_flushed = self._clock()
        if not pending:
            return
        try:
            with write_txn(self.env) as txn:
                for aid in pending:
                    txn.put(aid, b"", db=self.dbs.hot)
        except (BudgetExhausted, lmdb.Error) as exc:
            log.debug("event=read_marks_dropped count=%d error=%r", len(pending), str(exc))

    # -- writes -------------------------------------------------------------------
    def check_write_budget(self, *, staged: bool = True) -> None:
        """Cheap early rejection before a body is read (429 instead of wasted upload).
        ``staged``: the body will be staged in the tmp dir (not a small upload held in
        memory), so a full staging budget refuses it too."""
        if self.peers and self.outbox.depth() >= self.settings.outbox_max_depth:
            metrics.BACKPRESSURE.labels("outbox").inc()
            raise BudgetExhausted(
                f"replication outbox is full (KURA_OUTBOX_MAX_DEPTH={self.settings.outbox_max_depth})")
        if not staged:
            return
        try:
            self.staging.probe_writable()
        except BudgetExhausted:
            metrics.BACKPRESSURE.labels("tmp").inc()
            raise

    def stage(self, limit: int | None = None, too_large_message: str = "Payload too large",
              hashing: bool = True, digest_function: str = SHA256) -> StagedBody:
        return self.staging.stage(limit, too_large_message, hashing, digest_function)

    def put_staged(self, producer: str, namespace_id: str, key: str, staged: StagedBody,
                   content_type: str = "application/octet-stream", *,
                   headers: tuple[tuple[str, str], ...] = ()) -> WriteResult:
        """Publish a verified staged body (see ``StagedBody.finish``). A large body becomes a
        segment of its own by linking its staging file (no second copy of the bytes).
        ``headers``: see ``Manifest.headers``."""
        if staged.size >= ADOPT_MIN_BYTES:
            seg_id = self.segments.adopt(staged.fd, staged.size)
            if seg_id is not None:
                aid = self.artifact_id(producer, namespace_id, key)
                manifest = Manifest(producer, namespace_id, key, content_type, 0, staged.size, seg_id, 0,
                                    headers=headers)
                return self._commit(aid, manifest, None)
        return self.put_sources(producer, namespace_id, key, [(staged.fd, 0, staged.size)],
                                content_type, headers=headers)

    def put_sources(self, producer: str, namespace_id: str, key: str,
                    sources: Sequence[tuple[int, int, int]], content_type: str, *,
                    headers: tuple[tuple[str, str], ...] = ()) -> WriteResult:
        aid = self.artifact_id(producer, namespace_id, key)
        size = sum(length for _, _, length in sources)
        if not size:
            return self._commit(aid, Manifest(producer, namespace_id, key, content_type, 0, 0,
                                              headers=headers), b"")
        extent = self.segments.write(sources)
        manifest = Manifest(producer, namespace_id, key, content_type, 0, size, extent.segment_id,
                            extent.offset, headers=headers)
        return self._commit(aid, manifest, None, extent)

    def put_bytes(self, producer: str, namespace_id: str, key: str, data: bytes,
                  content_type: str = "application/octet-stream", *, inline: bool = True,
                  headers: tuple[tuple[str, str], ...] = ()) -> WriteResult:
        """Publish a verified body held in memory: inline in LMDB (documents), or copied
        into the active segment (small uploads). ``headers``: see ``Manifest.headers``."""
        aid = self.artifact_id(producer, namespace_id, key)
        if inline or not data:
            manifest = Manifest(producer, namespace_id, key, content_type, 0, len(data),
                                headers=headers)
            return self._commit(aid, manifest, data)
        extent = self.segments.write_bytes(data)
        manifest = Manifest(producer, namespace_id, key, content_type, 0, len(data),
                            extent.segment_id, extent.offset, headers=headers)
        return self._commit(aid, manifest, None, extent)

    def put_many(self, producer: str, namespace_id: str, items: Sequence[tuple[str, bytes]],
                 content_type: str = "application/octet-stream") -> list[WriteResult]:
        """Publish many small bodies with one segment append and one LMDB transaction (REAPI
        BatchUpdateBlobs): all of them or, on error, none. The group commit syncs the append
        and the transaction, shared with this process's other writes waiting meanwhile."""
        if not items:
            return []
        aids = self.artifact_ids(producer, namespace_id, [key for key, _ in items])
        body = b"".join(data for _, data in items)
        extent = self.segments.write_bytes(body) if body else None

        def apply(txn: lmdb.Transaction) -> list[WriteResult]:
            local = self._local_writes(txn, namespace_id)
            if extent is not None:
                # Checked before anything is written: a failure then leaves no row behind.
                self._require_publishable(txn, extent.segment_id, local)
            results = []
            offset = extent.offset if extent is not None else 0
            for (key, data), aid in zip(items, aids):
                if data:
                    manifest = Manifest(producer, namespace_id, key, content_type, 0, len(data),
                                        extent.segment_id, offset)  # type: ignore[union-attr]
                    results.append(self._commit_in(txn, aid, manifest, None, None, local))
                else:
                    manifest = Manifest(producer, namespace_id, key, content_type, 0, 0)
                    results.append(self._commit_in(txn, aid, manifest, b"", None, local))
                offset += len(data)
            return results

        return self._commits.commit(apply, extent)

    def _commit(self, aid: bytes, manifest: Manifest, inline_body: bytes | None,
                extent: Extent | None = None) -> WriteResult:
        """Publish one local write (its body, if in ``extent``, written but not yet synced)
        together with whatever other writes of this process are waiting (group commit). The
        mesh members are read here: the transaction may be filled in a thread of gevent's
        pool, where it touches LMDB only."""
        peers = self.peers
        return self._commits.commit(
            lambda txn: self._commit_in(txn, aid, manifest, inline_body, None,
                                        self._local_writes(txn, manifest.namespace_id, peers)),
            extent)

    def _replicated_outcome(self, txn: lmdb.Transaction, aid: bytes, namespace_id: str,
                            order: tuple[int, str]) -> str:
        """Would a peer's version ``order`` of ``aid`` win over what this node holds?"""
        if order[0] <= self._tombstone(txn, self.dbs, namespace_id):
            return IGNORED_TOMBSTONE
        raw = txn.get(aid, db=self.dbs.manifests)
        if raw is not None and order <= Manifest.decode(raw).order:
            return IGNORED_STALE
        return APPLIED

    def _local_writes(self, txn: lmdb.Transaction, namespace_id: str,
                      peers: tuple[str, ...] | None = None) -> _LocalWrites:
        """What the local writes to ``namespace_id`` in this write transaction share (to
        ``peers``, default the current mesh members); raises BudgetExhausted when the
        outbox is full."""
        if peers is None:
            peers = self.peers
        if peers:
            self.outbox.raise_if_full(txn)
        return _LocalWrites(self._tombstone(txn, self.dbs, namespace_id), peers, self.now_ms(),
                            namespace_key(namespace_id))

    def _commit_in(self, txn: lmdb.Transaction, aid: bytes, manifest: Manifest,
                   inline_body: bytes | None, replicated: tuple[int, str] | None,
                   local: _LocalWrites | None = None) -> WriteResult:
        """Manifest + indexes + outbox rows for one artifact, inside the caller's write txn.

        ``replicated`` is the ``(version_ms, origin)`` a peer gave this version: it is
        applied only if it wins last-writer-wins, and it creates no outbox rows (full
        mesh: the origin sends it to every peer itself). ``local``: for a local write, what
        the caller's other writes to the same namespace in this transaction read already."""
        dbs = self.dbs
        ns = manifest.namespace_id
        old_raw = txn.get(aid, db=dbs.manifests)
        old = Manifest.decode(old_raw) if old_raw else None
        if replicated is not None:
            tomb = self._tombstone(txn, dbs, ns)
            outcome = self._replicated_outcome(txn, aid, ns, replicated)
            if outcome != APPLIED:
                return WriteResult(aid, False, old.version_ms if old else tomb, outcome)
            manifest = manifest.versioned(*replicated)
            ns_key = namespace_key(ns)
        else:
            local = local or self._local_writes(txn, ns)
            tomb = local.tombstone
            version = max(local.now_ms, (old.version_ms + 1) if old else 0, tomb + 1)
            manifest = manifest.versioned(version, self.node_url)
            ns_key = local.ns_key
        old_visible = old is not None and old.version_ms > tomb
        segment_id = manifest.segment_id
        if segment_id:
            self._require_publishable(txn, segment_id, local)
        txn.put(aid, manifest.encode(), db=dbs.manifests)
        txn.put(ns_key + aid, b"", db=dbs.ns_index)
        if old is not None and old.segment_id and old.segment_id != segment_id:
            txn.delete(u64(old.segment_id) + aid, db=dbs.segment_index)
        if segment_id:
            txn.put(u64(segment_id) + aid, b"", db=dbs.segment_index)
            txn.delete(aid, db=dbs.inline)
        else:
            txn.put(aid, inline_body or b"", db=dbs.inline)
        txn.delete(aid, db=dbs.hot)
        if local is not None:
            self.outbox.enqueue(txn, local.peers,
                                {"op": "put", "aid": aid.hex(), "v": manifest.version_ms})
        return WriteResult(aid, not old_visible, manifest.version_ms)

    def _require_publishable(self, txn: lmdb.Transaction, segment_id: int,
                             local: _LocalWrites | None) -> None:
        """Raise BudgetExhausted when the evictor took ``segment_id`` between the append and
        this commit (it was the oldest and the disk needed its space): publishing would point
        at nothing. ``local`` remembers the segments checked in this transaction."""
        if local is not None and segment_id in local.publishable:
            return
        if not publishable(txn, self.dbs, segment_id):
            metrics.BACKPRESSURE.labels("disk").inc()
            raise BudgetExhausted(DISK_FULL_MESSAGE, retry_after_s=1)
        if local is not None:
            local.publishable.add(segment_id)

    def replicated_outcomes(self, items: Sequence[ReplicatedArtifact],
                            aids: Sequence[bytes] | None = None) -> list[str]:
        """What applying each peer version would do now (APPLIED: it would win), in one read
        transaction; bootstrap fetches only the bodies that would be applied."""
        if aids is None:
            aids = [self.artifact_id(i.producer, i.namespace_id, i.key) for i in items]
        with self.env.begin() as txn:
            return [self._replicated_outcome(txn, aid, i.namespace_id, i.order)
                    for aid, i in zip(aids, items)]

    def apply_replicated(self, items: Sequence[ReplicatedArtifact], *,
                         staged: StagedBody | None = None) -> list[WriteResult]:
        """Apply artifact versions a peer sent, last-writer-wins, durably, in one commit.

        Bodies that win are appended back to back to this process's segment (or, when
        ``staged`` holds mostly winning bytes and is large, the staged file becomes a
        segment of its own without a copy), fdatasync'ed, then one LMDB transaction
        publishes every manifest. Versions that lose are not copied at all. Nothing is
        visible before the commit; a failure before it leaves nothing behind.
        """
        aids = [self.artifact_id(i.producer, i.namespace_id, i.key) for i in items]
        early = self.replicated_outcomes(items, aids)
        winners = {n for n, outcome in enumerate(early) if outcome == APPLIED}
        placed: dict[int, tuple[int, int]] = {}  # item index -> (segment id, offset)
        in_segment = [n for n in sorted(winners) if not items[n].inline and items[n].size > 0]
        if in_segment:
            wanted = sum(items[n].size for n in in_segment)
            seg_id = None
            if (staged is not None and wanted >= ADOPT_MIN_BYTES and 2 * wanted >= staged.size
                    and all(_staged_fd(items[n]) == staged.fd for n in in_segment)):
                seg_id = self.segments.adopt(staged.fd, staged.size)
            if seg_id is not None:
                for n in in_segment:
                    placed[n] = (seg_id, _staged_offset(items[n]))
            else:
                sources = [(_staged_fd(items[n]), _staged_offset(items[n]), items[n].size)
                           if isinstance(items[n].body, tuple) else None for n in in_segment]
                if all(src is not None for src in sources):
                    seg_id, offset = self.segments.append(sources)  # type: ignore[arg-type]
                else:
                    seg_id, offset = self.segments.append_bytes(
                        b"".join(self._body_bytes(items[n]) for n in in_segment))
                for n in in_segment:
                    placed[n] = (seg_id, offset)
                    offset += items[n].size
        results: list[WriteResult] = []
        # Must not yield while this write transaction is open.
        with write_txn(self.env) as txn:
            for n, (aid, item) in enumerate(zip(aids, items)):
                if n not in winners:
                    results.append(WriteResult(aid, False, item.version_ms, early[n]))
                    continue
                manifest = item.manifest()
                inline_body = None
                if n in placed:
                    manifest = manifest.relocated(*placed[n])
                else:
                    inline_body = self._body_bytes(item)
                results.append(self._commit_in(txn, aid, manifest, inline_body, item.order))
        return results

    @staticmethod
    def _body_bytes(item: ReplicatedArtifact) -> bytes:
        if isinstance(item.body, bytes):
            return item.body
        fd, offset = item.body
        data = os.pread(fd, item.size, offset)
        if len(data) != item.size:
            raise OSError(f"staged body ended early ({len(data)} of {item.size} bytes)")
        return data

    def delete_namespace(self, namespace_id: str) -> int:
        """Tombstone a namespace (reads stop seeing it at once), then remove its rows in batches.
        Returns the tombstone's version; the delete is replicated to every member."""
        with write_txn(self.env) as txn:
            old = self._tombstone(txn, self.dbs, namespace_id)
            version = max(self.now_ms(), old + 1)
            self._put_tombstone(txn, namespace_id, version)
            self.outbox.enqueue(txn, self.peers,
                                {"op": "delete_ns", "ns": namespace_id, "v": version})
        self._purge_namespace(namespace_id, version)
        return version

    def apply_replicated_namespace_delete(self, namespace_id: str, version_ms: int) -> str:
        """A peer's namespace delete: APPLIED if newer than our tombstone, else IGNORED_OLDER.
        Artifacts of the namespace written at or before ``version_ms`` disappear."""
        with write_txn(self.env) as txn:
            if version_ms <= self._tombstone(txn, self.dbs, namespace_id):
                return IGNORED_OLDER
            self._put_tombstone(txn, namespace_id, version_ms)
        self._purge_namespace(namespace_id, version_ms)
        return APPLIED

    def _put_tombstone(self, txn: lmdb.Transaction, namespace_id: str, version: int) -> None:
        txn.put(namespace_key(namespace_id),
                json.dumps({"ns": namespace_id, "v": version}).encode(), db=self.dbs.ns_tombstones)

    def _purge_namespace(self, namespace_id: str, version: int) -> None:
        prefix = namespace_key(namespace_id)
        dbs = self.dbs
        while True:
            removed = 0
            with write_txn(self.env) as txn:
                cursor = txn.cursor(db=dbs.ns_index)
                if not cursor.set_range(prefix):
                    break
                batch = []
                for index_key, _ in cursor:
                    if not index_key.startswith(prefix) or len(batch) >= DELETE_BATCH:
                        break
                    batch.append(index_key)
                for index_key in batch:
                    aid = index_key[len(prefix):]
                    raw = txn.get(aid, db=dbs.manifests)
                    if raw is not None:
                        manifest = Manifest.decode(raw)
                        if manifest.version_ms > version:
                            continue  # written after the clean: keep
                        self._drop_artifact(txn, aid, manifest)
                    else:
                        txn.delete(index_key, db=dbs.ns_index)
                    removed += 1
            if removed == 0:
                break

    def _drop_artifact(self, txn: lmdb.Transaction, aid: bytes, manifest: Manifest) -> None:
        dbs = self.dbs
        txn.delete(aid, db=dbs.manifests)
        txn.delete(namespace_key(manifest.namespace_id) + aid, db=dbs.ns_index)
        txn.delete(aid, db=dbs.inline)
        txn.delete(aid, db=dbs.hot)
        if manifest.segment_id:
            txn.delete(u64(manifest.segment_id) + aid, db=dbs.segment_index)

    # -- accounting of bytes held between requests -----------------------------------
    def _held_bytes(self) -> int:
        """Bytes of open multipart uploads and kept partial ByteStream uploads: they count
        against the tmp staging budget like bodies being received."""
        with self.env.begin() as txn:
            return (read_counter(txn, self.dbs.meta, MULTIPART_BYTES)
                    + read_counter(txn, self.dbs.meta, PARTIAL_UPLOAD_BYTES))

    # -- introspection --------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        with self.env.begin() as txn:
            artifacts = txn.stat(self.dbs.manifests)["entries"]
            outbox = txn.stat(self.dbs.outbox)["entries"]
            segments = txn.stat(self.dbs.segments)["entries"]
            multipart = txn.stat(self.dbs.multipart)["entries"]
        return {"artifacts": artifacts, "outbox_messages": outbox, "segments": segments,
                "multipart_uploads": multipart}

    def iter_namespace(self, namespace_id: str) -> Iterable[Manifest]:
        prefix = namespace_key(namespace_id)
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.dbs.ns_index)
            if cursor.set_range(prefix):
                for index_key, _ in cursor:
                    if not index_key.startswith(prefix):
                        break
                    raw = txn.get(index_key[len(prefix):], db=self.dbs.manifests)
                    if raw:
                        yield Manifest.decode(raw)

    def close(self) -> None:
        self._commits.flush()
        self.flush_read_marks()
        self.segments.close()
        self.env.close()



# One pread in ``read_many`` covers at most this many bytes of adjacent bodies.
MAX_READ_RUN_BYTES = 4 * 1024 * 1024


def _adjacent_runs(located: Sequence[Located], indexes: list[int]) -> list[list[int]]:
    """``indexes`` (bodies of one segment) grouped into runs stored back to back, each
    run at most ``MAX_READ_RUN_BYTES`` long (a body longer than that is a run alone)."""
    runs: list[list[int]] = []
    end = start = -1
    for index in sorted(indexes, key=lambda i: located[i].manifest.offset):
        manifest = located[index].manifest
        if manifest.offset == end and end + manifest.size - start <= MAX_READ_RUN_BYTES:
            runs[-1].append(index)
        else:
            runs.append([index])
            start = manifest.offset
        end = manifest.offset + manifest.size
    return runs


def _staged_fd(item: ReplicatedArtifact) -> int:
    return item.body[0] if isinstance(item.body, tuple) else -1


def _staged_offset(item: ReplicatedArtifact) -> int:
    assert isinstance(item.body, tuple)
    return item.body[1]
