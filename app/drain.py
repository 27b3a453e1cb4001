"""Graceful drain and stop, run by the gunicorn master (SPEC section 6.8).

SIGTERM or SIGINT (the first one; later ones change nothing) or SIGUSR1 → the node is
draining: ``/ready`` answers 503 and new non-probe requests get 503 ``server is
draining`` with ``Connection: close`` while in-flight requests (HTTP and gRPC) finish,
bounded by ``KURA_DRAIN_COMPLETION_TIMEOUT_MS``. SIGUSR1 only drains (a preStop hook
sends it before the kubelet's SIGTERM).

After SIGTERM/SIGINT the node stops: from the signal on nothing is restarted (neither
HTTP workers nor the REAPI process or the replicator: when the whole process group was
signalled they are stopping on their own), and once the drain is over the children are
sent SIGTERM and the master stops its workers. What is still in flight then is overdue,
so each of those two steps gets only ``STOP_GRACE_S`` before SIGKILL: a node stops
within the drain timeout plus a few seconds whatever the signals were.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol, Sequence

from app.node_state import NodeState

log = logging.getLogger("kura.drain")
POLL_S = 0.1
FLUSH_GRACE_S = 0.2
STOP_GRACE_S = 3


class Supervised(Protocol):
    def stop_supervising(self) -> None: ...

    def terminate(self) -> None: ...


class DrainController:
    """The drain and, after SIGTERM/SIGINT, the stop of one node.

    ``stop_master`` is called (from the drain thread) once the drain is over and a stop
    was requested; it must make the master run its own graceful stop.
    """

    def __init__(self, node_state: NodeState, timeout_ms: int, *,
                 children: Sequence[Supervised] = (),
                 stop_master: Callable[[], None] | None = None) -> None:
        self.node_state = node_state
        self.timeout_s = timeout_ms / 1000
        self.children = children
        self.stop_master = stop_master
        self.finished = False
        self.stop_sent = False
        self._exit_requested = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def exiting(self) -> bool:
        """A stop was requested: nothing of the node may be (re)started any more."""
        return self._exit_requested

    def begin(self, *, exit_after: bool, reason: str = "") -> None:
        stop_now = False
        with self._lock:
            if exit_after and not self._exit_requested:
                self._exit_requested = True
                log.info("event=node_stopping signal=%s", reason or "-")
                for child in self.children:
                    child.stop_supervising()
                stop_now = self.finished  # drained already (SIGUSR1 first)
            if self._thread is None:
                self.node_state.set("draining", 1)
                self.node_state.set("ready", 0)
                log.info("event=drain_started inflight=%d", self.node_state.inflight())
                self._thread = threading.Thread(target=self._wait, name="drain", daemon=True)
                self._thread.start()
        if stop_now:
            self._stop()

    def _wait(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and self.node_state.inflight() > 0:
            time.sleep(POLL_S)
        time.sleep(FLUSH_GRACE_S)
        left = self.node_state.inflight()
        log.info("event=drain_completed inflight_left=%d", left)
        with self._lock:
            self.finished = True
            stop_now = self._exit_requested
        if stop_now:
            self._stop()

    def _stop(self) -> None:
        with self._lock:
            if self.stop_sent:
                return
            self.stop_sent = True
        for child in self.children:
            child.terminate()
        if self.stop_master is not None:
            self.stop_master()
