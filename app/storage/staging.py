"""Bounded temp staging for incoming bodies.

A body is streamed into an anonymous temp file (``O_TMPFILE`` where the
filesystem has it, so a crash leaves nothing behind) while it is hashed. The
bytes staged by every process of the node, plus the bytes held by open
multipart uploads, count against ``KURA_TMP_DIR_MAX_BYTES``; going over it
raises ``BudgetExhausted`` and the partial file is dropped.
"""
from __future__ import annotations

import errno
import os
import tempfile
from typing import Callable

from app.errors import BudgetExhausted, DigestMismatch, TooLarge, TruncatedBody
from app.node_state import NodeState
from app.storage.backpressure import raise_if_disk_full
from app.storage.content_digests import SHA256, Hasher, new_hasher

RESERVE_STEP = 1024 * 1024


def _anonymous_file(directory: str) -> int:
    """An unnamed file in ``directory``: gone by itself if the process dies. ``O_TMPFILE``
    without ``O_EXCL`` so that a finished large body can be linked in as a segment."""
    tmpfile_flag = getattr(os, "O_TMPFILE", 0)
    if tmpfile_flag:
        try:
            return os.open(directory, tmpfile_flag | os.O_RDWR, 0o600)
        except IsADirectoryError:
            pass  # kernel or filesystem without O_TMPFILE
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EISDIR):
                raise
    fd, path = tempfile.mkstemp(dir=directory)
    os.unlink(path)
    return fd


def verify_body(size: int, expected_size: int | None, expected_hash: str | None,
                digest_function: str, hexdigest: Callable[[], str]) -> None:
    """The checks a received body passes before it is stored, wherever it was received
    (staged, or in memory when small): ``TruncatedBody`` when it is shorter than
    ``expected_size`` (a client that went away), ``DigestMismatch`` when its size or its
    ``digest_function`` digest (``hexdigest()``, computed only when ``expected_hash`` is
    given) is not the expected one."""
    if expected_size is not None and size != expected_size:
        if size < expected_size:
            raise TruncatedBody(f"Incomplete body: received {size} of {expected_size} bytes")
        raise DigestMismatch(f"Body size {size} does not match expected {expected_size}")
    if expected_hash is not None and hexdigest() != expected_hash:
        raise DigestMismatch(f"Body does not match its {digest_function} digest")


