"""Capacity-bounded eviction of whole segments, strictly oldest first, with copy-forward.

Order: segment ids grow with creation time and a writer stops appending to a segment
a minute after creating it (``segments.SEAL_AFTER_S``), so evicting in id order never
drops an artifact while one acknowledged more than about a minute before it is kept.
No segment is skipped: the oldest one is evicted whoever owns it, alive or dead, and
whether or not its owner still appends to it. It is sealed first (its owner, alive,
starts a new segment at its next append; this process rotates its own), so a dead
process's segment goes when its turn comes, not ahead of older data.

Artifacts read from the oldest segments (marked in the ``hot`` table by the read path,
see ``ArtifactStore._note_read``) are appended to this process's active segment before
their old segment goes, so recently used data survives (an approximate LRU). Eviction is
local and never replicated.

Every step can fail (EIO, a full disk, a crash) and be run again: sealing, copying
forward, marking the row ``evicting`` (commits into the segment are refused from then
on), unlinking the file (space first: readers of what is left get a miss), dropping
the index rows and manifests in batches, and deleting the row last. A decided eviction
(the row says ``evicting``) is finished at the next run whatever the capacity says then. A
segment file without a row (a segment whose creation failed half way, or an eviction by an
older version, which deleted the row before the file) is removed by the sweep.
"""
from __future__ import annotations

import json
import logging
import os
import re

import lmdb

from app import metrics
from app.errors import BudgetExhausted
from app.storage.lmdb_env import Databases, from_u64, namespace_key, u64, write_txn
from app.storage.manifest import Manifest
from app.storage.segments import mark_sealed, segment_path, segment_state
from app.storage.store import ArtifactStore

log = logging.getLogger("kura.eviction")
BATCH = 500
HOT_TRACKING_FRACTION = 0.75
MIN_FREE_BYTES = 2 * 1024 ** 3  # or 5 % of the filesystem, whichever is smaller
MAX_ATTEMPTS = 3
_SEGMENT_FILE = re.compile(r"([0-9a-f]{16})\.seg")


