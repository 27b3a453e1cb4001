"""Group commit: concurrent single-artifact writes of one process share their syncs.

A writer copies its body into this process's segment without a sync
(``SegmentWriter.write``) and hands :meth:`GroupCommit.commit` what it wants to
publish. Whoever holds the commit lock commits every request queued so far, in
this order:

1. fdatasync each segment the batch wrote to, once per segment;
2. ONE LMDB write transaction that publishes every request (manifest, indexes,
   outbox rows), no yield while it is open;
3. make that transaction durable (``lmdb_env.make_durable``, which also shares
   the sync with commits of the node's other processes).

Only then does any of them return, so nothing is acknowledged before its body
and its metadata are durable, and nothing becomes visible before its body is
synced (the store's invariant). Writers that arrive while a batch is syncing
queue for the next one: under concurrency one sync covers many writes; a lone
write pays what it paid before (one segment sync, one commit).

A request's ``apply`` runs inside the shared transaction and may raise a
``KuraError`` only before it writes anything (a full outbox, an evicted
segment): that request then fails alone. Any other error in the transaction or
its commit fails the whole batch, and nothing of it is visible.

Safe for greenlets (the monkey-patched ``threading`` locks) and threads (the
REAPI process).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

import lmdb

from app.errors import KuraError
from app.storage.lmdb_env import write_txn
from app.storage.segments import Extent, Offload, SegmentWriter

T = TypeVar("T")


class CommitInterrupted(RuntimeError):
    """The batch this write was part of stopped before it was durable (not acknowledged)."""


@dataclass(eq=False)
class _Request:
    apply: Callable[[lmdb.Transaction], object]
    extent: Extent | None
    done: bool = False
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
        self._commit_lock = threading.Lock()  # one batch at a time

    @property
    def queued(self) -> int:
        """Requests waiting for the next batch."""
        return len(self._queue)

    def commit(self, apply: Callable[[lmdb.Transaction], T], extent: Extent | None = None) -> T:
        """Run ``apply`` in a write transaction once ``extent`` (if any) is synced, and
        return its result once that transaction is durable. ``extent`` is released here,
        whatever happens (also when the caller is interrupted while it waits)."""
        request = _Request(apply, extent)
        with self._queue_lock:
            self._queue.append(request)
        with self._commit_lock:
            if not request.done:
                self._commit_queued()
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    def flush(self) -> None:
        """Commit whatever is queued (requests whose writer gave up waiting)."""
        with self._commit_lock:
            self._commit_queued()

    def _commit_queued(self) -> None:
        with self._queue_lock:
            batch, self._queue = self._queue, []
        if not batch:
            return
        try:
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
            # Must not yield while this write transaction is open (apply does not).
            with write_txn(self._env, self._offload) as txn:
                for request in live:
                    try:
                        request.result = request.apply(txn)
                    except KuraError as exc:
                        request.error = exc
        except Exception as exc:  # noqa: BLE001 - the batch failed as a whole
            for request in live:
                request.error, request.result = exc, None
        for request in live:
            request.done = True
