"""Prometheus multiprocess files that never touch a page they have not reserved.

prometheus_client keeps each process's samples in memory-mapped files (``MmapedDict``)
that it grows with ``truncate``, which leaves holes: the first write to a new page
then allocates it, and on a full filesystem that is SIGBUS, killing the process.
:func:`install` makes every such file allocate (``posix_fallocate``) the bytes of a
new sample before it is written: when there is no room, the sample is kept in this
process's memory only (not aggregated into ``/metrics``, logged once) and nothing
dies. Installed on the class, so files opened before the import are covered too.
"""
from __future__ import annotations

import logging
import mmap
import os
from typing import Any

from prometheus_client import mmap_dict

log = logging.getLogger("kura.metrics")

_ENTRY_OVERHEAD = 4 + 8 + 16  # length prefix, at most 8 bytes of padding, value + timestamp
_original_init = mmap_dict.MmapedDict.__init__
_original_read = mmap_dict.MmapedDict.read_value
_original_write = mmap_dict.MmapedDict.write_value
_warned = False


def _unshared(self: Any) -> dict[str, tuple[float, float]]:
    local = self.__dict__.get("_kura_unshared")
    if local is None:
        local = self.__dict__["_kura_unshared"] = {}
    return local


def _warn_once(filename: str, exc: OSError) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("event=metrics_file_full file=%s error=%r: new samples of this process are "
                    "kept in memory only and are missing from /metrics", filename, exc.strerror)


def _init(self: Any, filename: str, read_mode: bool = False) -> None:
    if not read_mode:
        try:
            _reserve_header(filename)
        except OSError as exc:
            _warn_once(filename, exc)
            # No file at all: every sample of this process stays in its memory.
            self._f = self._m = None
            self._fname, self._positions, self._used = filename, {}, 0
            self.__dict__["_kura_no_file"] = True
            return
    _original_init(self, filename, read_mode)


def _reserve_header(filename: str) -> None:
    """The header page is written at once: allocate it before the file is mapped. A file
    this created and could not allocate is removed (an empty file breaks the scrape)."""
    fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        empty = os.fstat(fd).st_size == 0
        try:
            os.posix_fallocate(fd, 0, mmap.PAGESIZE)
        except OSError:
            if empty:
                os.unlink(filename)
            raise
    finally:
        os.close(fd)


def _reserved(self: Any, key: str) -> bool:
    """Allocate the bytes ``key``'s new sample will occupy; False when there is no room."""
    if key in self._positions:
        return True
    if key in _unshared(self):
        return False
    if self.__dict__.get("_kura_no_file"):
        _unshared(self)[key] = (0.0, 0.0)
        return False
    try:
        os.posix_fallocate(self._f.fileno(), self._used, len(key.encode()) + _ENTRY_OVERHEAD)
    except OSError as exc:
        _warn_once(self._fname, exc)
        _unshared(self)[key] = (0.0, 0.0)
        return False
    return True


def _read_value(self: Any, key: str) -> tuple[float, float]:
    if not _reserved(self, key):
        return _unshared(self)[key]
    return _original_read(self, key)


def _write_value(self: Any, key: str, value: float, timestamp: float) -> None:
    if not _reserved(self, key):
        _unshared(self)[key] = (value, timestamp)
        return
    _original_write(self, key, value, timestamp)


def install() -> None:
    """Make every ``MmapedDict`` reserve before it writes (idempotent)."""
    cls = mmap_dict.MmapedDict
    cls.__init__ = _init  # type: ignore[method-assign]
    cls.read_value = _read_value  # type: ignore[method-assign]
    cls.write_value = _write_value  # type: ignore[method-assign]
