"""Connection admission for the HTTP worker: the request-head timeout, the connection limit
and the probe reserve (used by ``app.http_worker.KuraGeventWorker``).

A gevent worker serves each connection in its own greenlet, out of a pool. gunicorn's pool
is ``worker_connections`` large and stops accepting when it is full, so connections that
never finish their request head (slowloris) used to hold every slot until the keep-alive
timeout and /up stopped answering. Here:

- **Header timeout** (``KURA_HTTP_HEADER_TIMEOUT_MS``, 60 s like nginx's
  ``client_header_timeout``). A new connection must complete its first request head within
  it; a keep-alive connection may idle up to the keep-alive timeout, and once the next
  request's first byte arrives its head must complete within the header timeout. A head
  that does not is answered ``408`` and the connection closed.
- **Limit and reserve.** The pool holds ``worker_connections`` plus :data:`RESERVE` slots.
  A connection accepted beyond ``worker_connections`` first frees slots as nginx frees
  "reusable" connections when it runs out: the connections that have waited longest for a
  request head (idle keep-alive, slow headers) and have waited at least
  :data:`EVICT_AFTER_S` are closed, so slow clients cannot keep new ones out. If none can
  be freed (every connection is busy with a request), the newcomer stays in the reserve:
  a probe (``/up``, ``/ready``, ``/status/rollout``, ``/metrics``) is answered, anything
  else gets ``503`` with ``Retry-After`` at once instead of waiting unseen in the listen
  backlog. A reserve connection serves one request; its head must arrive within
  :data:`RESERVE_HEAD_TIMEOUT_S` so the reserve itself cannot be held.
"""
from __future__ import annotations

import logging
import socket
import ssl
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import gevent
from gevent import getcurrent
from gevent.socket import wait_read

# Slots beyond worker_connections for probes and quick 503s while every connection is busy.
RESERVE = 16
# Under the limit, a connection that has waited this long for a request head may be closed.
EVICT_AFTER_S = 1.0
# A reserve connection's request head must arrive within this (or the header timeout).
RESERVE_HEAD_TIMEOUT_S = 1.0
# The answer (503, Retry-After: 1) to a request on a reserve connection that is not a probe.
REFUSAL_MESSAGE = "Too many connections: every connection of this worker is busy"
# At most one log line per this many seconds says the limit was reached.
LOG_EVERY_S = 10.0

log = logging.getLogger("kura.http")


@dataclass(eq=False)
class Connection:
    """One accepted connection, from accept to close."""

    sock: Any
    reserve: bool = False  # accepted beyond the limit: one request, probes only unless promoted
    counted: bool = True  # counts against the limit (cleared when evicted)
    last_request: Any = None  # gunicorn's Request last handed to the worker
    waited: bool = False  # the wait for the current request head yielded to other greenlets


@dataclass(eq=False)
class _Wait:
    """A connection waiting for a request head; ``interrupt`` ends the wait early."""

    connection: Connection
    since: float
    interrupt: BaseException


@dataclass
class Admission:
    """Per-worker connection accounting (one greenlet per connection, one thread: no locks)."""

    limit: int
    header_timeout_s: float
    keepalive_s: float
    write_error: Callable[..., None]
    connections: dict[Any, Connection] = field(default_factory=dict)
    waiting: "OrderedDict[Any, _Wait]" = field(default_factory=OrderedDict)
    open: int = 0  # connections counted against the limit
    stopping: bool = False
    _logged_at: float = float("-inf")

    @property
    def pool_size(self) -> int:
        return self.limit + RESERVE

    def accept(self, sock: Any) -> Connection:
        """Register the current greenlet's new connection; frees slots if over the limit."""
        conn = Connection(sock)
        self.connections[getcurrent()] = conn
        self.open += 1
        if self.open > self.limit:
            self._evict(self.open - self.limit)
            conn.reserve = self.open > self.limit
            if conn.reserve and time.monotonic() - self._logged_at > LOG_EVERY_S:
                self._logged_at = time.monotonic()
                log.warning("event=http_connection_limit_reached limit=%d connections=%d",
                            self.limit, len(self.connections))
        return conn

    def close(self) -> None:
        """The current greenlet's connection is done."""
        conn = self.connections.pop(getcurrent(), None)
        self.waiting.pop(getcurrent(), None)
        if conn is not None and conn.counted:
            self.open -= 1

    def current(self) -> Connection | None:
        return self.connections.get(getcurrent())

    def admits(self, conn: Connection, is_probe: bool) -> bool:
        """Whether a request that arrived on ``conn`` is served. False: the caller answers
        it ``503`` with :data:`REFUSAL_MESSAGE` and ``Retry-After: 1``, then ends the
        connection."""
        if not conn.reserve:
            return True
        if self.open <= self.limit:
            conn.reserve = False  # slots were freed meanwhile: an ordinary connection now
            return True
        return is_probe

    @contextmanager
    def waiting_for_request(self, interrupt: BaseException) -> Iterator[None]:
        """The current connection waits for its next request (an HTTP/1 head, a new HTTP/2
        stream): eviction or the worker's stop ends the wait by throwing ``interrupt``."""
        self.register_wait(interrupt)
        try:
            yield
        finally:
            self.waiting.pop(getcurrent(), None)

    def register_wait(self, interrupt: BaseException) -> None:
        """(Re)start the current connection's wait for a request, youngest last: once the
        first byte of a request arrives on an idle keep-alive connection, the head is a new
        wait, not an old one."""
        current = getcurrent()
        conn = self.connections.get(current)
        if conn is not None:
            self.waiting.pop(current, None)
            self.waiting[current] = _Wait(conn, time.monotonic(), interrupt)

    def head_wait(self) -> "HeadWait":
        """gunicorn's ``timeout_ctx``: the wait for the current connection's next request head."""
        return HeadWait(self, self.current())

    def stop(self) -> None:
        """The worker stops: end every wait for a request head (those connections close)."""
        self.stopping = True
        for greenlet, wait in list(self.waiting.items()):
            self._interrupt_later(greenlet, wait)

    def _evict(self, wanted: int) -> None:
        """Close up to ``wanted`` connections that have waited longest for a request head."""
        cutoff = time.monotonic() - EVICT_AFTER_S
        victims = []
        for greenlet, wait in self.waiting.items():
            if len(victims) >= wanted or wait.since > cutoff:
                break  # oldest first: the rest waited less
            if wait.connection.counted:
                victims.append((greenlet, wait))
        for greenlet, wait in victims:
            wait.connection.counted = False
            self.open -= 1
            self._interrupt_later(greenlet, wait, on_missed=self._recount)

    def _recount(self, greenlet: Any, wait: _Wait) -> None:
        """An eviction came too late (the head had arrived): the connection counts again."""
        if self.connections.get(greenlet) is wait.connection and not wait.connection.counted:
            wait.connection.counted = True
            self.open += 1

    def _interrupt_later(self, greenlet: Any, wait: _Wait,
                         on_missed: Callable[[Any, _Wait], None] | None = None) -> None:
        """End ``wait`` from the event loop, unless it is over by then: an exception thrown
        into a greenlet that has meanwhile started serving its request would break it."""

        def interrupt() -> None:
            if self.waiting.get(greenlet) is wait:
                greenlet.throw(wait.interrupt)
            elif on_missed is not None:
                on_missed(greenlet, wait)

        gevent.get_hub().loop.run_callback(interrupt)


