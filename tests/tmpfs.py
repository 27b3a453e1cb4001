"""Small tmpfs mounts for tests that need a filesystem that really fills up (root only).

``tmpfs(path, size)`` mounts one for the duration of a ``with`` block and skips the
test when mounting is impossible (not root, no CAP_SYS_ADMIN); CI runs as root.
``fill(directory)`` writes a ballast file until the filesystem has no space left.
"""
from __future__ import annotations

import ctypes
import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", 0, f"size={size_bytes}".encode()) != 0:
        pytest.skip(f"cannot mount a tmpfs: {os.strerror(ctypes.get_errno())}")
    try:
        yield path
    finally:
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
            os.posix_fallocate(fd, os.fstat(fd).st_size, want)
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