class Evictor:
    def __init__(self, store: ArtifactStore, capacity_bytes: int) -> None:
        self.store = store
        self.capacity_bytes = capacity_bytes
        self._watermark = -1
        stats = os.statvfs(store.segments_dir)
        self.min_free_bytes = min(MIN_FREE_BYTES, stats.f_blocks * stats.f_frsize // 20)
        self._sweep_due = True  # at the first run: files a crash left without a row
        self._failures: dict[int, int] = {}  # segment id -> evictions failed in a row
        self._unfinished = True  # at the first run, and after a failure: rows left "evicting"

    def _segments(self) -> list[tuple[int, dict, int]]:
        """``(segment_id, state, bytes on disk)`` oldest first."""
        with self.store.env.begin() as txn:
            rows = [(from_u64(k), json.loads(v)) for k, v in txn.cursor(db=self.store.dbs.segments)]
        return [(seg_id, state, self._allocated(seg_id)) for seg_id, state in rows]

    def _allocated(self, seg_id: int) -> int:
        try:
            return os.stat(segment_path(self.store.segments_dir, seg_id)).st_blocks * 512
        except FileNotFoundError:
            return 0

    def used_bytes(self) -> int:
        return sum(size for _, _, size in self._segments())

    def _free_bytes(self) -> int:
        stats = os.statvfs(self.store.segments_dir)
        return stats.f_bavail * stats.f_frsize

    def _under_pressure(self) -> bool:
        """Cheap test before listing segments: the store cannot be larger than what its
        filesystem has in use."""
        stats = os.statvfs(self.store.segments_dir)
        in_use = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
        return (in_use >= self.capacity_bytes * HOT_TRACKING_FRACTION
                or stats.f_bavail * stats.f_frsize < self.min_free_bytes)

    def run_once(self) -> int:
        """Evict oldest segments until the store fits its capacity and the filesystem keeps
        its free-space reserve (a shared disk can fill up before the capacity is reached).
        A segment whose eviction fails is logged and first in line at the next run; once it
        failed ``MAX_ATTEMPTS`` times in a row, the runs go on past it to the next segments
        (it is still tried first each time). Returns the segments evicted."""
        if self._sweep_due:
            self._sweep_due = not self.sweep_orphans()
        if self._unfinished:
            self._unfinished = not self._finish_interrupted()
        if not self._under_pressure():
            self._set_watermark(0)
            return 0
        evicted = 0
        tried: set[int] = set()
        while True:
            segments = self._segments()  # re-read: copy-forward appends to the active segment
            self._update_hot_watermark(segments)
            total = sum(size for _, _, size in segments)
            if total <= self.capacity_bytes and self._free_bytes() >= self.min_free_bytes:
                break
            victim = next(((seg_id, state, size) for seg_id, state, size in segments
                           if seg_id not in tried), None)
            if victim is None:
                break
            seg_id, state, size = victim
            tried.add(seg_id)
            try:
                self.evict_segment(seg_id, state)
            except Exception:  # noqa: BLE001 - resumed by the next run
                self._unfinished = True
                attempts = self._failures[seg_id] = self._failures.get(seg_id, 0) + 1
                log.log(logging.ERROR if attempts == 1 else logging.WARNING,
                        "event=eviction_failed segment=%d attempts=%d", seg_id, attempts,
                        exc_info=attempts == 1)
                if attempts < MAX_ATTEMPTS:
                    break
                continue
            self._failures.pop(seg_id, None)
            evicted += 1
            metrics.EVICTED_SEGMENTS.inc()
            metrics.EVICTED_BYTES.inc(size)
        return evicted

    def _finish_interrupted(self) -> bool:
        """Finish the evictions that were decided (the row is marked ``evicting``) but cut
        short, whatever the capacity says now. False when one failed again."""
        with self.store.env.begin() as txn:
            pending = [(from_u64(k), json.loads(v)) for k, v in txn.cursor(db=self.store.dbs.segments)
                       if b'"evicting"' in v]
        done = True
        for seg_id, state in pending:
            if not state.get("evicting"):
                continue
            try:
                self.evict_segment(seg_id, state)
            except Exception as exc:  # noqa: BLE001 - tried again at the next run
                log.warning("event=eviction_failed segment=%d error=%r", seg_id, str(exc))
                done = False
        return done

    def _update_hot_watermark(self, segments: list[tuple[int, dict, int]]) -> None:
        """Once the store is past 3/4 of its capacity, reads from the two oldest segments are
        remembered for copy-forward; below that nothing is tracked (no cost on reads)."""
        total = sum(size for _, _, size in segments)
        ids = [seg_id for seg_id, _, _ in segments]
        watermark = 0
        if ids and total >= self.capacity_bytes * HOT_TRACKING_FRACTION:
            watermark = ids[min(1, len(ids) - 1)]
        self._set_watermark(watermark)

    def _set_watermark(self, watermark: int) -> None:
        if watermark == self._watermark:
            return
        try:
            with write_txn(self.store.env) as txn:
                txn.put(b"hot_watermark", u64(watermark), db=self.store.dbs.meta)
        except Exception as exc:  # noqa: BLE001 - tracking reads can wait, evicting cannot
            log.warning("event=hot_watermark_not_written error=%r", str(exc))
            return
        self._watermark = watermark

    # -- one segment -----------------------------------------------------------------
    def evict_segment(self, seg_id: int, state: dict | None = None) -> None:
        """Evict one segment (see the module docstring for the steps). Idempotent: run it
        again after any failure and it finishes the job."""
        store = self.store
        path = segment_path(store.segments_dir, seg_id)
        if state is None:
            with store.env.begin() as txn:
                state = segment_state(txn, store.dbs, seg_id) or {}
        copied = 0
        if not state.get("evicting"):
            try:
                self._seal(seg_id, state)
                copied = self._copy_forward(seg_id, path)
                self._mark_evicting(seg_id)
            except BudgetExhausted:
                # The disk is too full even to record the decision: free the space first,
                # the rows follow at the next run (a read of what is left is a miss).
                log.warning("event=eviction_unlinking_first segment=%d reason=disk_full", seg_id)
        self._unlink(path)
        dropped = self._drop_rows(seg_id)
        metrics.COPIED_FORWARD.inc(copied)
        metrics.EVICTED_ARTIFACTS.inc(dropped)
        log.info("event=segment_evicted segment=%d copied_forward=%d dropped=%d", seg_id, copied, dropped)

    def _seal(self, seg_id: int, state: dict) -> None:
        """No more appends to the segment: this process's own active segment is rotated,
        anyone else's (alive or dead) is marked sealed for its owner to see."""
        writer = self.store.segments
        if seg_id == writer.active_segment_id:
            writer.rotate()
        elif not state.get("sealed"):
            with write_txn(self.store.env) as txn:
                mark_sealed(txn, self.store.dbs, seg_id, "evictor")

    def _index_batch(self, seg_id: int, after: bytes = b"") -> list[bytes]:
        """Up to ``BATCH`` artifact ids of the segment's index, those after ``after``."""
        prefix = u64(seg_id)
        batch: list[bytes] = []
        with self.store.env.begin() as txn:
            cursor = txn.cursor(db=self.store.dbs.segment_index)
            if cursor.set_range(prefix + after):
                for key in cursor.iternext(keys=True, values=False):
                    if not key.startswith(prefix) or len(batch) >= BATCH:
                        break
                    if key[8:] != after:
                        batch.append(key[8:])
        return batch

    def _copy_forward(self, seg_id: int, path: str) -> int:
        """Append the segment's hot artifacts to this process's active segment and point
        their manifests there. Best effort: an artifact that cannot be copied (an unreadable
        segment, no room) is dropped with the rest."""
        store, dbs = self.store, self.store.dbs
        copied = 0
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            log.warning("event=copy_forward_skipped segment=%d error=%r", seg_id, exc.strerror)
            return 0
        try:
            batch = self._index_batch(seg_id)
            while batch:
                with store.env.begin() as txn:
                    hot = [aid for aid in batch if txn.get(aid, db=dbs.hot) is not None]
                moved: dict[bytes, tuple[int, int]] = {}
                for aid in hot:
                    located = store.lookup_id(aid)
                    if located is None or located.manifest.segment_id != seg_id:
                        continue
                    try:
                        moved[aid] = store.segments.append(
                            [(fd, located.manifest.offset, located.manifest.size)])
                    except (OSError, BudgetExhausted) as exc:
                        log.warning("event=copy_forward_failed segment=%d error=%r", seg_id, str(exc))
                        break
                if moved:
                    copied += self._relocate(seg_id, moved)
                batch = self._index_batch(seg_id, after=batch[-1])
        finally:
            os.close(fd)
        return copied

    def _relocate(self, seg_id: int, moved: dict[bytes, tuple[int, int]]) -> int:
        dbs = self.store.dbs
        relocated = 0
        with write_txn(self.store.env) as txn:
            for aid, (new_seg, new_off) in moved.items():
                manifest = _manifest_in(txn, dbs, aid, seg_id)
                if manifest is None:
                    continue
                txn.put(aid, manifest.relocated(new_seg, new_off).encode(), db=dbs.manifests)
                txn.delete(u64(seg_id) + aid, db=dbs.segment_index)
                txn.put(u64(new_seg) + aid, b"", db=dbs.segment_index)
                txn.delete(aid, db=dbs.hot)
                relocated += 1
        return relocated

    def _mark_evicting(self, seg_id: int) -> None:
        """From this commit on, a write that appended to the segment fails instead of
        publishing (``ArtifactStore._commit_in``)."""
        with write_txn(self.store.env) as txn:
            state = segment_state(txn, self.store.dbs, seg_id)
            if state is not None:
                state.update(sealed=True, evicting=True)
                txn.put(u64(seg_id), json.dumps(state).encode(), db=self.store.dbs.segments)

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _drop_rows(self, seg_id: int) -> int:
        """Drop the manifests still in the segment and its index rows, then its row, in the
        same transaction as the check that no index row is left."""
        store, dbs = self.store, self.store.dbs
        prefix = u64(seg_id)
        dropped = 0
        while True:
            batch = self._index_batch(seg_id)
            with write_txn(store.env) as txn:
                if not batch:
                    txn.delete(prefix, db=dbs.segments)
                    return dropped
                for aid in batch:
                    txn.delete(prefix + aid, db=dbs.segment_index)
                    manifest = _manifest_in(txn, dbs, aid, seg_id)
                    if manifest is None:
                        continue
                    txn.delete(aid, db=dbs.manifests)
                    txn.delete(namespace_key(manifest.namespace_id) + aid, db=dbs.ns_index)
                    txn.delete(aid, db=dbs.hot)
                    dropped += 1

    def sweep_orphans(self) -> bool:
        """Unlink segment files that have no row (see the module docstring). A row is always
        written before its file is created, and the files are listed before the rows are read,
        so a live segment is never taken. Returns False when a file could not be removed (the
        next run tries again)."""
        directory = self.store.segments_dir
        names = {}
        for entry in os.scandir(directory):
            match = _SEGMENT_FILE.fullmatch(entry.name)
            if match:
                names[int(match.group(1), 16)] = entry.path
        with self.store.env.begin() as txn:
            orphans = [path for seg_id, path in names.items()
                       if txn.get(u64(seg_id), db=self.store.dbs.segments) is None]
        clean = True
        for path in orphans:
            try:
                os.unlink(path)
                log.info("event=orphan_segment_removed path=%s", path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("event=orphan_segment_unlink_failed path=%s error=%r", path, exc.strerror)
                clean = False
        return clean


def _manifest_in(txn: lmdb.Transaction, dbs: Databases, aid: bytes, seg_id: int) -> Manifest | None:
    """The manifest of ``aid`` if it still lives in segment ``seg_id`` (None when it is gone
    or was rewritten meanwhile and lives elsewhere now)."""
    raw = txn.get(aid, db=dbs.manifests)
    if raw is None:
        return None
    manifest = Manifest.decode(raw)
    return manifest if manifest.segment_id == seg_id else None
