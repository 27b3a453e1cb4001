"""Append-only segment files: each process appends to its own active segment.

Durability invariant: bytes are copied into the segment and fdatasync'ed
BEFORE the LMDB transaction that publishes the manifest pointing at them. A
crash in between leaves unreferenced bytes in a segment (reclaimed when the
segment is evicted), never a manifest pointing at missing bytes.

Segments are never rewritten or truncated; space is reclaimed by unlinking a
whole segment (see ``eviction.py``), oldest id first. So that a segment's id says
how old its artifacts are, a writer stops appending to its active segment
``SEAL_AFTER_S`` after creating it (or when it is full, or when the evictor sealed
it): every artifact in a segment was acknowledged within about a minute of the
segment's creation.

A segment's state is one JSON row in the ``segments`` table: the owner's pid, when
it was created, and ``sealed`` once nothing may be appended to it any more.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import lmdb

from app import metrics
from app.errors import BudgetExhausted
from app.storage.backpressure import raise_if_disk_full
from app.storage.lmdb_env import Databases, next_counter, u64, write_txn

Offload = Callable[..., object]
COPY_SLICE = 8 * 1024 * 1024
SEAL_AFTER_S = 60.0


def direct_call(fn: Callable[..., object], *args: object) -> object:
    return fn(*args)


def cooperative_offload() -> Offload:
    """Where blocking disk work (segment copies, fdatasync) runs: gevent's thread pool in a
    monkey-patched process, so other greenlets keep serving meanwhile; in place otherwise."""
    try:
        from gevent import get_hub, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return direct_call
    if not monkey.is_module_patched("socket"):
        return direct_call
    pool = get_hub().threadpool
    return lambda fn, *args: pool.apply(fn, args)


def segment_path(segments_dir: str, segment_id: int) -> str:
    return os.path.join(segments_dir, f"{segment_id:016x}.seg")


def segment_state(txn: lmdb.Transaction, dbs: Databases, segment_id: int) -> dict | None:
    """The segment's row (None once it is evicted)."""
    raw = txn.get(u64(segment_id), db=dbs.segments)
    return json.loads(raw) if raw is not None else None


def publishable(txn: lmdb.Transaction, dbs: Databases, segment_id: int) -> bool:
    """Whether bytes appended to the segment may still be published: its eviction has not
    begun (checked in the transaction that publishes them)."""
    state = segment_state(txn, dbs, segment_id)
    return state is not None and not state.get("evicting")


def mark_sealed(txn: lmdb.Transaction, dbs: Databases, segment_id: int, by: str) -> None:
    """Nothing may be appended to the segment any more (its owner sees it before its next
    append). ``by``: "owner" or "evictor"."""
    state = segment_state(txn, dbs, segment_id)
    if state is not None and not state.get("sealed"):
        state.update(sealed=True, sealed_by=by)
        txn.put(u64(segment_id), json.dumps(state).encode(), db=dbs.segments)


@dataclass
class _Active:
    segment_id: int
    fd: int
    created: float  # clock seconds
    end: int = 0  # next free offset (reserved space included)
    pending: int = 0
    sealed: bool = False


@dataclass(frozen=True)
class Extent:
    """``length`` bytes copied to ``offset`` of a segment but not yet fdatasync'ed: they
    may be published only after ``fd`` is synced. The segment's descriptor stays open
    until :meth:`SegmentWriter.release`."""

    segment: _Active
    offset: int
    length: int

    @property
    def segment_id(self) -> int:
        return self.segment.segment_id

    @property
    def fd(self) -> int:
        return self.segment.fd


SMALL_WRITE_BYTES = 64 * 1024  # copied in the calling greenlet: shorter than a thread hand-off


