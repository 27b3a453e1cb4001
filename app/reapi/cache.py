"""The REAPI view of the node's ArtifactStore.

Servicers speak digests and namespaces; this class turns them into SPEC §2
artifact keys (producer ``reapi``, ``blob/{hash}/{size}`` and
``action_cache/{hash}/{size}``), keeps the empty blob always present, and
records the artifact read/write metrics (a decorator around the store, as in
bazel-remote, rather than code inside it). It never touches LMDB or segment
paths: everything goes through ``ArtifactStore``.
"""
from __future__ import annotations

import os
from typing import BinaryIO, Callable, Iterable, Iterator, TypeVar

from app import metrics
from app.errors import KuraError, NotFound
from app.reapi.digests import BlobDigest
from app.storage.staging import StagedBody
from app.storage.store import ArtifactStore, Located

PRODUCER = "reapi"
# An ActionResult bigger than this goes to a segment instead of the LMDB inline table.
MAX_INLINE_ACTION_RESULT = 1024 * 1024
T = TypeVar("T")


class ReapiCache:
    """CAS blobs and action results of one node, addressed by (namespace, digest)."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    # -- CAS presence ---------------------------------------------------------------
    def missing(self, namespace: str, digests: Iterable[BlobDigest]) -> list[BlobDigest]:
        """The digests with no visible blob, in request order, in one read transaction.

        The empty blob is never missing.
        """
        wanted = {d.cas_key: d for d in digests if not d.is_empty}
        if not wanted:
            return []
        return [wanted[key] for key in self.store.missing(PRODUCER, namespace, list(wanted))]

    def contains(self, namespace: str, digest: BlobDigest) -> bool:
        return digest.is_empty or self.store.exists(PRODUCER, namespace, digest.cas_key)

    # -- CAS reads ------------------------------------------------------------------
    def locate(self, namespace: str, digest: BlobDigest) -> Located | None:
        """The stored blob for ``digest`` (None for the empty blob, which needs no storage)."""
        if digest.is_empty:
            return None
        located = self.store.lookup(PRODUCER, namespace, digest.cas_key)
        if located is None:
            metrics.ARTIFACT_READS.labels(PRODUCER, "miss").inc()
            raise NotFound(f"Blob {digest} not found")
        if located.size != digest.size:  # cannot happen for keys we wrote; never serve it
            metrics.ARTIFACT_READS.labels(PRODUCER, "error").inc()
            raise NotFound(f"Blob {digest} not found")
        return located

    def read_many(self, namespace: str, digests: list[BlobDigest]) -> list[bytes | KuraError]:
        """Whole blobs in memory, one per digest (callers bound the total size), with one
        read transaction for all the lookups; a blob that cannot be read is NotFound in its
        place."""
        stored = [d for d in digests if not d.is_empty]
        found = self.store.lookup_many(PRODUCER, namespace, [d.cas_key for d in stored])
        # A size that differs from the digest's cannot happen for keys we wrote; never serve it.
        readable = [item for d, item in zip(stored, found)
                    if item is not None and item.size == d.size]
        bodies = iter(self.store.read_many(readable))
        lookups = iter(found)
        results: list[bytes | KuraError] = []
        for digest in digests:
            item = None if digest.is_empty else next(lookups)
            if digest.is_empty:
                results.append(b"")
            elif item is None or item.size != digest.size:
                results.append(NotFound(f"Blob {digest} not found"))
            else:
                results.append(next(bodies))
        # Counted once per batch, not per blob: labels() costs as much as a lookup.
        failed = sum(1 for body in results if not isinstance(body, bytes))
        metrics.ARTIFACT_READS.labels(PRODUCER, "hit").inc(len(results) - failed)
        if failed:
            metrics.ARTIFACT_READS.labels(PRODUCER, "miss").inc(failed)
        metrics.ARTIFACT_READ_BYTES.labels(PRODUCER).inc(
            sum(len(body) for body in results if isinstance(body, bytes)))
        return results

    def read_small(self, namespace: str, digest: BlobDigest) -> bytes:
        """A whole blob in memory: callers bound ``digest.size`` (batch reads, Directory protos)."""
        located = self.locate(namespace, digest)
        if located is None:
            metrics.ARTIFACT_READS.labels(PRODUCER, "hit").inc()
            return b""
        data = self._counted(lambda: self.store.read_bytes(located))
        metrics.ARTIFACT_READ_BYTES.labels(PRODUCER).inc(len(data))
        return data

    def read_chunks(self, namespace: str, digest: BlobDigest, offset: int, limit: int,
                    chunk_size: int) -> Iterator[bytes]:
        """Stream ``limit`` bytes from ``offset`` in chunks of at most ``chunk_size``.

        The blob is located now (NotFound is raised here, not on first
        iteration); bounds are checked by the caller against ``digest.size``.
        The segment file is opened once and read with pread, so at most one
        chunk per call is in memory.
        """
        located = self.locate(namespace, digest)
        if located is None or limit == 0:
            metrics.ARTIFACT_READS.labels(PRODUCER, "hit").inc()
            return iter(())
        if located.inline_body is not None:
            metrics.ARTIFACT_READS.labels(PRODUCER, "hit").inc()
            return self._inline_chunks(located.inline_body, offset, limit, chunk_size)
        body = self._counted(lambda: self.store.open_body(located))
        return self._segment_chunks(body, located, digest, offset, limit, chunk_size)

    @staticmethod
    def _inline_chunks(body: bytes, offset: int, limit: int, chunk_size: int) -> Iterator[bytes]:
        for start in range(offset, offset + limit, chunk_size):
            piece = body[start:min(start + chunk_size, offset + limit)]
            metrics.ARTIFACT_READ_BYTES.labels(PRODUCER).inc(len(piece))
            yield piece

    @staticmethod
    def _segment_chunks(body: BinaryIO, located: Located, digest: BlobDigest, offset: int,
                        limit: int, chunk_size: int) -> Iterator[bytes]:
        try:
            fd = body.fileno()
            base = located.manifest.offset
            position, end = offset, offset + limit
            while position < end:
                piece = os.pread(fd, min(chunk_size, end - position), base + position)
                if not piece:
                    raise NotFound(f"Blob {digest} is truncated in storage")
                position += len(piece)
                metrics.ARTIFACT_READ_BYTES.labels(PRODUCER).inc(len(piece))
                yield piece
        finally:
            body.close()

    @staticmethod
    def _counted(fn: Callable[[], T]) -> T:
        """Run a storage read, counting it as hit, miss or error."""
        try:
            result = fn()
        except NotFound:
            metrics.ARTIFACT_READS.labels(PRODUCER, "miss").inc()
            raise
        except Exception:
            metrics.ARTIFACT_READS.labels(PRODUCER, "error").inc()
            raise
        metrics.ARTIFACT_READS.labels(PRODUCER, "hit").inc()
        return result

    # -- CAS writes -----------------------------------------------------------------
    def check_write_budget(self) -> None:
        """Raise BudgetExhausted (→ RESOURCE_EXHAUSTED) before any byte is received."""
        self.store.check_write_budget()

    def stage(self, digest: BlobDigest) -> StagedBody:
        """A staging file for an incoming blob, limited to its announced size."""
        return self.store.stage(limit=digest.size,
                                too_large_message=f"More data than the {digest.size} bytes of {digest}")

    def put_staged(self, namespace: str, digest: BlobDigest, staged: StagedBody) -> None:
        """Verify size and sha256 of a staged body, then publish it (acknowledged = durable)."""
        with _WriteOutcome():
            staged.finish(expected_size=digest.size, expected_sha256=digest.hash)
            if digest.is_empty:
                return
            result = self.store.put_staged(PRODUCER, namespace, digest.cas_key, staged)
            self._count_write(result.created, digest.size)

    def put_many(self, namespace: str, blobs: list[tuple[BlobDigest, bytes]]) -> None:
        """Publish verified small blobs together: one append, one fdatasync, one transaction
        for the whole batch instead of one each (BatchUpdateBlobs)."""
        with _WriteOutcome():
            items = [(digest.cas_key, data) for digest, data in blobs if not digest.is_empty]
            results = self.store.put_many(PRODUCER, namespace, items)
            for (_, data), result in zip(items, results):
                self._count_write(result.created, len(data))

    def _count_write(self, created: bool, size: int) -> None:
        metrics.ARTIFACT_WRITES.labels(PRODUCER, "created" if created else "updated").inc()
        metrics.ARTIFACT_WRITE_BYTES.labels(PRODUCER).inc(size)

    def note_existing_write(self) -> None:
        """A write skipped because the blob is already stored."""
        metrics.ARTIFACT_WRITES.labels(PRODUCER, "exists").inc()

    # -- action cache -------------------------------------------------------------
    def get_action_result(self, namespace: str, action: BlobDigest) -> bytes:
        """The serialized ActionResult stored for ``action`` (NotFound when absent)."""
        located = self.store.lookup(PRODUCER, namespace, action.ac_key)
        if located is None:
            metrics.ARTIFACT_READS.labels(PRODUCER, "miss").inc()
            raise NotFound(f"Action result for {action} not found")
        data = self._counted(lambda: self.store.read_bytes(located))
        metrics.ARTIFACT_READ_BYTES.labels(PRODUCER).inc(len(data))
        return data

    def note_stale_action_result(self) -> None:
        """A stored result withheld because its outputs are gone (counted as a miss)."""
        metrics.ARTIFACT_READS.labels(PRODUCER, "miss").inc()

    def put_action_result(self, namespace: str, action: BlobDigest, serialized: bytes) -> None:
        with _WriteOutcome():
            result = self.store.put_bytes(PRODUCER, namespace, action.ac_key, serialized,
                                          "application/x-protobuf",
                                          inline=len(serialized) <= MAX_INLINE_ACTION_RESULT)
            self._count_write(result.created, len(serialized))


class _WriteOutcome:
    """Counts a failed write as ``rejected`` (client's fault) or ``error`` (ours)."""

    def __enter__(self) -> "_WriteOutcome":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 _tb: object) -> None:
        if exc is None:
            return
        client_fault = isinstance(exc, KuraError) and exc.http_status < 500 and exc.http_status != 429
        metrics.ARTIFACT_WRITES.labels(PRODUCER, "rejected" if client_fault else "error").inc()