class StagedBody:
    """One body being received. Use as a context manager; the file is closed on exit.

    Bytes go straight to the file descriptor (no user-space buffer): a write the disk
    cannot take fails in :meth:`write`, never again later when the file is closed.

    ``fd`` / ``size`` continue a file that already holds ``size`` bytes (a resumed
    upload, ``app.storage.partial_uploads``): those bytes are accounted for by their
    owner, so only what is written beyond them is reserved here.
    """

    def __init__(self, area: "StagingArea", limit: int | None, too_large_message: str,
                 hashing: bool = True, digest_function: str = SHA256, *,
                 fd: int | None = None, size: int = 0) -> None:
        self._area = area
        self._limit = limit
        self._too_large = too_large_message
        self._reserved = 0
        self._base = size
        self.size = size
        self.digest_function = digest_function
        # Hashing costs a CPU pass over the body: only for keys that are digests.
        self._hash: Hasher | None = new_hasher(digest_function) if hashing else None
        if fd is not None:
            self.fd = fd
            return
        try:
            try:
                self.fd = _anonymous_file(area.directory)
            except FileNotFoundError:  # the staging directory was removed under us
                os.makedirs(area.directory, exist_ok=True)
                self.fd = _anonymous_file(area.directory)
        except OSError as exc:
            raise_if_disk_full(exc)
            raise

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        new_size = self.size + len(chunk)
        if self._limit is not None and new_size > self._limit:
            raise TooLarge(self._too_large)
        if new_size > self._base + self._reserved:
            self._reserve(max(RESERVE_STEP, new_size - self._base - self._reserved))
        view = memoryview(chunk)
        written = 0
        try:
            while written < len(view):
                written += os.pwrite(self.fd, view[written:], self.size + written)
        except OSError as exc:
            raise_if_disk_full(exc)
            raise
        if self._hash is not None:
            self._hash.update(chunk)
        self.size = new_size

    def _reserve(self, amount: int) -> None:
        self._area.reserve(amount)
        self._reserved += amount

    def reserve_upfront(self, amount: int) -> None:
        """Claim ``amount`` bytes of the budget before any are written (bootstrap knows its
        bodies' sizes). One claim larger than the whole budget still succeeds when nothing
        else is staged, so no artifact is too large to bootstrap; otherwise this raises
        ``BudgetExhausted`` and the caller waits and tries again."""
        if amount > self._reserved:
            self._area.reserve(amount - self._reserved, allow_alone=True)
            self._reserved = amount

    def restart(self) -> None:
        """Drop every byte staged so far (an upload started again from offset 0)."""
        os.ftruncate(self.fd, 0)
        self.size = 0
        if self._hash is not None:
            self._hash = new_hasher(self.digest_function)

    def hash_existing(self, chunk_size: int = RESERVE_STEP) -> None:
        """Feed the bytes the file already held (``size`` at construction) to the hash, so
        that a resumed body is verified whole. Reads one chunk at a time."""
        if self._hash is None:
            raise RuntimeError("this body was staged without hashing")
        position = 0
        while position < self.size:
            piece = os.pread(self.fd, min(chunk_size, self.size - position), position)
            if not piece:
                raise TruncatedBody("staged body shrank while it was being hashed")
            self._hash.update(piece)
            position += len(piece)

    def finish(self, *, expected_size: int | None = None, expected_hash: str | None = None) -> None:
        """Verify: a short body (client disconnect) or a wrong digest (``expected_hash``, hex,
        of this body's digest function) is rejected (:func:`verify_body`)."""
        verify_body(self.size, expected_size, expected_hash, self.digest_function,
                    lambda: self.hexdigest)

    @property
    def hexdigest(self) -> str:
        """The hex digest of the staged bytes under ``digest_function``."""
        if self._hash is None:
            raise RuntimeError("this body was staged without hashing")
        return self._hash.hexdigest()

    def read_all(self) -> bytes:
        """Small bodies only (keyvalue documents, action results)."""
        return os.pread(self.fd, self.size, 0)

    def close(self) -> None:
        try:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
        finally:
            if self._reserved:
                self._area.release(self._reserved)
                self._reserved = 0

    def __enter__(self) -> "StagedBody":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StagingArea:
    def __init__(self, directory: str, max_bytes: int, node_state: NodeState,
                 multipart_bytes: Callable[[], int]) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._state = node_state
        self._multipart_bytes = multipart_bytes
        os.makedirs(directory, exist_ok=True)

    def used_bytes(self) -> int:
        return self._state.tmp_bytes() + self._multipart_bytes()

    def reserve(self, amount: int, *, allow_alone: bool = False) -> None:
        """Claim ``amount`` bytes of the budget; ``allow_alone`` lets one body larger than
        the whole budget proceed when nothing else is staged (bootstrap)."""
        used = self.used_bytes()
        if used + amount > self.max_bytes and not (allow_alone and used == 0):
            raise BudgetExhausted(
                f"tmp staging budget exhausted (KURA_TMP_DIR_MAX_BYTES={self.max_bytes})")
        self._state.add_tmp_bytes(amount)

    def release(self, amount: int) -> None:
        self._state.add_tmp_bytes(-amount)

    def stage(self, limit: int | None = None, too_large_message: str = "Payload too large",
              hashing: bool = True, digest_function: str = SHA256) -> StagedBody:
        return StagedBody(self, limit, too_large_message, hashing, digest_function)

    def probe_writable(self) -> None:
        """Raise BudgetExhausted early when the budget is already full."""
        if self.used_bytes() >= self.max_bytes:
            raise BudgetExhausted(
                f"tmp staging budget exhausted (KURA_TMP_DIR_MAX_BYTES={self.max_bytes})")

