"""Group commit: concurrent single-artifact writes of one process share their syncs.

A writer copies its body into this process's segment without a sync
(``SegmentWriter.write``) and hands :meth:`GroupCommit.commit` what it wants to
publish. The writer that takes the queue commits every request queued so far as
one batch:

1. fdatasync each segment the batch wrote to, once per segment (sync stage);
2. ONE LMDB write transaction that publishes every request of the batch
   (manifest, indexes, outbox rows), no yield while it is open (publish stage);
3. make that transaction durable (``lmdb_env.durable_syncs``, which also shares
   the sync with commits of the node's other processes).

Both stages run in gevent's thread pool in an HTTP worker (``offload``), so the
worker's other requests go on while the segment and ``data.mdb`` sync: the
transaction begins, fills and commits in one pool thread, under a lock of the
operating system's threads. What ``apply`` runs there touches LMDB only (the
writer reads the mesh members before it queues, ``ArtifactStore._commit``).

Only then is any request of the batch answered, so nothing is acknowledged
before its body and its metadata are durable, and nothing becomes visible before
its body is synced (the store's invariant). Writers that arrive meanwhile queue
for the next batch, whose segment sync runs while this one publishes: under
concurrency one sync covers many writes and the stages overlap; a lone write
pays what it paid before (one segment sync, one commit).

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
        self._sync_lock = threading.Lock()  # one batch in the sync stage at a time
        self._publish_lock = _thread_lock()  # one batch in the publish stage at a time

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
            with self._sync_lock:
                if own is not None and own.taken:
                    return
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                for request in batch:
                    request.taken = True
                self._sync_segments(batch)
            live = [request for request in batch if not request.done]
            if live:
                self._publish(live)
        finally:
            for request in batch:
                if not request.done:  # this greenlet was interrupted (a timeout, a kill)
                    request.error = CommitInterrupted("the write was interrupted before it was durable")
                    request.done = True
                if request.extent is not None:
                    self._segments.release(request.extent)
                request.finished.set()

    def _sync_segments(self, batch: list[_Request]) -> None:
        by_segment: dict[int, list[_Request]] = {}
        for request in batch:
            if request.extent is not None:
                by_segment.setdefault(request.extent.segment_id, []).append(request)
        for requests in by_segment.values():
            try:
                self._segments.sync(requests[0].extent)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - handed to each writer of that segment
                for request in requests:
                    request.error, request.done = exc, True

    def _publish(self, live: list[_Request]) -> None:
        try:
            syncs = self._offload(self._transact, live)
        except Exception as exc:  # noqa: BLE001 - the batch failed as a whole
            for request in live:
                request.error, request.result = exc, None
        else:
            if syncs:
                metrics.STORAGE_SYNCS.labels("lmdb").inc(syncs)
        for request in live:
            request.done = True

    def _transact(self, live: list[_Request]) -> int:
        """The publish stage, in a thread of gevent's pool in an HTTP worker (``offload``):
        the commit fdatasyncs ``data.mdb``, and the worker's other requests go on meanwhile.
        The transaction begins, fills and commits in this one thread (LMDB's writer lock
        belongs to a thread). Returns the ``data.mdb`` syncs, for the caller to count."""
        with self._publish_lock:
            # Must not yield while this write transaction is open (apply does not).
            with write_txn(self._env, durable=False) as txn:
                txn_id = txn.id()
                for request in live:
                    try:
                        request.result = request.apply(txn)
                    except KuraError as exc:
                        request.error = exc
        # Outside the publish lock: the next batch may commit meanwhile, and its commit
        # makes this one durable too.
        return durable_syncs(self._env, txn_id)


def _thread_lock() -> threading.Lock:
    """A lock of the operating system's threads, also in a monkey-patched process: taken
    only inside the publish stage, which may run in a thread of gevent's pool."""
    try:
        from gevent.monkey import get_original
    except ImportError:  # pragma: no cover - gevent is a dependency
        return threading.Lock()
    return get_original("_thread", "allocate_lock")()
