"""How a process of a node is asked to stop: SIGTERM or SIGINT, alone or with the whole group.

Every process of a node treats both signals the same way: stop taking new work, let
what is in flight finish (bounded by ``KURA_DRAIN_COMPLETION_TIMEOUT_MS``), exit 0.
The signal may reach one process (an operator, the kubelet to PID 1) or every process
of the node at once (``kill -- -PGID``, systemd's ``KillMode=control-group``, Ctrl-C
in a terminal); the gunicorn master stops whatever is left after its drain.

The REAPI process and the replicator call :func:`listen` as the first thing in their
``main()`` and end with :meth:`StopRequest.wait`; they install no handler of their own.
The supervisor starts them with SIGINT held pending (a Ctrl-C that arrives while the
child is still importing waits for :func:`listen` instead of raising
``KeyboardInterrupt`` mid-import); SIGTERM keeps its default action until then,
which ends a child that has nothing in flight yet.
"""
from __future__ import annotations

import os
import select
import signal
from contextlib import contextmanager
from types import FrameType
from typing import Iterable, Iterator

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def held(signals: Iterable[int]) -> Iterator[None]:
    """Keep ``signals`` pending in the calling thread for the block. A process forked
    inside the block starts with them held too (the mask survives fork and exec)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def release(signals: Iterable[int]) -> None:
    """Deliver and stop holding ``signals`` in the calling thread (handlers must be in place)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def ignore(signals: Iterable[int]) -> None:
    """Ignore ``signals`` from now on (main thread only)."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)


class StopRequest:
    """Set once by the first SIGTERM or SIGINT. The handler only writes to a pipe, so it
    is safe whatever the interrupted code holds (a ``threading.Event`` set from a handler
    can deadlock on the event's own lock), and :meth:`wait` is a ``select`` on that pipe,
    which gevent makes cooperative in a monkey-patched process."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        self.signal_name: str | None = None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        # One request is enough. Ignored from now on, a later one (the master's SIGTERM
        # after a group signal) cannot kill the process while it finishes: Python resets
        # its handlers to the default action at exit.
        ignore(STOP_SIGNALS)
        os.write(self._write_fd, b"\0")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop was requested or ``timeout`` passed; True if requested."""
        readable, _, _ = select.select([self._read_fd], [], [], timeout)
        return bool(readable)


def listen() -> StopRequest:
    """From now on SIGTERM and SIGINT request a graceful stop of this process (main thread
    only). A signal that arrived before, while it was held pending, is taken now."""
    request = StopRequest()
    for signum in STOP_SIGNALS:
        signal.signal(signum, request._on_signal)
    release(STOP_SIGNALS)
    return request
