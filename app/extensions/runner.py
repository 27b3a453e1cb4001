"""Hook calls on OS threads of their own, abandoned when they use up their CPU time.

A ``LuaRunner`` is one OS thread that owns one Lua state (``LuaSandbox``) for
its whole life: it loads the script, then runs one hook call at a time. The
request that needs a hook (a greenlet of an HTTP worker, or a gRPC thread of
the REAPI process) hands the call to an idle runner and waits for it:

- lupa releases the GIL while Lua runs, so the worker's other greenlets (and
  ``/up``) keep being served while a hook computes, and a hook is never paused
  by them: it is charged only for its own thread's CPU time;
- the waiter reads the runner thread's CPU clock; once the call has used its
  timeout (plus ``ABANDON_GRACE_S``) without finishing, it is stuck inside one
  C function that the instruction-count deadline cannot interrupt
  (``string.find`` on a backtracking pattern). The waiter then abandons it:
  the request fails closed at once, and the runner, whenever its C call ends,
  discards its state and exits instead of serving again. Lua code that loops
  is cut by the count hook inside the runner and never needs abandoning;
- a call is also abandoned after a wall-clock limit (a backstop for a thread
  that gets no CPU at all);
- ``kura.http_json`` does its I/O on the waiter (``on_caller``): the runner
  posts the request and blocks until the waiter has run it. In an HTTP worker
  the sockets belong to the worker's gevent loop and must not be touched from
  another thread.

Waiters block on ``native.wake_signal()``: a gevent semaphore in an HTTP worker
(cooperative, and released safely from another thread), a plain one in the
REAPI process. Runners block on real locks only.

After a call that grew its state the runner collects the state's garbage and
settles its share of the process's memory budget (``memory.py``); a state that
keeps much more than it had after loading is closed rather than pooled. A
runner idle for ``RETIRE_AFTER_IDLE_S`` closes its state and ends, if the
pool lets it (it keeps one).
"""
from __future__ import annotations

import collections
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable

from app.extensions import native
from app.extensions.errors import HookFailed
from app.extensions.host_api import HostError
from app.extensions.memory import MIB, MemoryBudget, give_back_to_os
from app.extensions.sandbox import LuaSandbox

if TYPE_CHECKING:
    from app.extensions.pool import RuntimePool

log = logging.getLogger("kura.extensions")

# CPU time a call may use beyond its timeout before its waiter abandons it. The
# count hook stops Lua code within ~0.5 ms of Lua time; only a call stuck in C
# gets this far.
ABANDON_GRACE_S = 0.010
RETIRE_AFTER_IDLE_S = 60.0
IDLE_POLL_S = 5.0
COLLECT_AFTER_GROWTH_BYTES = 256 * 1024  # a call that grew its state more: collect it
GIVE_BACK_AFTER_BYTES = 4 * MIB  # freeing more than this: return pages to the OS


class _HostRequest:
    """A function the runner needs run on the waiter's thread (``on_caller``)."""

    __slots__ = ("fn", "value", "error", "answered")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.value: Any = None
        self.error: Exception | None = None
        self.answered = native.allocate_lock()
        self.answered.acquire()


class Job:
    """One unit of work for a runner: ``fn(runner)`` runs on the runner's thread."""

    def __init__(self, what: str, fn: Callable[["LuaRunner"], Any], cpu_timeout_s: float) -> None:
        self.what = what
        self.fn = fn
        self.cpu_timeout_s = cpu_timeout_s
        self.wake = native.wake_signal()  # released by the runner: finished, or a host request
        self.requests: collections.deque[_HostRequest] = collections.deque()
        self.finished = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.cpu_start: float | None = None  # the runner's thread_time() when it picked the job up

    def wait(self, runner: "LuaRunner", wall_limit_s: float) -> Any:
        """Waiter side: serve host requests until the job ends; abandon it when it is stuck."""
        wall_deadline = time.monotonic() + wall_limit_s
        try:
            while True:
                self._serve_requests()
                if self.finished:
                    break
                cpu_left = self.cpu_timeout_s + ABANDON_GRACE_S - runner.cpu_used(self)
                wall_left = wall_deadline - time.monotonic()
                if (cpu_left <= 0 or wall_left <= 0) and runner.abandon(self):
                    log.warning("event=extension_hook_abandoned hook=%s cpu_ms=%d wall_limit=%s",
                                self.what, int(runner.cpu_used(self) * 1000), wall_left <= 0)
                    raise HookFailed(self.what, "timeout")
                # CPU time cannot pass faster than wall time: nothing to check before then.
                self.wake.acquire(timeout=max(0.001, min(cpu_left, wall_left)))
        except BaseException:
            runner.abandon(self)  # the waiter itself was interrupted: nobody wants the result
            raise
        if self.error is not None:
            raise self.error
        return self.value

    def _serve_requests(self) -> None:
        while self.requests:
            request = self.requests.popleft()
            try:
                request.value = request.fn()
            except Exception as exc:
                request.error = exc
            except BaseException:
                request.error = HostError("the request was interrupted")
                request.answered.release()
                raise
            request.answered.release()


