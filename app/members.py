"""The mesh members this node replicates to, shared by every process of the node.

The replicator owns membership (static ``KURA_PEERS`` + DNS discovery, probed through
``/_internal/status``) and publishes the admitted peers' node URLs to
``<data_dir>/run/members.json`` with an atomic replace. Every writing process (HTTP
workers, the REAPI process, the replicator itself) reads it through ``MemberList``
to know which peers get an outbox row for each local write. Reads are cached and
re-checked at most every ``RECHECK_S`` seconds (one ``stat``), so a write pays nothing
measurable; the replicator waits longer than that before relying on a new member
being seen by every writer (see ``app.replication.bootstrap``).
"""
from __future__ import annotations

import json
import os
import threading
import time

RECHECK_S = 0.25


def members_path(data_dir: str) -> str:
    return os.path.join(data_dir, "run", "members.json")


def write_members(data_dir: str, members: list[str] | tuple[str, ...]) -> None:
    """Publish the admitted peers (replicator only)."""
    path = members_path(data_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(sorted(set(members)), fh)
    os.replace(tmp, path)


def read_members(data_dir: str) -> list[str]:
    try:
        with open(members_path(data_dir)) as fh:
            members = json.load(fh)
    except (FileNotFoundError, ValueError):
        return []
    if not isinstance(members, list):
        return []
    return [m for m in members if isinstance(m, str)]


class MemberList:
    """A cached view of the published members; safe for threads and greenlets."""

    def __init__(self, data_dir: str, own_url: str, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self._path = members_path(data_dir)
        self._data_dir = data_dir
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
                members = read_members(self._data_dir) if stamp is not None else []
                self._members = tuple(m for m in members if m.rstrip("/") != self._own)
                self._stamp = stamp
            self._checked = now
            return self._members
