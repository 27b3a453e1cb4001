"""Bounded TTL+LRU decision cache and single-flight coalescing.

Both use ``threading`` primitives looked up at construction time: in the HTTP
workers gevent has monkey-patched them into greenlet-aware ones, in the REAPI
process they are real OS-thread primitives. No lock is ever held across a hook
call (a hook may yield inside ``kura.http_json``).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, TypeVar

from app import metrics

T = TypeVar("T")


class DecisionCache(Generic[T]):
    """Entries expire after their own TTL; the least recently used one goes when full."""

    def __init__(self, name: str, max_entries: int, clock: Callable[[], float]) -> None:
        self.name = name
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, T]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> T | None:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires_at, value = entry
            if expires_at <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: T, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        evicted = 0
        with self._lock:
            self._entries[key] = (self._clock() + ttl_s, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
                evicted += 1
        if evicted:
            metrics.EXTENSION_CACHE.labels(cache=self.name, result="evicted").inc(evicted)

    def clear(self) -> int:
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            return count

    def __len__(self) -> int:
        return len(self._entries)


class _Flight:
    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class SingleFlight:
    """Identical concurrent calls share one execution of ``fn``.

    The first caller for a key runs ``fn``; callers arriving while it runs wait
    for its result (or its exception) instead of running ``fn`` themselves.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight] = {}

    def do(self, key: Hashable, fn: Callable[[], T], wait_timeout_s: float) -> tuple[T, bool]:
        """Returns ``(result, shared)``; ``shared`` is True for a coalesced follower."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        assert flight is not None
        if not leader:
            if not flight.done.wait(wait_timeout_s):
                raise TimeoutError("single-flight leader did not finish in time")
            if flight.error is not None:
                raise flight.error
            return flight.value, True
        try:
            flight.value = fn()
            return flight.value, False
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()
