"""Child processes the gunicorn master owns besides its HTTP workers (REAPI, replicator).

Runs in the gunicorn master, which is never gevent-patched. Each child is started,
restarted with backoff if it dies, and stopped with SIGTERM (then SIGKILL) on shutdown.
Children get PR_SET_PDEATHSIG so that a master killed with SIGKILL takes them along;
the signal follows the *thread* that forked, so the long-lived monitor thread is the
one that spawns.
"""
from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("kura.supervisor")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class ChildProcess:
    def __init__(self, name: str, argv: list[str], *, stop_timeout_s: float = 30.0) -> None:
        self.name = name
        self.argv = argv
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"supervise-{self.name}", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _spawn(self) -> None:
        self.process = subprocess.Popen(self.argv, preexec_fn=_die_with_parent, close_fds=True)
        log.info("event=child_started name=%s pid=%d", self.name, self.process.pid)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            started_at = time.monotonic()
            self._spawn()
            self._started.set()
            code = self.process.wait()
            if self._stopping.is_set():
                break
            self.restarts += 1
            log.warning("event=child_exited name=%s code=%s restarts=%d", self.name, code, self.restarts)
            backoff = 0.5 if time.monotonic() - started_at > 30 else min(backoff * 2, 10.0)
            self._stopping.wait(backoff)

    def stop(self) -> None:
        self._stopping.set()
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(5)


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]

