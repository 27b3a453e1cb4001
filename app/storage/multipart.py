"""Multipart uploads (Tuist module cache): parts staged as files, state in LMDB.

Part bytes count against the tmp staging budget through the ``multipart_bytes``
counter, updated in the same transaction that records the part. Completing an
upload appends the parts back to back into a segment and publishes the artifact
in one commit; the upload's files are removed afterwards.
"""
from __future__ import annotations

import errno
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

from app.errors import BadRequest, NotFound, Unprocessable
from app.storage.backpressure import raise_if_disk_full
from app.storage.lmdb_env import MULTIPART_BYTES, add_counter, write_txn
from app.storage.staging import StagedBody
from app.storage.store import ArtifactStore, WriteResult

MAX_PART_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_BYTES = 2 * 1024 * 1024 * 1024


@dataclass(frozen=True)
class Upload:
    upload_id: str
    producer: str
    namespace_id: str
    key: str
    created_ms: int
    parts: dict[int, tuple[str, int]]  # part number -> (file name, size)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.parts.values())


def _decode(upload_id: str, raw: bytes) -> Upload:
    doc = json.loads(raw)
    parts = {int(n): (name, size) for n, (name, size) in doc["parts"].items()}
    return Upload(upload_id, doc["producer"], doc["ns"], doc["key"], doc["created_ms"], parts)


def _encode(upload: Upload) -> bytes:
    return json.dumps({"producer": upload.producer, "ns": upload.namespace_id, "key": upload.key,
                       "created_ms": upload.created_ms,
                       "parts": {str(n): list(v) for n, v in upload.parts.items()}}).encode()


class MultipartUploads:
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._dir = store.multipart_dir

    def start(self, producer: str, namespace_id: str, key: str) -> str:
        upload_id = str(uuid.uuid4())
        upload = Upload(upload_id, producer, namespace_id, key, self.store.now_ms(), {})
        with write_txn(self.store.env) as txn:
            txn.put(upload_id.encode(), _encode(upload), db=self.store.dbs.multipart)
        return upload_id

    def get(self, upload_id: str) -> Upload:
        with self.store.env.begin() as txn:
            raw = txn.get(upload_id.encode(), db=self.store.dbs.multipart)
        if raw is None:
            raise NotFound("Upload not found")
        return _decode(upload_id, raw)

    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def put_part(self, upload_id: str, part_number: int, staged: StagedBody) -> None:
        """Persist a fully received part; a resend of the same number replaces it."""
        upload = self.get(upload_id)
        others = sum(size for n, (_, size) in upload.parts.items() if n != part_number)
        if others + staged.size > MAX_UPLOAD_BYTES:
            raise Unprocessable("Upload exceeds the 2 GiB total limit")
        name = f"{upload_id}.{part_number}.{uuid.uuid4().hex}"
        path = self._path(name)
        try:
            _copy_to_new_file(staged.fd, staged.size, path)
        except OSError as exc:
            raise_if_disk_full(exc)  # a full KURA_TMP_DIR is 429, like staging the part was
            raise
        replaced: str | None = None
        dbs = self.store.dbs
        try:
            with write_txn(self.store.env) as txn:
                raw = txn.get(upload_id.encode(), db=dbs.multipart)
                if raw is None:
                    raise NotFound("Upload not found")
                current = _decode(upload_id, raw)
                previous = current.parts.get(part_number)
                parts = dict(current.parts)
                parts[part_number] = (name, staged.size)
                txn.put(upload_id.encode(), _encode(
                    Upload(upload_id, current.producer, current.namespace_id, current.key,
                           current.created_ms, parts)), db=dbs.multipart)
                add_counter(txn, dbs.meta, MULTIPART_BYTES,
                            staged.size - (previous[1] if previous else 0))
                replaced = previous[0] if previous else None
        except BaseException:
            os.unlink(path)
            raise
        if replaced:
            _unlink_quietly(self._path(replaced))

    def complete(self, upload_id: str, part_numbers: list[Any]) -> WriteResult:
        upload = self.get(upload_id)
        if (not isinstance(part_numbers, list)
                or any(not isinstance(n, int) or isinstance(n, bool) for n in part_numbers)
                or part_numbers != sorted(upload.parts) or not part_numbers):
            raise BadRequest("Parts mismatch or missing parts")
        fds = []
        try:
            for n in part_numbers:
                fds.append((os.open(self._path(upload.parts[n][0]), os.O_RDONLY), 0, upload.parts[n][1]))
            result = self.store.put_sources(upload.producer, upload.namespace_id, upload.key, fds,
                                            "application/octet-stream")
        except FileNotFoundError:
            raise NotFound("Upload not found") from None
        finally:
            for fd, _, _ in fds:
                os.close(fd)
        self.remove(upload_id)
        return result

    def remove(self, upload_id: str) -> bool:
        dbs = self.store.dbs
        with write_txn(self.store.env) as txn:
            raw = txn.get(upload_id.encode(), db=dbs.multipart)
            if raw is None:
                return False
            upload = _decode(upload_id, raw)
            txn.delete(upload_id.encode(), db=dbs.multipart)
            add_counter(txn, dbs.meta, MULTIPART_BYTES, -upload.total_bytes)
        for name, _ in upload.parts.values():
            _unlink_quietly(self._path(name))
        return True

    def expire(self, older_than_ms: int) -> int:
        """Remove uploads started before ``older_than_ms`` and part files no upload owns."""
        expired = []
        with self.store.env.begin() as txn:
            for key, raw in txn.cursor(db=self.store.dbs.multipart):
                if json.loads(raw)["created_ms"] < older_than_ms:
                    expired.append(key.decode())
        removed = sum(1 for upload_id in expired if self.remove(upload_id))
        self._remove_orphan_files()
        return removed

    def _remove_orphan_files(self) -> None:
        # A part file is written before the transaction that records it, but only for an
        # upload whose record exists; a file whose upload record is gone is garbage.
        with self.store.env.begin() as txn:
            for entry in os.scandir(self._dir):
                upload_id = entry.name.split(".", 1)[0]
                if txn.get(upload_id.encode(), db=self.store.dbs.multipart) is None:
                    _unlink_quietly(entry.path)


def _copy_to_new_file(src_fd: int, size: int, path: str) -> None:
    """Copy ``size`` bytes of ``src_fd`` into a new file at ``path`` and fsync it; on any
    error the new file is removed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copied = 0
        while copied < size:
            n = os.copy_file_range(src_fd, fd, size - copied, copied, copied)
            if n == 0:
                raise OSError(errno.EIO, "staged part ended before its size")
            copied += n
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
