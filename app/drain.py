"""Graceful drain, run by the gunicorn master (SPEC section 6.8).

SIGTERM or SIGUSR1 → the node is draining: ``/ready`` answers 503 and new non-probe
requests get 503 ``server is draining`` with ``Connection: close`` while in-flight
requests (HTTP and gRPC) finish, bounded by ``KURA_DRAIN_COMPLETION_TIMEOUT_MS``.
After SIGTERM the master then stops for real (gunicorn's graceful stop); SIGUSR1
only drains (a preStop hook sends it before the kubelet's SIGTERM).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

from app.node_state import NodeState

log = logging.getLogger("kura.drain")
POLL_S = 0.1
FLUSH_GRACE_S = 0.2


class DrainController:
    def __init__(self, node_state: NodeState, timeout_ms: int) -> None:
        self.node_state = node_state
        self.timeout_s = timeout_ms / 1000
        self.finished = False
        self._exit_requested = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def begin(self, *, exit_after: bool) -> None:
        with self._lock:
            self._exit_requested = self._exit_requested or exit_after
            if self._thread is not None:
                return
            self.node_state.set("draining", 1)
            self.node_state.set("ready", 0)
            log.info("event=drain_started inflight=%d", self.node_state.inflight())
            self._thread = threading.Thread(target=self._wait, name="drain", daemon=True)
            self._thread.start()

    def _wait(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and self.node_state.inflight() > 0:
            time.sleep(POLL_S)
        time.sleep(FLUSH_GRACE_S)
        left = self.node_state.inflight()
        log.info("event=drain_completed inflight_left=%d", left)
        with self._lock:
            self.finished = True
            exit_now = self._exit_requested
        if exit_now:
            os.kill(os.getpid(), signal.SIGTERM)
