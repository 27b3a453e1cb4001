"""Capacity-bounded eviction of whole segments, oldest first, with copy-forward.

Artifacts read from the oldest segments (marked in the ``hot`` table by the read
path, see ``ArtifactStore._note_read``) are appended to the evicting process's
active segment before their old segment is unlinked, so recently used data
survives (an approximate LRU). Eviction is local and never replicated.
"""
from __future__ import annotations

import json
import logging
import os

from app import metrics
from app.node_state import pid_alive
from app.storage.lmdb_env import from_u64, namespace_key, u64
from app.storage.manifest import Manifest
from app.storage.segments import segment_path
from app.storage.store import ArtifactStore

log = logging.getLogger("kura.eviction")
BATCH = 500
HOT_TRACKING_FRACTION = 0.75
MIN_FREE_BYTES = 2 * 1024 ** 3  # or 5 % of the filesystem, whichever is smaller


class Evictor:
    def __init__(self, store: ArtifactStore, capacity_bytes: int) -> None:
        self.store = store
        self.capacity_bytes = capacity_bytes
        self._watermark = -1
        stats = os.statvfs(store.segments_dir)
        self.min_free_bytes = min(MIN_FREE_BYTES, stats.f_blocks * stats.f_frsize // 20)

    def _segments(self) -> list[tuple[int, dict, int]]:
        """``(segment_id, state, bytes on disk)`` oldest first."""
        with self.store.env.begin() as txn:
            rows = [(from_u64(k), json.loads(v)) for k, v in txn.cursor(db=self.store.dbs.segments)]
        result = []
        for seg_id, state in rows:
            try:
                size = os.stat(segment_path(self.store.segments_dir, seg_id)).st_size
            except FileNotFoundError:
                size = 0
            result.append((seg_id, state, size))
        return result

    def used_bytes(self) -> int:
        return sum(size for _, _, size in self._segments())

    def _evictable(self, seg_id: int, state: dict) -> bool:
        if seg_id == self.store.segments.active_segment_id:
            return False
        return bool(state.get("sealed")) or not pid_alive(int(state.get("pid", 0)))

    def _free_bytes(self) -> int:
        stats = os.statvfs(self.store.segments_dir)
        return stats.f_bavail * stats.f_frsize

    def run_once(self) -> int:
        """Evict oldest segments until the store fits its capacity and the filesystem keeps
        its free-space reserve (a shared disk can fill up before the capacity is reached).
        Returns the number of segments evicted."""
        evicted = 0
        while True:
            segments = self._segments()  # re-read: copy-forward appends to the active segment
            self._update_hot_watermark(segments)
            total = sum(size for _, _, size in segments)
            if total <= self.capacity_bytes and self._free_bytes() >= self.min_free_bytes:
                break
            victim = next(((seg_id, size) for seg_id, state, size in segments
                           if self._evictable(seg_id, state)), None)
            if victim is None:
                break
            self.evict_segment(victim[0])
            evicted += 1
            metrics.EVICTED_SEGMENTS.inc()
            metrics.EVICTED_BYTES.inc(victim[1])
        return evicted

    def _update_hot_watermark(self, segments: list[tuple[int, dict, int]]) -> None:
        """Once the store is past 3/4 of its capacity, reads from the two oldest segments are
        remembered for copy-forward; below that nothing is tracked (no cost on reads)."""
        total = sum(size for _, _, size in segments)
        ids = [seg_id for seg_id, _, _ in segments]
        watermark = 0
        if ids and total >= self.capacity_bytes * HOT_TRACKING_FRACTION:
            watermark = ids[min(1, len(ids) - 1)]
        if watermark == self._watermark:
            return
        with self.store.env.begin(write=True) as txn:
            txn.put(b"hot_watermark", u64(watermark), db=self.store.dbs.meta)
        self._watermark = watermark

    def evict_segment(self, seg_id: int) -> None:
        store, dbs = self.store, self.store.dbs
        prefix = u64(seg_id)
        path = segment_path(store.segments_dir, seg_id)
        copied = dropped = 0
        while True:
            with store.env.begin() as txn:
                cursor = txn.cursor(db=dbs.segment_index)
                batch = []
                if cursor.set_range(prefix):
                    for key, _ in cursor:
                        if not key.startswith(prefix) or len(batch) >= BATCH:
                            break
                        batch.append(key[8:])
                hot = {aid for aid in batch if txn.get(aid, db=dbs.hot) is not None}
            if not batch:
                break
            moved: dict[bytes, tuple[int, int]] = {}
            if hot:
                fd = os.open(path, os.O_RDONLY)
                try:
                    for aid in hot:
                        located = store.lookup_id(aid)
                        if located is None or located.manifest.segment_id != seg_id:
                            continue
                        moved[aid] = store.segments.append(
                            [(fd, located.manifest.offset, located.manifest.size)])
                finally:
                    os.close(fd)
            with store.env.begin(write=True) as txn:
                for aid in batch:
                    txn.delete(prefix + aid, db=dbs.segment_index)
                    raw = txn.get(aid, db=dbs.manifests)
                    if raw is None:
                        continue
                    manifest = Manifest.decode(raw)
                    if manifest.segment_id != seg_id:
                        continue  # rewritten meanwhile: lives elsewhere now
                    txn.delete(aid, db=dbs.hot)
                    if aid in moved:
                        new_seg, new_off = moved[aid]
                        txn.put(aid, manifest.relocated(new_seg, new_off).encode(), db=dbs.manifests)
                        txn.put(u64(new_seg) + aid, b"", db=dbs.segment_index)
                        copied += 1
                    else:
                        txn.delete(aid, db=dbs.manifests)
                        txn.delete(namespace_key(manifest.namespace_id) + aid, db=dbs.ns_index)
                        dropped += 1
        with store.env.begin(write=True) as txn:
            txn.delete(prefix, db=dbs.segments)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        metrics.COPIED_FORWARD.inc(copied)
        metrics.EVICTED_ARTIFACTS.inc(dropped)
        log.info("event=segment_evicted segment=%d copied_forward=%d dropped=%d", seg_id, copied, dropped)
