"""Child processes the gunicorn master owns besides its HTTP workers (REAPI, replicator).

Runs in the gunicorn master, which is never gevent-patched. Each child is started and,
while the node serves, restarted with backoff if it dies. Once the node stops
(:meth:`ChildProcess.stop_supervising`, at the first SIGTERM/SIGINT to the master) a
child that exits stays down, whatever ended it: a signal sent to the whole process
group reaches the children directly, and restarting them then would leave fresh
processes for the master to chase. Stopping is SIGTERM, then SIGKILL at a deadline.

Children get PR_SET_PDEATHSIG so that a master killed with SIGKILL takes them along;
the signal follows the *thread* that forked, so the long-lived monitor thread is the
one that spawns.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable

from app.stop_signals import held

log = logging.getLogger("kura.supervisor")
PR_SET_PDEATHSIG = 1
# A child that dies is restarted after 0.5 s, then 1, 2, ... 10 s while it keeps dying
# young; one that ran for STABLE_RUN_S starts over at the minimum.
RESTART_BACKOFF_MIN_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
STABLE_RUN_S = 30.0


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class ChildProcess:
    """One supervised ``python -m ...`` process of the node."""

    def __init__(self, name: str, argv: list[str],
                 on_exit: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.argv = argv
        # Called with the pid of every process of this child once it has exited (reaped).
        self.on_exit = on_exit
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        # Held while spawning: a SIGTERM from terminate() never lands between fork and
        # exec, where the child still runs the master's handlers and would lose it.
        self._spawn_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"supervise-{self.name}", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _spawn(self) -> bool:
        with self._spawn_lock:
            if self._stopping.is_set():
                return False
            # SIGINT stays pending in the child until it listens (app.stop_signals).
            with held((signal.SIGINT,)):
                self.process = subprocess.Popen(self.argv, preexec_fn=_die_with_parent, close_fds=True)
        log.info("event=child_started name=%s pid=%d", self.name, self.process.pid)
        return True

    def _run(self) -> None:
        backoff = RESTART_BACKOFF_MIN_S
        try:
            while True:
                started_at = time.monotonic()
                if not self._spawn():
                    return
                self._started.set()
                code = self.process.wait()
                if self.on_exit is not None:
                    self.on_exit(self.process.pid)
                if self._stopping.is_set():
                    log.info("event=child_stopped name=%s code=%s", self.name, code)
                    return
                self.restarts += 1
                log.warning("event=child_exited name=%s code=%s restarts=%d", self.name, code, self.restarts)
                if time.monotonic() - started_at > STABLE_RUN_S:
                    backoff = RESTART_BACKOFF_MIN_S
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
        finally:
            self._started.set()

    def stop_supervising(self) -> None:
        """From now on a child that exits is not restarted (the node is stopping)."""
        self._stopping.set()

    def terminate(self) -> None:
        """Stop supervising and ask the running child, if any, to stop (SIGTERM); no wait."""
        with self._spawn_lock:
            self._stopping.set()
            proc = self.process
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def stop(self, deadline: float) -> None:
        """Terminate the child and wait for it until ``deadline`` (monotonic), then SIGKILL."""
        self.terminate()
        thread = self._thread
        if thread is None:
            return
        thread.join(max(0.0, deadline - time.monotonic()))
        proc = self.process
        if thread.is_alive() and proc is not None:
            log.warning("event=child_killed name=%s pid=%d reason=stop_deadline", self.name, proc.pid)
            proc.kill()
            thread.join(5)


def reap(pids: Iterable[int], deadline: float) -> None:
    """Wait until ``deadline`` (monotonic) for child processes already sent SIGKILL to be
    gone. gunicorn reaps its workers once, right after SIGKILLing them, and an overdue
    worker still dying then would outlive the master."""
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                pending.discard(pid)
        if pending:
            time.sleep(0.01)


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]
