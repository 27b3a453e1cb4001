"""A small tmpfs that really fills up (root only): the disk of the full-disk scenarios.

``mount`` / ``unmount`` a size-limited tmpfs, ``fill`` it with a ballast file, and
``DiskHog``: another tenant of the disk that keeps taking every byte that frees up.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def mount(path: Path, size_bytes: int) -> None:
    """Mount a tmpfs of ``size_bytes`` on ``path``; raises OSError (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", 0, f"size={size_bytes}".encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount a tmpfs on {path}: {os.strerror(err)}")


def unmount(path: Path) -> None:
    _libc.umount2(os.fsencode(path), MNT_DETACH)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(directory: Path, leave_bytes: int = 0, name: str = "ballast") -> Path:
    """Take all the free space of ``directory``'s filesystem but ``leave_bytes`` with a file."""
    ballast = directory / name
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        want = free_bytes(directory) - leave_bytes
        if want > 0:
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, want)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:  # someone took part of it meanwhile
                    raise
        if leave_bytes == 0:
            block = b"\0" * 4096
            while True:  # whatever fallocate's rounding left
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return ballast


class DiskHog:
    """Keeps ``directory``'s filesystem full: every ``interval_s`` it takes what was freed
    (by eviction, a finished upload) with ballast files, until :meth:`release` deletes them."""

    def __init__(self, directory: Path, interval_s: float = 0.05) -> None:
        self.directory = directory
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-hog", daemon=True)
        self._files: list[Path] = []

    def start(self) -> "DiskHog":
        self._take()
        self._thread.start()
        return self

    def _take(self) -> None:
        if free_bytes(self.directory) > 0:
            self._files.append(fill(self.directory, name=f"ballast-{len(self._files)}"))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        for path in self._files:
            path.unlink(missing_ok=True)
