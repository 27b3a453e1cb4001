"""Group commit: concurrent single-artifact writes of one process share their syncs.

A writer copies its body into this process's segment without a sync
(``SegmentWriter.write``) and hands :meth:`GroupCommit.commit` what it wants to
publish. The writer that takes the queue commits every request queued so far as
one batch, in ONE call of ``offload`` (a thread of gevent's pool in an HTTP
worker, so the worker's other requests go on while the disk flushes):

1. fdatasync each segment the batch wrote to, once per segment;
2. ONE LMDB write transaction that publishes every request of the batch
   (manifest, indexes, outbox rows), begun, filled and committed in that thread
   (LMDB's writer lock belongs to a thread), no yield while it is open; what
   ``apply`` runs there touches LMDB only (the writer reads the mesh members
   before it queues, ``ArtifactStore._commit``);
3. make that transaction durable (``lmdb_env.durable_syncs``, which shares the
   sync with later commits of the node's other processes).

Only then is any request of the batch answered, so nothing is acknowledged
before its body and its metadata are durable, and nothing becomes visible before
its body is synced (the store's invariant). Writers that arrive meanwhile queue
for the next batch: under concurrency one batch covers every write that arrived
while the previous one synced, and a lone write pays one hand-off to the pool,
one segment sync and one commit. (Overlapping a batch's segment sync with the
previous batch's commit made smaller batches and twice the hand-offs: with a
fixed number of writers in flight it was slower.)

A request's ``apply`` runs inside the shared transaction and may raise a
``KuraError`` only before it writes anything (a full outbox, an evicted
segment): that request then fails alone. Any other error in the transaction or
its commit fails the whole batch, and nothing of it is visible.

Safe for greenlets (the monkey-patched ``threading`` primitives) and threads (the
REAPI process).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import lmdb

from app import metrics
from app.errors import KuraError
from app.storage.lmdb_env import durable_syncs, write_txn
from app.storage.segments import Extent, Offload, SegmentWriter

T = TypeVar("T")


class CommitInterrupted(RuntimeError):
    """The batch this write was part of stopped before it was durable (not acknowledged)."""


@dataclass(eq=False)
class _Request:
    apply: Callable[[lmdb.Transaction], object]
    extent: Extent | None
    # Looked up per request: gevent's patched Event in HTTP workers, whenever this was imported.
    finished: threading.Event = field(default_factory=lambda: threading.Event())
    taken: bool = False  # a batch holds it
    done: bool = False  # its outcome (result or error) is final
    result: object = None
    error: BaseException | None = None


class GroupCommit:
    """Publishes this process's single-artifact writes in shared syncs and transactions."""

    def __init__(self, env: lmdb.Environment, segments: SegmentWriter, offload: Offload) -> None:
        self._env = env
        self._segments = segments
        self._offload = offload
        self._queue: list[_Request] = []
        self._queue_lock = threading.Lock()  # never held across a yield
        self._batch_lock = threading.Lock()  # one batch of this process at a time

    @property
    def queued(self) -> int:
        """Requests waiting for the next batch."""
        return len(self._queue)

    def commit(self, apply: Callable[[lmdb.Transaction], T], extent: Extent | None = None) -> T:
        """Run ``apply`` in a write transaction once ``extent`` (if any) is synced, and
        return its result once that transaction is durable. ``extent`` is released by
        the batch that takes the request, whatever happens (also when the caller is
        interrupted while it waits)."""
        request = _Request(apply, extent)
        with self._queue_lock:
            self._queue.append(request)
        self._commit_queued(request)
        request.finished.wait()
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    def flush(self) -> None:
        """Commit whatever is queued (requests whose writer gave up waiting)."""
        self._commit_queued(None)

    def _commit_queued(self, own: _Request | None) -> None:
        """Take the queue as a batch and commit it, unless ``own`` is in a batch already
        (its writer then just waits: every queued request's writer comes here in turn)."""
        batch: list[_Request] = []
        try:
            with self._batch_lock:
                if own is not None and own.taken:
                    return
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                for request in batch:
                    request.taken = True
                if batch:
                    segment_syncs, lmdb_syncs = self._offload(self._make_durable, batch)  # type: ignore[misc]
                    if segment_syncs:
                        metrics.child(metrics.STORAGE_SYNCS, "segment").inc(segment_syncs)
                    if lmdb_syncs:
                        metrics.child(metrics.STORAGE_SYNCS, "lmdb").inc(lmdb_syncs)
        finally:
            for request in batch:
                if not request.done:  # this greenlet was interrupted (a timeout, a kill)
                    request.error = CommitInterrupted("the write was interrupted before it was durable")
                    request.done = True
                if request.extent is not None:
                    self._segments.release(request.extent)
                request.finished.set()

    def _make_durable(self, batch: list[_Request]) -> tuple[int, int]:
        """Sync, publish and make durable ``batch``, in one call of ``offload`` (a thread of
        gevent's pool in an HTTP worker: the worker's other requests go on meanwhile).
        Returns the fdatasyncs of segments and of ``data.mdb``, for the caller to count."""
        segment_syncs = self._sync_segments(batch)
        live = [request for request in batch if not request.done]
        lmdb_syncs = self._publish(live) if live else 0
        for request in live:
            request.done = True
        return segment_syncs, lmdb_syncs

    def _sync_segments(self, batch: list[_Request]) -> int:
        by_segment: dict[int, list[_Request]] = {}
        for request in batch:
            if request.extent is not None:
                by_segment.setdefault(request.extent.segment_id, []).append(request)
        synced = 0
        for requests in by_segment.values():
            try:
                self._segments.fdatasync(requests[0].extent)  # type: ignore[arg-type]
                synced += 1
            except Exception as exc:  # noqa: BLE001 - handed to each writer of that segment
                for request in requests:
                    request.error, request.done = exc, True
        return synced

    def _publish(self, live: list[_Request]) -> int:
        """ONE write transaction for ``live``, begun, filled and committed in this thread
        (LMDB's writer lock belongs to a thread), then made durable; returns the syncs of
        ``data.mdb``. Any error but a request's own ``KuraError`` fails them all."""
        try:
            # Must not yield while this write transaction is open (apply does not).
            with write_txn(self._env, durable=False) as txn:
                txn_id = txn.id()
                for request in live:
                    try:
                        request.result = request.apply(txn)
                    except KuraError as exc:
                        request.error = exc
            return durable_syncs(self._env, txn_id)
        except Exception as exc:  # noqa: BLE001 - the batch failed as a whole
            for request in live:
                request.error, request.result = exc, None
            return 0
