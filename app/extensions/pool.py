"""A per-process pool of Lua runners (an OS thread + a Lua state each, ``runner.py``).

One runner per concurrent hook call: a hook that waits inside
``kura.http_json`` holds its runner until it returns, so no two requests ever
share a state. Runners are created lazily up to ``max_size``; a caller that
finds none free waits (bounded) for one. A runner whose state was interrupted
(deadline, memory) or grew too big closes it instead of coming back.

Abandoned runners (a call stuck inside one C function, see ``runner.py``) do
not hold a pool slot: a fresh runner may take their place, so at most
``max_abandoned`` more threads than ``max_size`` exist. While that many are
abandoned and not yet ended, hook calls fail at once (closed, as any hook
failure), and ``on_abandoned_limit`` is called once: by default the process
asks to be replaced (``request_restart``), because a thread stuck in C can
only be reclaimed by ending the process; its other requests finish first.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable

from app.extensions import native
from app.extensions.errors import HookFailed
from app.extensions.memory import MemoryBudget
from app.extensions.runner import Job, LuaRunner
from app.extensions.sandbox import LuaSandbox

log = logging.getLogger("kura.extensions")


def request_restart() -> None:
    """Ask this process to stop gracefully (SIGTERM to itself); its parent starts a new one.

    A gunicorn worker finishes its in-flight requests and the master replaces it;
    the REAPI process drains and the node's supervisor restarts it.
    """
    os.kill(os.getpid(), signal.SIGTERM)


class RuntimePool:
    def __init__(self, factory: Callable[[int], LuaSandbox], budget: MemoryBudget, *, max_size: int,
                 acquire_timeout_s: float, load_timeout_s: float, wall_limit_s: float,
                 max_abandoned: int, on_abandoned_limit: Callable[[], None]) -> None:
        self._factory = factory
        self.budget = budget
        self._slots = threading.BoundedSemaphore(max_size)  # as patched (or not) in this process
        self._acquire_timeout_s = acquire_timeout_s
        self._load_timeout_s = load_timeout_s
        self._wall_limit_s = wall_limit_s
        self._max_abandoned = max_abandoned
        self._on_abandoned_limit = on_abandoned_limit
        self._lock = native.allocate_lock()  # never held across anything that blocks
        self._idle: list[LuaRunner] = []
        self._live: set[LuaRunner] = set()  # every runner whose thread has not ended
        self._closed = False
        self._limit_reported = False
        self.abandoned = 0

    def start(self) -> frozenset[str]:
        """Create and load the first runner; returns the hooks the script defines."""
        runner, hooks = self._new_runner("load")
        self._checkin(runner)
        return hooks

    def run(self, hook: str, fn: Callable[[LuaRunner], Any], cpu_timeout_s: float) -> Any:
        """Run ``fn(runner)`` on a runner's thread; raises ``HookFailed`` (``timeout`` when abandoned)."""
        if self.abandoned >= self._max_abandoned:
            raise HookFailed(hook, "abandoned_limit")
        if not self._slots.acquire(timeout=self._acquire_timeout_s):
            raise HookFailed(hook, "no_runtime_available")
        try:
            with self._lock:
                runner = self._idle.pop() if self._idle else None
            if runner is None:
                runner, _ = self._new_runner(hook)
            try:
                return runner.run(Job(hook, fn, cpu_timeout_s), self._wall_limit_s)
            finally:
                self._checkin(runner)
        finally:
            self._slots.release()

    def _new_runner(self, hook: str) -> tuple[LuaRunner, frozenset[str]]:
        runner = LuaRunner(self, self.budget)
        with self._lock:
            self._live.add(runner)
        try:
            hooks = runner.run(Job(hook, lambda r: r.load(self._factory), self._load_timeout_s),
                               self._load_timeout_s + self._wall_limit_s)
        except BaseException:
            runner.stop()  # a runner whose load failed has ended already; a no-op then
            raise
        return runner, hooks

    def _checkin(self, runner: LuaRunner) -> None:
        if runner.abandoned or runner.retiring:
            return  # it ends by itself
        runner.idle_since = time.monotonic()
        with self._lock:
            if not self._closed:
                self._idle.append(runner)
                return
        runner.stop()

    def retire_if_idle(self, runner: LuaRunner, idle_s: float) -> bool:
        """Runner thread: may this idle runner end? (The pool keeps one.)"""
        with self._lock:
            if runner not in self._idle:
                return False
            if not self._closed and (len(self._idle) <= 1 or time.monotonic() - runner.idle_since < idle_s):
                return False
            self._idle.remove(runner)
            return True

    def runner_ended(self, runner: LuaRunner) -> None:
        """Runner thread, last thing: its state is closed."""
        with self._lock:
            self._live.discard(runner)
            if runner.abandoned:
                self.abandoned -= 1
                if self.abandoned < self._max_abandoned:
                    self._limit_reported = False

    def lua_memory_used(self) -> int:
        """Bytes all Lua states of this process hold now (stuck ones included)."""
        with self._lock:
            live = list(self._live)
        return sum(runner.memory_used() for runner in live)

    def abandoned_started(self) -> bool:
        """A call was abandoned; True the first time that makes ``max_abandoned``."""
        with self._lock:
            self.abandoned += 1
            reached = self.abandoned >= self._max_abandoned and not self._limit_reported
            if reached:
                self._limit_reported = True
            return reached

    def abandoned_limit_reached(self) -> None:
        log.error("event=extension_abandoned_limit abandoned=%d action=restart_process", self.abandoned)
        self._on_abandoned_limit()

    def close(self) -> None:
        """End every idle runner now; busy ones end when their call returns."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for runner in idle:
            runner.stop()
