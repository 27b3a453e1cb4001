"""Bandwidth pacing of peer traffic, public traffic first (SPEC 6.5, Kura's bandwidth.rs).

Every byte the replicator moves to or from a peer — outbox uploads, replication ingest,
bootstrap fetches and bootstrap serving — goes through one ``Pacer`` per node (the
replicator is one process). Its rate is ``KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND``
(0: unpaced) divided by ``max(public in-flight + 1, ⌈public latency EWMA ÷
KURA_REPLICATION_PUBLIC_LATENCY_TARGET_MS⌉)`` (the latter capped at 64), so a busy or
slow public side slows replication down, never the reverse. Public in-flight counts the
HTTP requests and gRPC calls of every process of the node (shared node state); the
latency EWMA is the slowest recent one of those processes. Public reads are never paced.

The schedule is Kura's "next available instant": each chunk of ``n`` bytes reserves
``n / rate`` seconds after the previous reservation and waits for its start, so chunks
from any number of concurrent transfers share the rate.
"""
from __future__ import annotations

import math
import time
from typing import Callable

MAX_LATENCY_DIVISOR = 64
LOAD_REFRESH_S = 0.05


def effective_limit(configured: float, public_inflight: int, latency_ewma_ms: float,
                    target_ms: float) -> float:
    """Bytes per second peer traffic may use now; 0 means unpaced."""
    if configured <= 0:
        return 0.0
    divisor = max(0, public_inflight) + 1
    if target_ms > 0 and latency_ewma_ms > 0:
        divisor = max(divisor, min(MAX_LATENCY_DIVISOR, math.ceil(latency_ewma_ms / target_ms)))
    return max(1.0, configured / divisor)


class Pacer:
    def __init__(self, configured: int, target_ms: int, load: Callable[[], tuple[int, float]], *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``load()`` returns (public in-flight, public latency EWMA in ms); it is read at
        most every ``LOAD_REFRESH_S``."""
        self.configured = configured
        self.target_ms = target_ms
        self._load = load
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0
        self._limit = float(configured)
        self._load_read_at = -math.inf

    def current_limit(self) -> float:
        now = self._clock()
        if now - self._load_read_at >= LOAD_REFRESH_S:
            inflight, latency_ms = self._load()
            self._limit = effective_limit(self.configured, inflight, latency_ms, self.target_ms)
            self._load_read_at = now
        return self._limit

    def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more may move (at once when pacing is off)."""
        if self.configured <= 0 or nbytes <= 0:
            return
        limit = self.current_limit()
        now = self._clock()
        start = max(now, self._next)
        self._next = start + nbytes / limit
        if start > now:
            self._sleep(start - now)

    def reader(self, read: Callable[[int], bytes]) -> Callable[[int], bytes]:
        """``read`` with every byte it returns paced."""
        def paced(n: int) -> bytes:
            data = read(n)
            self.acquire(len(data))
            return data
        return paced


UNPACED = Pacer(0, 0, lambda: (0, 0.0))
