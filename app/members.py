"""The mesh members this node replicates to, shared by every process of the node.

The replicator owns membership (static ``KURA_PEERS`` + DNS discovery, probed through
``/_internal/status``) and publishes the admitted peers' node URLs to
``members.json`` in the node's run directory with an atomic replace (``app.state_files``: a failed
write, on a full disk, is retried at the next membership round). Every writing process (HTTP
workers, the REAPI process, the replicator itself) reads it through ``MemberList``
to know which peers get an outbox row for each local write. Reads are cached and
re-checked at most every ``RECHECK_S`` seconds (one ``stat``), so a write pays nothing
measurable; the replicator waits longer than that before relying on a new member
being seen by every writer (see ``app.replication.bootstrap``).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Sequence

from app.run_dir import MEMBERS
from app.state_files import StateFile, read_json, replace_json

RECHECK_S = 0.25


def members_path(run_dir: str) -> str:
    return os.path.join(run_dir, MEMBERS)


def write_members(run_dir: str, members: Sequence[str]) -> None:
    """Publish the admitted peers (raises OSError when the file cannot be written)."""
    replace_json(members_path(run_dir), sorted(set(members)))


def read_members(run_dir: str) -> list[str]:
    members = read_json(members_path(run_dir))
    if not isinstance(members, list):
        return []
    return [m for m in members if isinstance(m, str)]


class MembersPublisher:
    """The replicator's side: publishes the admitted peers whenever they differ from what
    was last written, so a write that failed (a full disk) is retried at the next call."""

    def __init__(self, run_dir: str) -> None:
        self._file = StateFile(members_path(run_dir))
        self._written: list[str] | None = None

    def publish(self, members: Sequence[str]) -> None:
        doc = sorted(set(members))
        if doc != self._written and self._file.write(doc):
            self._written = doc


class MemberList:
    """A cached view of the published members; safe for threads and greenlets."""

    def __init__(self, run_dir: str, own_url: str, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self._path = members_path(run_dir)
        self._run_dir = run_dir
        self._own = own_url.rstrip("/")
        self._clock = clock
        self._lock = threading.Lock()
        self._checked = -1.0
        self._stamp: tuple[int, int] | None = None
        self._members: tuple[str, ...] = ()

    def current(self) -> tuple[str, ...]:
        """Peers that get an outbox row for a local write (never this node itself)."""
        now = self._clock()
        if now - self._checked < RECHECK_S:
            return self._members
        with self._lock:
            if now - self._checked < RECHECK_S:
                return self._members
            try:
                st = os.stat(self._path)
                stamp: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp:
                members = read_members(self._run_dir) if stamp is not None else []
                self._members = tuple(m for m in members if m.rstrip("/") != self._own)
                self._stamp = stamp
            self._checked = now
            return self._members
