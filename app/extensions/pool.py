"""A per-process pool of Lua states, one per concurrent hook call.

A hook that yields (``kura.http_json`` under gevent) or blocks (the same call
in the gRPC thread pool) holds its state until it returns, so no two requests
ever share a state. States are created lazily up to ``max_size``; a caller
that finds none free waits (bounded) for one. A state interrupted by the
deadline or the memory cap is dropped, not returned.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from app.extensions.errors import HookFailed
from app.extensions.sandbox import LuaSandbox


class RuntimePool:
    def __init__(self, factory: Callable[[], LuaSandbox], max_size: int, acquire_timeout_s: float,
                 first: LuaSandbox | None = None) -> None:
        self._factory = factory
        self._idle: list[LuaSandbox] = [first] if first is not None else []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_size)
        self._acquire_timeout_s = acquire_timeout_s
        self.created = len(self._idle)

    @contextmanager
    def runtime(self, hook: str) -> Iterator[LuaSandbox]:
        if not self._slots.acquire(timeout=self._acquire_timeout_s):
            raise HookFailed(hook, "no_runtime_available")
        try:
            with self._lock:
                sandbox = self._idle.pop() if self._idle else None
            if sandbox is None:
                sandbox = self._factory()
                with self._lock:
                    self.created += 1
            try:
                yield sandbox
            finally:
                if not sandbox.poisoned:
                    with self._lock:
                        self._idle.append(sandbox)
        finally:
            self._slots.release()

    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)
