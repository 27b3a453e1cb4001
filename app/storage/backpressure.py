"""Running out of space is backpressure: the one place that turns it into ``BudgetExhausted``.

A full disk, quota, file-descriptor table or LMDB map answers writes with 429 +
Retry-After (HTTP) or RESOURCE_EXHAUSTED (gRPC), counted by budget in
``kura_backpressure_rejections_total``; nothing partial is kept by the caller.
"""
from __future__ import annotations

import errno
import os

import lmdb

from app import metrics
from app.errors import BudgetExhausted

DISK_FULL_MESSAGE = "disk is full: the data directory has no space left"
# LMDB reports a short write (no space left) as EIO, without an errno: a failed commit
# on a filesystem with less than this free is taken for a full disk.
LOW_SPACE_BYTES = 64 * 1024 * 1024


def raise_if_disk_full(exc: OSError) -> None:
    """Turn running out of disk or file descriptors into backpressure (429), not a 500."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        metrics.BACKPRESSURE.labels("disk").inc()
        raise BudgetExhausted(DISK_FULL_MESSAGE) from exc
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        metrics.BACKPRESSURE.labels("file_descriptors").inc()
        raise BudgetExhausted("file-descriptor budget exhausted") from exc


def raise_if_lmdb_full(env: lmdb.Environment, exc: BaseException) -> None:
    """Turn a failed LMDB write into backpressure when its map or its disk is full."""
    if isinstance(exc, lmdb.MapFullError):
        metrics.BACKPRESSURE.labels("lmdb_map").inc()
        raise BudgetExhausted("the metadata store is full (KURA_LMDB_MAP_SIZE)") from exc
    if isinstance(exc, lmdb.Error) and disk_full(env.path()):
        metrics.BACKPRESSURE.labels("disk").inc()
        raise BudgetExhausted(DISK_FULL_MESSAGE) from exc


def disk_full(path: str) -> bool:
    """Whether the filesystem holding ``path`` is (nearly) out of space."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < LOW_SPACE_BYTES
