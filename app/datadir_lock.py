"""The exclusive writer lock a node's master holds on its data directory."""
from __future__ import annotations

import fcntl
import os
import time


class DataDirLocked(RuntimeError):
    pass


class DataDirLock:
    def __init__(self, data_dir: str) -> None:
        self.path = os.path.join(data_dir, "LOCK")
        self._fd: int | None = None

    def acquire(self, wait_s: float = 3.0) -> None:
        """Take the lock, waiting up to ``wait_s`` (the workers of a node killed a moment
        ago may still hold it while they notice their master is gone)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise DataDirLocked(
                        f"data directory {os.path.dirname(os.path.abspath(self.path))} is in use by "
                        f"another kura-py node (pid {holder}); refusing to start a second writer"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