class LuaRunner:
    """One OS thread owning one Lua state; see the module docstring."""

    def __init__(self, pool: "RuntimePool", budget: MemoryBudget) -> None:
        self._pool = weakref.ref(pool)  # a forgotten pool lets its runners end
        self._budget = budget
        self._go = native.allocate_lock()
        self._go.acquire()
        self._lock = native.allocate_lock()
        self._job: Job | None = None
        self.sandbox: LuaSandbox | None = None
        self.cpu_clock: int | None = None
        self.abandoned = False
        self.retiring = False  # set before the job finishes: do not pool this runner again
        self.idle_since = time.monotonic()
        self._base_bytes = 0
        self._freed_bytes = 0
        native.start_thread(self._main)

    # -- waiter side -------------------------------------------------------------
    def run(self, job: Job, wall_limit_s: float) -> Any:
        self._job = job
        self._go.release()
        return job.wait(self, wall_limit_s)

    def stop(self) -> None:
        """Ask an idle runner to close its state and end (a no-op for one that has ended)."""
        self._job = None
        try:
            self._go.release()
        except RuntimeError:  # already released: the runner is on its way out
            pass

    def memory_used(self) -> int:
        """Bytes its Lua state holds now (0 before it is loaded or once it is closed)."""
        sandbox = self.sandbox
        return sandbox.memory_used() if sandbox is not None else 0

    def cpu_used(self, job: Job) -> float:
        """CPU time the runner's thread has spent on ``job`` so far."""
        if job.cpu_start is None or self.cpu_clock is None:
            return 0.0
        now = native.cpu_seconds(self.cpu_clock)
        return 0.0 if now is None else now - job.cpu_start

    def abandon(self, job: Job) -> bool:
        """Give up on ``job`` unless it has finished; True if this call abandoned it."""
        pool = self._pool()
        with self._lock:
            if job.finished or self.abandoned:
                return False
            self.abandoned = True
            pending = list(job.requests)
            job.requests.clear()
            # Counted before this thread can see it and end (which uncounts it).
            limit_reached = pool is not None and pool.abandoned_started()
        if limit_reached:
            pool.abandoned_limit_reached()
        if self.sandbox is not None:
            self.sandbox.deadline.cancel()  # in case it is in Lua code after all
        for request in pending:
            request.error = HostError("the hook call was abandoned")
            request.answered.release()
        return True

    # -- runner thread ------------------------------------------------------------
    def _main(self) -> None:
        self.cpu_clock = native.thread_cpu_clock()
        while True:
            if not self._go.acquire(timeout=IDLE_POLL_S):
                if self._may_retire():
                    break
                continue
            job = self._job
            if job is None:
                break
            self._freed_bytes = 0
            job.cpu_start = time.thread_time()
            try:
                value, error = job.fn(self), None
            except BaseException as exc:
                value, error = None, exc
            with self._lock:
                abandoned = self.abandoned
                if not abandoned:
                    job.value, job.error, job.finished = value, error, True
            if abandoned:
                break
            job.wake.release()
            if self._freed_bytes >= GIVE_BACK_AFTER_BYTES:
                give_back_to_os()
            if self.retiring:
                break
        self._close()

    def _may_retire(self) -> bool:
        pool = self._pool()
        return pool is None or pool.retire_if_idle(self, RETIRE_AFTER_IDLE_S)

    def _close(self) -> None:
        held = self.memory_used()
        sandbox, self.sandbox = self.sandbox, None
        if sandbox is not None:
            sandbox.close()
        self._budget.release(self)
        if held >= GIVE_BACK_AFTER_BYTES:
            give_back_to_os()
        pool = self._pool()
        if pool is not None:
            pool.runner_ended(self)

    def on_caller(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the waiter's thread and return its result (``kura.http_json``)."""
        job = self._job
        request = _HostRequest(fn)
        with self._lock:
            if self.abandoned or job is None:
                raise HostError("the hook call was abandoned")
            job.requests.append(request)
        job.wake.release()
        request.answered.acquire()
        if request.error is not None:
            raise request.error
        return request.value

    def load(self, factory: Callable[[int], LuaSandbox]) -> frozenset[str]:
        """Create this runner's state (on its thread). Returns the hooks the script defines."""
        limit = self._budget.begin(self, 0)
        try:
            self.sandbox = factory(limit)
        except BaseException:
            self.retiring = True
            self._budget.end(self, 0)
            raise
        self._base_bytes = self.sandbox.memory_used()
        self._budget.end(self, self._base_bytes)
        self.sandbox.on_caller = self.on_caller
        return self.sandbox.hooks

    def call_hook(self, hook: str, args: tuple[Any, ...], timeout_s: float, io_budget_s: float,
                  exclusive: bool = False) -> Any:
        """Run one hook within this process's memory budget (on the runner's thread)."""
        sandbox = self.sandbox
        assert sandbox is not None
        used = sandbox.memory_used()
        sandbox.limit_bytes = self._budget.begin(self, used, exclusive=exclusive)
        try:
            return sandbox.call(hook, args, timeout_s, io_budget_s)
        finally:
            self._budget.end(self, self._settle(sandbox, used))

    def _settle(self, sandbox: LuaSandbox, used_before: int) -> int:
        """After a call: collect what it left behind; decide whether the state stays."""
        used = sandbox.memory_used()
        if sandbox.poisoned:
            self.retiring = True
            return used
        if used > used_before + COLLECT_AFTER_GROWTH_BYTES:
            sandbox.collect_garbage()
            after = sandbox.memory_used()
            self._freed_bytes = used - after
            used = after
        if used > self._base_bytes + self._budget.guaranteed_bytes:
            self.retiring = True  # the script keeps this much: do not let it sit in the pool
        return used
