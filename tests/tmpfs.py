"""Small tmpfs mounts for tests that need a filesystem that really fills up (root only).

``tmpfs(path, size)`` mounts one for the duration of a ``with`` block and skips the test
when mounting is impossible (not root, no CAP_SYS_ADMIN); CI runs as root. ``fill`` and
``DiskHog`` take its space (``bench.tmpfs``).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from bench.tmpfs import DiskHog, fill, free_bytes, mount, unmount

__all__ = ["DiskHog", "fill", "free_bytes", "tmpfs"]


@contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    try:
        mount(path, size_bytes)
    except OSError as exc:
        pytest.skip(str(exc))
    try:
        yield path
    finally:
        unmount(path)