class HeadWait:
    """Bounds ``next(parser)``: the keep-alive idle wait, then the header timeout.

    Raises ``StopIteration`` (gunicorn closes the connection quietly) when an idle
    keep-alive connection times out or is evicted; answers 408 and lets gunicorn close the
    connection when a request head does not complete in time or is evicted.
    """

    def __init__(self, admission: Admission, conn: Connection | None) -> None:
        self.admission = admission
        self.conn = conn
        self.timer: gevent.Timeout | None = None

    def __enter__(self) -> "HeadWait":
        adm, conn = self.admission, self.conn
        if conn is None:  # not a connection this worker accepted (cannot happen): no bound
            return self
        previous = conn.last_request
        conn.waited = False
        if previous is not None and getattr(previous.body, "failed", False):
            # Its body broke its framing: where a next request would start is unknown.
            raise StopIteration()
        if previous is not None and not _buffered(previous.unreader):
            arrived = _peek_now(conn.sock)
            if arrived is None:
                idle = gevent.Timeout(adm.keepalive_s)
                adm.register_wait(idle)
                try:
                    with idle:
                        arrived = _await_first_byte(conn.sock)  # the next request's first byte (or EOF)
                except gevent.Timeout as exc:
                    if exc is not idle:
                        raise
                    adm.waiting.pop(getcurrent(), None)
                    raise StopIteration() from None
                conn.waited = True
            if arrived and b"\r\n\r\n" in arrived and _body_consumed(previous):
                return self  # the whole head is here: parsing it cannot wait, no timer needed
        seconds = adm.header_timeout_s
        if conn.reserve:
            seconds = min(seconds, RESERVE_HEAD_TIMEOUT_S)
        self.timer = gevent.Timeout(seconds)
        adm.register_wait(self.timer)
        self.timer.start()
        return self

    def __exit__(self, typ: Any, value: Any, tb: Any) -> bool | None:
        adm = self.admission
        adm.waiting.pop(getcurrent(), None)
        if self.timer is None:
            return None
        self.timer.close()
        if value is not self.timer:
            return None
        if not adm.stopping and self.conn is not None:
            adm.write_error(self.conn.sock, 408, "Request Timeout",
                            "Request header timeout: the request head did not arrive in time")
        return True  # gunicorn then sees no request and closes the connection


HEAD_PEEK_BYTES = 8192


def _peek_now(sock: Any) -> bytes | None:
    """The bytes already received on ``sock`` (up to ``HEAD_PEEK_BYTES``, left in place), b""
    at EOF, None when nothing has arrived (or, on TLS, which cannot peek: unknown). Never
    waits: it asks gevent's underlying non-blocking socket directly."""
    if isinstance(sock, ssl.SSLSocket):
        return None
    try:
        return sock._sock.recv(HEAD_PEEK_BYTES, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None


def _body_consumed(request: Any) -> bool:
    """Whether gunicorn has read all of ``request``'s body, so what follows on the socket is
    the next request's head."""
    body = request.body
    if getattr(body.reader, "length", None) != 0:
        return False
    with body.buf.getbuffer() as view:
        return view.nbytes == 0


def _buffered(unreader: Any) -> bool:
    """Whether gunicorn already holds bytes of the next request (pipelining)."""
    with unreader.buf.getbuffer() as view:
        return view.nbytes > 0


def _await_first_byte(sock: Any) -> bytes | None:
    """Wait until the next request's first byte (or EOF) can be read from ``sock``; what
    arrived, left in place as :func:`_peek_now` returns it."""
    if isinstance(sock, ssl.SSLSocket):
        # TLS cannot peek; decrypted bytes may already wait in the TLS layer.
        if not sock.pending():
            wait_read(sock.fileno())
        return None
    return sock.recv(HEAD_PEEK_BYTES, socket.MSG_PEEK)