class SegmentWriter:
    """This process's active segment. Safe for greenlets and threads."""

    def __init__(self, env: lmdb.Environment, dbs: Databases, segments_dir: str,
                 max_bytes: int, offload: Offload = direct_call,
                 clock: Callable[[], float] = time.time) -> None:
        self._env = env
        self._dbs = dbs
        self._dir = segments_dir
        self._max = max_bytes
        self._offload = offload
        self._clock = clock
        self._lock = threading.Lock()
        self._active: _Active | None = None
        self._can_adopt = True
        os.makedirs(segments_dir, exist_ok=True)

    @property
    def active_segment_id(self) -> int:
        return self._active.segment_id if self._active else 0

    def _new_row(self, txn: lmdb.Transaction, **extra: object) -> int:
        seg_id = next_counter(txn, self._dbs.meta, b"next_segment_id")
        txn.put(u64(seg_id), json.dumps({"pid": os.getpid(), "created_ms": int(self._clock() * 1000),
                                         **extra}).encode(), db=self._dbs.segments)
        return seg_id

    def _open_new(self) -> _Active:
        # Short write txn: allocate the id and register the segment as owned by us. The row
        # comes first: a segment file without a row is garbage (see eviction's sweep).
        with write_txn(self._env) as txn:
            seg_id = self._new_row(txn, sealed=False)
        path = segment_path(self._dir, seg_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            _fsync_dir(self._dir)
        except OSError as exc:
            try:
                with write_txn(self._env) as txn:
                    txn.delete(u64(seg_id), db=self._dbs.segments)
            except BudgetExhausted:
                pass  # a row without a file: the evictor drops it in its turn
            raise_if_disk_full(exc)
            raise
        metrics.SEGMENTS_CREATED.inc()
        return _Active(segment_id=seg_id, fd=fd, created=self._clock())

    def _retire(self, seg: _Active) -> None:
        """Stop appending to ``seg`` (caller holds the lock); its fd closes with its last writer."""
        seg.sealed = True
        if seg.pending == 0:
            os.close(seg.fd)
        if self._active is seg:
            self._active = None
        with write_txn(self._env) as txn:
            mark_sealed(txn, self._dbs, seg.segment_id, "owner")
        metrics.SEGMENT_ROTATIONS.inc()

    def _must_rotate(self, seg: _Active, length: int) -> bool:
        if seg.end > 0 and seg.end + length > self._max:
            return True
        if self._clock() - seg.created >= SEAL_AFTER_S:
            return True
        # The evictor seals the oldest segment, whoever owns it, when it needs its space (and
        # on a disk too full to record that, unlinks it first).
        with self._env.begin() as txn:
            state = segment_state(txn, self._dbs, seg.segment_id)
        return state is None or bool(state.get("sealed")) or os.fstat(seg.fd).st_nlink == 0

    def _reserve(self, length: int) -> tuple[_Active, int]:
        """Claim ``length`` bytes at the end of the active segment (rotating it first when
        they would not fit, it is too old or it was sealed); the segment stays open until
        the writer releases it."""
        with self._lock:
            seg = self._active
            if seg is not None and self._must_rotate(seg, length):
                self._retire(seg)
                seg = None
            if seg is None:
                seg = self._active = self._open_new()
            seg.pending += 1
            offset = seg.end
            seg.end += length
            return seg, offset

    def _release(self, seg: _Active, offset: int, length: int, failed: bool) -> None:
        with self._lock:
            seg.pending -= 1
            if failed and seg.end == offset + length:
                seg.end = offset  # nothing after it: the next append reuses the space
            if seg.sealed and seg.pending == 0:
                os.close(seg.fd)

    def _append(self, length: int, write: Callable[..., None], payload: object) -> tuple[int, int]:
        seg, offset = self._reserve(length)
        failed = True
        try:
            try:
                self._offload(write, seg.fd, offset, payload)
            except OSError as exc:
                raise_if_disk_full(exc)
                raise
            metrics.STORAGE_SYNCS.labels("segment").inc()
            failed = False
            return seg.segment_id, offset
        finally:
            self._release(seg, offset, length, failed)

    def write(self, sources: Sequence[tuple[int, int, int]]) -> Extent:
        """Copy ``(fd, src_offset, length)`` sources back to back into the active segment
        WITHOUT fdatasync (the group commit syncs it, see ``group_commit.py``). The caller
        must :meth:`release` the returned extent once it is synced and published or given up."""
        return self._write(sum(length for _, _, length in sources), _copy, list(sources))

    def write_bytes(self, data: bytes) -> Extent:
        """:meth:`write` for bytes in memory."""
        return self._write(len(data), _pwrite_all, data)

    def _write(self, length: int, write: Callable[..., None], payload: object) -> Extent:
        seg, offset = self._reserve(length)
        try:
            if length <= SMALL_WRITE_BYTES:
                write(seg.fd, offset, payload)
            else:
                self._offload(write, seg.fd, offset, payload)
        except BaseException as exc:
            self._release(seg, offset, length, failed=True)
            if isinstance(exc, OSError):
                raise_if_disk_full(exc)
            raise
        return Extent(seg, offset, length)

    def release(self, extent: Extent) -> None:
        """Done with ``extent``: its space is never reused (it may be published)."""
        self._release(extent.segment, extent.offset, extent.length, failed=False)

    def fdatasync(self, extent: Extent) -> None:
        """fdatasync the segment that holds ``extent`` (and everything else written to it),
        in the calling thread (the group commit runs it in ``offload``) and not counted
        (the caller counts it, outside gevent's pool)."""
        try:
            os.fdatasync(extent.fd)
        except OSError as exc:
            raise_if_disk_full(exc)
            raise

    def rotate(self) -> None:
        """Seal the active segment now; the next append starts a new one (the evictor, when
        this process's active segment is the oldest)."""
        with self._lock:
            if self._active is not None:
                self._retire(self._active)

    def append(self, sources: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
        """Copy ``(fd, src_offset, length)`` sources back to back into the active segment
        and fdatasync. Returns ``(segment_id, offset)`` of the first byte."""
        return self._append(sum(length for _, _, length in sources), _copy_and_sync, list(sources))

    def append_bytes(self, data: bytes) -> tuple[int, int]:
        return self._append(len(data), _write_and_sync, data)

    def adopt(self, fd: int, length: int) -> int | None:
        """Make a fully written anonymous (``O_TMPFILE``) staging file a sealed segment of its
        own, without copying its bytes: fdatasync it, then link it into the segments
        directory. Returns the segment id, or None when the file cannot be linked here (another
        filesystem, no ``/proc``) and the caller must copy instead."""
        if not self._can_adopt:
            return None
        try:
            self._offload(os.fdatasync, fd)
        except OSError as exc:
            raise_if_disk_full(exc)
            raise
        metrics.STORAGE_SYNCS.labels("segment").inc()
        with write_txn(self._env) as txn:
            seg_id = self._new_row(txn, sealed=True, adopted=True)
        try:
            _link_anonymous(fd, segment_path(self._dir, seg_id))
        except OSError as exc:
            with write_txn(self._env) as txn:
                txn.delete(u64(seg_id), db=self._dbs.segments)
            if exc.errno in (errno.EXDEV, errno.ENOENT, errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
                self._can_adopt = False
                return None
            raise_if_disk_full(exc)
            raise
        self._offload(_fsync_dir, self._dir)
        metrics.SEGMENTS_CREATED.inc()
        return seg_id

    def close(self) -> None:
        with self._lock:
            if self._active is not None:
                try:
                    self._retire(self._active)
                except BudgetExhausted:
                    pass  # left unsealed: the evictor seals it when it is the oldest


def _copy_and_sync(dst_fd: int, dst_offset: int, sources: list[tuple[int, int, int]]) -> None:
    _copy(dst_fd, dst_offset, sources)
    os.fdatasync(dst_fd)


def _copy(dst_fd: int, dst_offset: int, sources: list[tuple[int, int, int]]) -> None:
    position = dst_offset
    for src_fd, src_offset, length in sources:
        copied = 0
        while copied < length:
            want = min(COPY_SLICE, length - copied)
            try:
                n = os.copy_file_range(src_fd, dst_fd, want, src_offset + copied, position)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                n = _pread_pwrite(src_fd, src_offset + copied, dst_fd, position, want)
            if n == 0:
                raise OSError(errno.EIO, "source ended before the expected length")
            copied += n
            position += n


def _pread_pwrite(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> int:
    data = os.pread(src_fd, length, src_offset)
    if not data:
        return 0
    view = memoryview(data)
    written = 0
    while written < len(data):
        written += os.pwrite(dst_fd, view[written:], dst_offset + written)
    return len(data)


_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000


def _link_anonymous(fd: int, path: str) -> None:
    """Give the ``O_TMPFILE`` file behind ``fd`` a name. ``linkat(AT_EMPTY_PATH)`` needs
    CAP_DAC_READ_SEARCH; without it the ``/proc/self/fd`` route works on most kernels."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(path), _AT_EMPTY_PATH) == 0:
        return
    os.link(f"/proc/self/fd/{fd}", path)


def _fsync_dir(path: str) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _pwrite_all(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)


def _write_and_sync(fd: int, offset: int, data: bytes) -> None:
    _pwrite_all(fd, offset, data)
    os.fdatasync(fd)
