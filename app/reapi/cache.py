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
from contextlib import AbstractContextManager
from typing import BinaryIO, Callable, Generator, Iterable, Iterator, TypeVar

from app import metrics
from app.errors import KuraError, NotFound
from app.reapi.digests import BlobDigest, WriteResource
from app.storage.partial_uploads import PartialUpload, PartialUploads
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
        self.partial_uploads = PartialUploads(store)

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
            metrics.artifact_read(PRODUCER, metrics.NOT_FOUND)
            raise NotFound(f"Blob {digest} not found")
        if located.size != digest.size:  # cannot happen for keys we wrote; never serve it
            metrics.artifact_read(PRODUCER, metrics.ERROR)
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
        served = [body for body in results if isinstance(body, bytes)]
        if served:
            metrics.artifact_read(PRODUCER, metrics.OK, sum(map(len, served)), count=len(served))
        if len(served) < len(results):
            metrics.artifact_read(PRODUCER, metrics.NOT_FOUND, count=len(results) - len(served))
        return results

    def read_small(self, namespace: str, digest: BlobDigest) -> bytes:
        """A whole blob in memory: callers bound ``digest.size`` (batch reads, Directory protos)."""
        located = self.locate(namespace, digest)
        if located is None:
            metrics.artifact_read(PRODUCER, metrics.OK)
            return b""
        return self._counted(lambda: self.store.read_bytes(located), located.size)

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
            metrics.artifact_read(PRODUCER, metrics.OK)
            return iter(())
        if located.inline_body is not None:
            metrics.artifact_read(PRODUCER, metrics.OK, limit)
            return _egress(self._inline_chunks(located.inline_body, offset, limit, chunk_size))
        body = self._counted(lambda: self.store.open_body(located), limit)
        return _egress(self._segment_chunks(body, located, digest, offset, limit, chunk_size))

    @staticmethod
    def _inline_chunks(body: bytes, offset: int, limit: int,
                       chunk_size: int) -> Generator[bytes, None, None]:
        for start in range(offset, offset + limit, chunk_size):
            yield body[start:min(start + chunk_size, offset + limit)]

    @staticmethod
    def _segment_chunks(body: BinaryIO, located: Located, digest: BlobDigest, offset: int,
                        limit: int, chunk_size: int) -> Generator[bytes, None, None]:
        try:
            fd = body.fileno()
            base = located.manifest.offset
            position, end = offset, offset + limit
            while position < end:
                piece = os.pread(fd, min(chunk_size, end - position), base + position)
                if not piece:
                    raise NotFound(f"Blob {digest} is truncated in storage")
                position += len(piece)
                yield piece
        finally:
            body.close()

    @staticmethod
    def _counted(fn: Callable[[], T], size: int) -> T:
        """Run a storage read, counting it as ok (of ``size`` bytes), not_found or error."""
        try:
            result = fn()
        except NotFound:
            metrics.artifact_read(PRODUCER, metrics.NOT_FOUND)
            raise
        except Exception:
            metrics.artifact_read(PRODUCER, metrics.ERROR)
            raise
        metrics.artifact_read(PRODUCER, metrics.OK, size)
        return result

    # -- CAS writes -----------------------------------------------------------------
    def check_write_budget(self) -> None:
        """Raise BudgetExhausted (→ RESOURCE_EXHAUSTED) before any byte is received."""
        self.store.check_write_budget()

    def resume_upload(self, resource: WriteResource) -> AbstractContextManager[PartialUpload]:
        """The ByteStream upload ``resource`` names, with the bytes earlier calls kept, locked
        for this call and limited to the blob's announced size."""
        digest = resource.digest
        return self.partial_uploads.open(
            resource.upload_name, limit=digest.size, digest_function=digest.function,
            too_large_message=f"More data than the {digest.size} bytes of {digest}")

    def committed_upload_bytes(self, resource: WriteResource) -> int | None:
        """Bytes kept for an unfinished upload (None: nothing kept)."""
        return self.partial_uploads.committed_bytes(resource.upload_name)

    def put_staged(self, namespace: str, digest: BlobDigest, staged: StagedBody) -> None:
        """Verify size and hash of a staged body, then publish it (acknowledged = durable)."""
        with _WriteOutcome():
            staged.finish(expected_size=digest.size, expected_hash=digest.hash)
            if digest.is_empty:
                return
            self.store.put_staged(PRODUCER, namespace, digest.cas_key, staged)
            metrics.artifact_write(PRODUCER, metrics.OK, digest.size)

    def put_many(self, namespace: str, blobs: list[tuple[BlobDigest, bytes]]) -> None:
        """Publish verified small blobs together: one append, one fdatasync, one transaction
        for the whole batch instead of one each (BatchUpdateBlobs)."""
        with _WriteOutcome():
            items = [(digest.cas_key, data) for digest, data in blobs if not digest.is_empty]
            self.store.put_many(PRODUCER, namespace, items)
            # One counter update per batch, not one per blob.
            if items:
                metrics.artifact_write(PRODUCER, metrics.OK, sum(len(data) for _, data in items),
                                       count=len(items))

    def note_existing_write(self, count: int = 1) -> None:
        """``count`` writes skipped because their blob is already stored."""
        if count:
            metrics.artifact_write(PRODUCER, metrics.EXISTS, count=count)

    # -- action cache -------------------------------------------------------------
    def get_action_result(self, namespace: str, action: BlobDigest) -> bytes:
        """The serialized ActionResult stored for ``action`` (NotFound when absent)."""
        located = self.store.lookup(PRODUCER, namespace, action.ac_key)
        if located is None:
            metrics.artifact_read(PRODUCER, metrics.NOT_FOUND)
            raise NotFound(f"Action result for {action} not found")
        return self._counted(lambda: self.store.read_bytes(located), located.size)

    def note_stale_action_result(self) -> None:
        """A stored result withheld because its outputs are gone (counted as not found)."""
        metrics.artifact_read(PRODUCER, metrics.NOT_FOUND)

    def put_action_result(self, namespace: str, action: BlobDigest, serialized: bytes) -> None:
        with _WriteOutcome():
            self.store.put_bytes(PRODUCER, namespace, action.ac_key, serialized,
                                 "application/x-protobuf",
                                 inline=len(serialized) <= MAX_INLINE_ACTION_RESULT)
            metrics.artifact_write(PRODUCER, metrics.OK, len(serialized))


def _egress(chunks: Generator[bytes, None, None]) -> Iterator[bytes]:
    """A ByteStream.Read body, counted once it ends: sent whole, aborted by the client
    (grpcio closes the generator) or cut by an error."""
    sent, result = 0, metrics.ERROR
    try:
        for piece in chunks:
            yield piece
            sent += len(piece)  # grpcio took it
        result = metrics.OK
    except GeneratorExit:
        result = metrics.ABORTED
        raise
    finally:
        chunks.close()  # the segment file, now rather than at garbage collection
        metrics.artifact_egress(PRODUCER, result, sent)


class _WriteOutcome:
    """Counts a failed write as ``rejected`` (client's fault, full budget) or ``error`` (ours)."""

    def __enter__(self) -> "_WriteOutcome":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 _tb: object) -> None:
        if exc is not None:
            metrics.artifact_write(PRODUCER, metrics.failed_write_result(exc))
