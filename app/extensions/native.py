"""Real OS-thread primitives, also in a process gevent has monkey-patched.

Hook calls run on OS threads of their own (``runner.py``). Those threads must
block on real locks, the code that waits for them must know the thread's real
id to read its CPU clock, and they wake their waiter with ``wake_signal()``. In an HTTP worker ``_thread`` and ``threading``
are patched into greenlet versions, so the originals are taken from
``gevent.monkey`` there; in the REAPI process (no gevent) they are the plain
modules. gevent is only consulted when it is already imported: this module
never imports it into a process that does not use it.
"""
from __future__ import annotations

import _thread
import sys
import threading
import time
from typing import Any, Callable


def _gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


def wake_signal() -> Any:
    """A counter a runner thread releases and its waiter acquires (with a timeout).

    In a gevent-patched process the waiter is a greenlet: a gevent ``Semaphore``,
    which gevent supports releasing from another thread (it wakes the waiter's
    loop; ``gevent.event.Event`` is documented not to). Otherwise a plain one.
    """
    if _gevent_patched():
        from gevent.lock import Semaphore

        return Semaphore(0)
    return threading.Semaphore(0)


def _original(name: str) -> Any:
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("_thread"):
        return monkey.get_original("_thread", name)
    return getattr(_thread, name)


def allocate_lock() -> Any:
    """A real lock: ``acquire`` blocks the OS thread, never switches greenlets."""
    return _original("allocate_lock")()


def start_thread(target: Callable[[], None]) -> None:
    """Start ``target`` on a new OS thread (never joined: it must end by itself)."""
    _original("start_new_thread")(target, ())


def thread_cpu_clock() -> int:
    """The CPU-time clock id of the calling OS thread, readable from any other thread."""
    return time.pthread_getcpuclockid(_original("get_ident")())


def cpu_seconds(clock_id: int) -> float | None:
    """CPU time consumed so far by the thread of ``clock_id``; None once it has exited."""
    try:
        return time.clock_gettime(clock_id)
    except OSError:
        return None
