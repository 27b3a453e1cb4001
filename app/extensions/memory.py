"""The Lua memory of one process: one budget shared by all its Lua states.

``KURA_EXTENSION_MEMORY_LIMIT_BYTES`` is the total for the process. lupa caps
each state with its own allocator limit, so the budget is kept by giving every
state a limit and keeping the sum of the limits within the total:

- an idle state's limit is what it holds (it cannot grow while nobody runs it);
- a call starting on a state raises that state's limit by a grant: what is
  free, minus a *guaranteed headroom* kept back for every pool slot not
  running a call, so a small hook always gets at least the guaranteed headroom
  (total / (2 × pool size)) however greedy its neighbours are, and one call
  alone may use about half the total;
- when the call ends the state is collected if it grew, and its limit drops
  back to what it still holds (a state that keeps more than its guaranteed
  headroom is closed instead of pooled);
- a state abandoned by a stuck call keeps its limit until its thread ends
  (and still counts as running).

A call that needs more than its grant fails like any Lua allocation failure
("not enough memory"). If it had done no I/O (``kura.http_json``) yet, running
it again changes nothing outside Lua, so it is retried once, alone, with all
the memory not guaranteed to others (``exclusive``): a memory-hungry hook is
served one call at a time instead of being refused. Otherwise, or if that
fails too, the hook fails (closed for authenticate/authorize).

Values Python hands to Lua (the request's ``ctx``, host function results) are
built while the limit is lifted (``sandbox.py``) and count against the state
afterwards: they may push it past its grant by their own size, which the
request and response size limits bound.

Giving memory back: Lua allocates through lupa's allocator, that is glibc's
malloc/realloc/free. A block above the mmap threshold goes back to the OS when
freed, but glibc then raises the threshold (up to 32 MiB), so later big strings
come from its arenas (one per thread that allocates, up to 8 per core), which
keep freed memory for reuse: RSS does not drop by itself. ``give_back_to_os``
calls ``malloc_trim(0)``, which releases the free pages inside every arena,
not only at the top. Pages still partly in use stay, and Python's own small
objects live in pymalloc arenas that are returned only when wholly empty; so
"given back" means the process RSS returns to within a few MiB of where it
was before the traffic, while its virtual size may stay larger.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from contextlib import contextmanager
from typing import Any, Hashable, Iterator

from app.extensions import native

MIB = 1024 * 1024
EXCLUSIVE_POLL_S = 0.005


class MemoryBudget:
    """Limits of every Lua state of a process; their sum never exceeds ``total_bytes``.

    Called from hook threads and callers alike: the lock is a real one and is
    never held across anything that blocks.
    """

    def __init__(self, total_bytes: int, pool_size: int) -> None:
        self.total_bytes = total_bytes
        self.pool_size = pool_size
        self.guaranteed_bytes = total_bytes // (2 * pool_size)
        self._lock = native.allocate_lock()
        self._limits: dict[Hashable, int] = {}
        self._headroom: dict[Hashable, int] = {}  # of the calls running now
        self._exclusive_pending = False
        self._exclusive = threading.Lock()  # waiters only: as patched (or not) in this process

    def begin(self, state: Hashable, used: int, *, exclusive: bool = False) -> int:
        """A call starts on ``state`` (holding ``used`` bytes): its limit (total bytes)."""
        with self._lock:
            self._headroom[state] = 0
            others = sum(limit for key, limit in self._limits.items() if key != state)
            idle_slots = max(0, self.pool_size - len(self._headroom))
            free = max(0, self.total_bytes - others - used - idle_slots * self.guaranteed_bytes)
            if self._exclusive_pending and not exclusive:
                free = min(free, self.guaranteed_bytes)
            self._headroom[state] = free
            limit = self._limits[state] = used + free
            return limit

    def end(self, state: Hashable, used: int) -> None:
        """The call on ``state`` ended; the state now holds ``used`` bytes."""
        with self._lock:
            self._headroom.pop(state, None)
            self._limits[state] = used

    def release(self, state: Hashable) -> None:
        """``state`` was closed (or never opened): its memory is free again."""
        with self._lock:
            self._headroom.pop(state, None)
            self._limits.pop(state, None)

    @contextmanager
    def exclusive(self, timeout_s: float) -> Iterator[None]:
        """For a call retried after running out of memory (waiter side).

        One at a time: new calls get no more than their guaranteed headroom from
        now on, and this waits (bounded; ``TimeoutError``) until no running call
        holds more, so the retried call, started with ``begin(exclusive=True)``
        inside the block, gets all the memory not guaranteed to others.
        """
        deadline = time.monotonic() + timeout_s
        if not self._exclusive.acquire(timeout=timeout_s):
            raise TimeoutError("another call is waiting for memory")
        try:
            with self._lock:
                self._exclusive_pending = True
            while True:
                with self._lock:
                    busy = any(h > self.guaranteed_bytes for h in self._headroom.values())
                if not busy:
                    break
                if time.monotonic() >= deadline:
                    raise TimeoutError("memory did not become free in time")
                time.sleep(EXCLUSIVE_POLL_S)  # cooperative in an HTTP worker
            yield
        finally:
            with self._lock:
                self._exclusive_pending = False
            self._exclusive.release()

    def held_bytes(self) -> int:
        """What all states may hold now (the sum of their limits)."""
        with self._lock:
            return sum(self._limits.values())


def _malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl): nothing to ask
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def give_back_to_os() -> None:
    """Return the free pages of malloc's arenas to the OS (glibc; a no-op elsewhere).

    Runs without the GIL (ctypes releases it); called from a hook thread after
    a call freed a lot, never on a request's path.
    """
    if _TRIM is not None:
        _TRIM(0)
