"""State shared by every process of one node through a small memory-mapped file.

The gunicorn master creates (and wipes) ``node-state`` in the node's per-run directory
(``app.run_dir``, on a memory filesystem) at start. Its pages are allocated before
they are mapped, so no access can fault for lack of space.
The header holds node-wide flags (draining, ready, generation, ...). Each
process claims one slot for its own counters (in-flight requests, bytes staged
in the tmp dir); only the owner writes its slot, anyone may sum them. Aligned
8-byte stores are atomic on the platforms we run on, so no lock is needed for
reads and single-writer updates.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import time
from typing import Iterator

from app.run_dir import NODE_STATE

MAGIC = 0x4B5552415354  # "KURAST"
HEADER_FIELDS = (
    "magic", "draining", "ready", "generation", "discovery_done", "members",
    "bootstrap_known", "bootstrap_completed", "bootstrap_inflight", "started_ms",
    "writer_lock",  # the master holds the data directory's exclusive lock
    "master_pid",
)
HEADER_WORDS = 16
SLOT_FIELDS = ("pid", "kind", "inflight", "tmp_bytes", "latency_ewma_us", "latency_sample_ms",
               "serving")  # serving: a REAPI process listens and answers calls
SLOT_WORDS = 7
LATENCY_MAX_AGE_MS = 30_000  # an EWMA with no sample for this long no longer counts (as Kura)
MAX_SLOTS = 128
SIZE = 8 * (HEADER_WORDS + SLOT_WORDS * MAX_SLOTS)

KIND_HTTP = 1
KIND_REAPI = 2
KIND_REPLICATOR = 3
KIND_OTHER = 4
KIND_NAMES = {KIND_HTTP: "http", KIND_REAPI: "reapi", KIND_REPLICATOR: "replicator", KIND_OTHER: "other"}


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


class NodeState:
    """One process's view of the shared node state file."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Allocate every page before mapping (a no-op once allocated): a page first touched
            # through the map on a full filesystem would be SIGBUS, this is an OSError.
            os.posix_fallocate(fd, 0, SIZE)
            self._fd = fd
            self._map = mmap.mmap(fd, SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._words = memoryview(self._map).cast("q")
        if self._words[0] != MAGIC:
            self._words[0] = MAGIC
        self._slot = -1
        self._pid = 0

    @classmethod
    def reset(cls, path: str) -> "NodeState":
        """Wipe the file (master, at node start: no other process of the node is alive)."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"\0" * SIZE)
        return cls(path)

    # -- header -----------------------------------------------------------------
    def get(self, name: str) -> int:
        return self._words[HEADER_FIELDS.index(name)]

    def set(self, name: str, value: int) -> None:
        self._words[HEADER_FIELDS.index(name)] = int(value)

    @property
    def draining(self) -> bool:
        return bool(self.get("draining"))

    # -- slots ------------------------------------------------------------------
    def _base(self, slot: int) -> int:
        return HEADER_WORDS + slot * SLOT_WORDS

    def claim_slot(self, kind: int) -> int:
        """Claim a free slot (or one of a dead process) for this process."""
        pid = os.getpid()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            for slot in range(MAX_SLOTS):
                base = self._base(slot)
                owner = self._words[base]
                if owner == pid or not pid_alive(owner):
                    for word in range(1, SLOT_WORDS):
                        self._words[base + word] = 0
                    self._words[base + 1] = kind
                    self._words[base] = pid
                    self._slot = slot
                    self._pid = pid
                    return slot
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        raise RuntimeError("node state has no free process slot")

    def release_pid(self, pid: int) -> None:
        """Forget a process that exited (master, from child_exit)."""
        for slot in range(MAX_SLOTS):
            base = self._base(slot)
            if self._words[base] == pid:
                for word in range(1, SLOT_WORDS):
                    self._words[base + word] = 0
                self._words[base] = 0

    def _own(self) -> int:
        """This process's slot, claimed on first use. Compares with the pid remembered at
        claim time (no getpid syscall on every request); a process never uses a NodeState
        across a fork, and a released slot is claimed again."""
        if self._slot < 0 or self._words[self._base(self._slot)] != self._pid:
            self.claim_slot(KIND_OTHER)
        return self._base(self._slot)

    def add_inflight(self, delta: int) -> None:
        base = self._own()
        self._words[base + 2] += delta

    def add_tmp_bytes(self, delta: int) -> None:
        base = self._own()
        self._words[base + 3] += delta

    def note_latency(self, seconds: float) -> None:
        """Fold one public request's latency into this process's EWMA (weight 1/8, as Kura;
        the first sample is taken as is). Only the owner writes its slot."""
        base = self._own()
        sample = max(1, int(seconds * 1_000_000))
        old = self._words[base + 4]
        self._words[base + 4] = sample if old <= 0 else (7 * old + sample) // 8
        self._words[base + 5] = int(time.time() * 1000)

    def set_serving(self, serving: bool) -> None:
        """Mark this process as serving (or not) in its slot: a REAPI process once its
        server listens; the slot of a process that dies stops counting with it."""
        base = self._own()
        self._words[base + 6] = int(serving)

    def serving(self, kind: int) -> int:
        """How many live processes of ``kind`` are serving."""
        return sum(1 for slot in self._live_slots() if slot[1] == kind and slot[6])

    def public_latency_ewma_ms(self) -> float:
        """The slowest recent public-latency EWMA of the node's HTTP and gRPC processes (0
        when none has a sample from the last ``LATENCY_MAX_AGE_MS``)."""
        now_ms = time.time() * 1000
        worst = 0
        for slot in self._live_slots():
            if slot[1] in (KIND_HTTP, KIND_REAPI) and now_ms - slot[5] <= LATENCY_MAX_AGE_MS:
                worst = max(worst, slot[4])
        return worst / 1000

    def public_inflight(self) -> int:
        """Public HTTP requests and gRPC calls in flight in every process of the node."""
        return self.inflight(KIND_HTTP) + self.inflight(KIND_REAPI)

    def _live_slots(self) -> Iterator[tuple[int, ...]]:
        for slot in range(MAX_SLOTS):
            base = self._base(slot)
            pid = self._words[base]
            if pid and pid_alive(pid):
                yield tuple(self._words[base:base + SLOT_WORDS])

    def processes(self) -> list[tuple[int, int]]:
        """``(pid, kind)`` of every live process of the node that claimed a slot."""
        return [(slot[0], slot[1]) for slot in self._live_slots()]

    def inflight(self, kind: int | None = None) -> int:
        return sum(max(0, slot[2]) for slot in self._live_slots() if kind is None or slot[1] == kind)

    def inflight_of(self, pid: int) -> int:
        """Requests in flight in the live process ``pid`` (0 if it has no slot)."""
        return sum(max(0, slot[2]) for slot in self._live_slots() if slot[0] == pid)

    def tmp_bytes(self) -> int:
        return sum(max(0, slot[3]) for slot in self._live_slots())

    def close(self) -> None:
        try:
            self._words.release()
            self._map.close()
        finally:
            os.close(self._fd)


def state_path(run_dir: str) -> str:
    """The node state file in the node's per-run directory (``Settings.resolved_run_dir``)."""
    return os.path.join(run_dir, NODE_STATE)

