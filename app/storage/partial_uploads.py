"""Resumable uploads: the bytes of an unfinished ByteStream write, kept between calls.

A partial upload is a file in ``{KURA_TMP_DIR}/uploads`` named by the hash of its
upload name, so any process of the node (several may serve the REAPI port) resumes
it. While a call writes to it, the call holds an exclusive ``flock`` on the file;
a second call for the same upload waits for it (bounded), so two streams never
interleave their bytes. Bytes are written with ``pwrite`` (no user-space buffer):
whatever a call wrote is in the file, for the next call and for the segment copy,
even when the writing process is killed.

Accounting: while a call streams, its new bytes are reserved in the tmp staging
budget like any staged body; when the call ends with the upload unfinished, the
file's size is recorded in the ``partial_uploads`` table and the
``partial_upload_bytes`` counter (counted by the budget) in one transaction. A
finished or discarded upload is unlinked, then its record and bytes are dropped.
Uploads untouched for ``KURA_MULTIPART_UPLOAD_TTL_MS`` are removed by
:meth:`PartialUploads.expire` (the housekeeper's janitor).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from typing import Iterator

from app.errors import KuraError
from app.storage.backpressure import raise_if_disk_full
from app.storage.lmdb_env import PARTIAL_UPLOAD_BYTES, add_counter, write_txn
from app.storage.staging import StagedBody
from app.storage.store import ArtifactStore

log = logging.getLogger("kura.storage")

LOCK_WAIT_S = 10.0
_LOCK_POLL_S = 0.05


class UploadBusy(KuraError):
    """Another call is still writing this upload (gRPC ABORTED: retry later)."""

    http_status = 409


class PartialUpload:
    """One upload opened by a call: ``body`` continues the bytes kept so far."""

    def __init__(self, body: StagedBody) -> None:
        self.body = body
        self.discarded = False

    @property
    def kept_bytes(self) -> int:
        """Bytes committed before this call (what QueryWriteStatus reported)."""
        return self.body.size

    def discard(self) -> None:
        """Drop the upload when the call ends (finished, or its bytes are unusable)."""
        self.discarded = True


class PartialUploads:
    """The node's partial uploads (one instance per process, over its ``ArtifactStore``)."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.directory = store.partial_uploads_dir

    @staticmethod
    def file_name(upload_name: str) -> str:
        return hashlib.sha256(upload_name.encode()).hexdigest()

    def committed_bytes(self, upload_name: str) -> int | None:
        """Bytes kept for ``upload_name``, or None when nothing is kept."""
        try:
            return os.stat(os.path.join(self.directory, self.file_name(upload_name))).st_size
        except FileNotFoundError:
            return None

    @contextmanager
    def open(self, upload_name: str, *, limit: int | None, too_large_message: str,
             digest_function: str) -> Iterator[PartialUpload]:
        """Open (or create) the upload, locked for this call; on exit keep it for a later
        call, or remove it when :meth:`PartialUpload.discard` was called."""
        name = self.file_name(upload_name)
        path = os.path.join(self.directory, name)
        fd = self._open_locked(path)
        try:
            body = StagedBody(self.store.staging, limit, too_large_message,
                              digest_function=digest_function, fd=fd, size=os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        upload = PartialUpload(body)
        try:
            yield upload
        finally:
            # The lock is held until body.close(): record or remove before releasing it.
            try:
                if upload.discarded or body.size == 0:  # nothing worth keeping
                    os.unlink(path)
                    self._set_record(name, None)
                else:
                    self._set_record(name, body.size)
            finally:
                body.close()

    def _open_locked(self, path: str) -> int:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except FileNotFoundError:  # the uploads directory was removed under us
                os.makedirs(self.directory, exist_ok=True)
                continue
            except OSError as exc:
                raise_if_disk_full(exc)
                raise
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise UploadBusy("Another write of this upload is in progress") from None
                        time.sleep(_LOCK_POLL_S)
                # The holder we waited for may have finished and unlinked the file: then
                # this descriptor is a dead inode and the upload starts on a new file.
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
                if current is not None and current.st_ino == os.fstat(fd).st_ino:
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _set_record(self, name: str, size: int | None) -> None:
        """Record ``size`` kept bytes for ``name`` (None: none), adjusting the budget counter."""
        dbs = self.store.dbs
        key = name.encode()
        # Must not yield while this write transaction is open.
        with write_txn(self.store.env) as txn:
            raw = txn.get(key, db=dbs.partial_uploads)
            previous = json.loads(raw)["size"] if raw else 0
            if size is None:
                if raw is not None:
                    txn.delete(key, db=dbs.partial_uploads)
            else:
                txn.put(key, json.dumps({"size": size, "ms": self.store.now_ms()}).encode(),
                        db=dbs.partial_uploads)
            delta = (size or 0) - previous
            if delta:
                add_counter(txn, dbs.meta, PARTIAL_UPLOAD_BYTES, delta)

    def expire(self, older_than_ms: int) -> int:
        """Remove uploads last written before ``older_than_ms``: recorded ones by the time
        of their record, files no record owns (a process killed mid-call) by their mtime.
        Uploads a call holds are left alone, and records whose file is gone are dropped.
        Returns how many uploads were removed."""
        with self.store.env.begin() as txn:
            recorded = {key.decode(): json.loads(raw)["ms"]
                        for key, raw in txn.cursor(db=self.store.dbs.partial_uploads)}
        removed = 0
        for entry in os.scandir(self.directory):
            last_ms = recorded.pop(entry.name, None)
            if last_ms is None:
                try:
                    last_ms = int(entry.stat().st_mtime * 1000)
                except FileNotFoundError:
                    continue
            if last_ms < older_than_ms and self._remove_unless_busy(entry.name):
                removed += 1
        for name in recorded:  # no file: the tmp dir was cleaned under us
            if not os.path.exists(os.path.join(self.directory, name)):
                self._set_record(name, None)
        return removed

    def _remove_unless_busy(self, name: str) -> bool:
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            self._set_record(name, None)
            log.info("event=partial_upload_expired file=%s", name)
            return True
        finally:
            os.close(fd)
