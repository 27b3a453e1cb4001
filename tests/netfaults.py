"""A controllable TCP proxy for tests: put it between two real processes and break the network on demand.

``FaultyProxy(target_host, target_port)`` listens on a free loopback port and forwards every accepted
connection to the target. At any time a test can switch it to:

- ``forward()``: move bytes as fast as both ends allow (and end a stall, a drop or a throttle);
- ``stall()``: move no bytes in either direction on any connection, old or new (new connections are
  accepted and connected to the target, then held); ``resume()`` continues exactly where it stopped;
- ``drop()``: reset every open connection now and reset every new one on accept, until ``forward()``
  or ``throttle()``;
- ``throttle(bytes_per_second)``: pace each direction to that rate, shared by all connections (like one
  link of that bandwidth); a later ``stall()`` keeps the rate for ``resume()``.

Counters (``bytes_to_target``, ``bytes_to_client``, ``connections_accepted``, ``active_connections``)
let a test assert that traffic did (or did not) flow; ``cpu_seconds`` is the proxy thread's own CPU time.

The proxy is one plain thread running a ``selectors`` loop (tests run under plain CPython, never gevent).
Control methods hand a command to that thread and return only after it has been applied, so when
``stall()`` returns no further byte moves, and when ``drop()`` returns every connection is reset.
"""
from __future__ import annotations

import errno
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType

# Bytes held by the proxy per direction of one connection; it stops reading from a side whose bytes it
# cannot pass on yet, so a stalled or throttled proxy pushes back on the sender instead of buffering.
_BUFFER_BYTES = 256 * 1024
# A paced direction may send this many seconds' worth of bytes in one burst; it wakes for at most
# 2 / _BURST_SECONDS sends a second, whatever the rate, so a slow throttle costs almost no CPU.
_BURST_SECONDS = 0.05


class _Pace:
    """A token bucket for one direction of the proxy (shared by all its connections)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(rate * _BURST_SECONDS, 1.0)
        self.tokens = 0.0
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def threshold(self, pending: int) -> float:
        """Tokens needed before a flow with ``pending`` bytes is worth waking for."""
        return min(float(pending), self.burst / 2)

    def seconds_until(self, tokens: float) -> float:
        return max(0.0, (tokens - self.tokens) / self.rate)


class _Flow:
    """One direction of one proxied connection: bytes read from ``src`` wait in ``buf`` for ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket, to_target: bool) -> None:
        self.src = src
        self.dst = dst
        self.to_target = to_target
        self.buf = bytearray()
        self.eof = False  # src sent FIN
        self.shut = False  # FIN passed on to dst


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.connected = False  # upstream connect() completed
        self.up = _Flow(client, upstream, to_target=True)
        self.down = _Flow(upstream, client, to_target=False)

    @property
    def flows(self) -> tuple[_Flow, _Flow]:
        return (self.up, self.down)

    @property
    def finished(self) -> bool:
        return self.up.shut and self.down.shut


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN, like a peer that crashed or a middlebox that gave up."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultyProxy:
    """A TCP proxy on ``listen_host`` that forwards to ``target_host:target_port`` and can be broken on demand."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._target_family = socket.getaddrinfo(target_host, target_port, type=socket.SOCK_STREAM)[0][0]
        self._listener = socket.create_server((listen_host, listen_port), backlog=128)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]

        self._stalled = False
        self._dropping = False
        self._paces: dict[bool, _Pace] | None = None  # keyed by _Flow.to_target
        self._connections: list[_Connection] = []
        self._interest: dict[socket.socket, int] = {}

        self.bytes_to_target = 0
        self.bytes_to_client = 0
        self.connections_accepted = 0

        self._commands: list[tuple[Callable[[], None], threading.Event]] = []
        self._commands_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._running = True
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"FaultyProxy:{self.port}", daemon=True)
        self._thread.start()

    # -- public control ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://host:port`` of the proxy's listening side."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def active_connections(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._connections)

    @property
    def cpu_seconds(self) -> float:
        """CPU time the proxy's thread has used so far."""
        ident = self._thread.ident
        if ident is None or not self._thread.is_alive():
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(ident))

    def forward(self) -> None:
        """Forward bytes at full speed; ends any stall, drop or throttle."""
        def apply() -> None:
            self._stalled = False
            self._dropping = False
            self._paces = None
        self._call(apply)

    def throttle(self, bytes_per_second: float) -> None:
        """Pace each direction to ``bytes_per_second`` (over all connections); ends a stall or a drop."""
        if bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")

        def apply() -> None:
            self._stalled = False
            self._dropping = False
            self._paces = {True: _Pace(bytes_per_second), False: _Pace(bytes_per_second)}
        self._call(apply)

    def stall(self) -> None:
        """Hold every connection, present and future, without moving a byte until ``resume()``."""
        def apply() -> None:
            self._stalled = True
        self._call(apply)

    def resume(self) -> None:
        """End a stall; held bytes continue in order, at the throttle rate if one was set."""
        def apply() -> None:
            self._stalled = False
        self._call(apply)

    def drop(self) -> None:
        """Reset every open connection now and every new one on accept until ``forward()``/``throttle()``."""
        def apply() -> None:
            self._dropping = True
            self._stalled = False
            for conn in list(self._connections):
                self._abort(conn)
        self._call(apply)

    def close(self) -> None:
        """Stop the proxy: reset every connection and close the listener. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            def apply() -> None:
                self._running = False
            self._call(apply)
            self._thread.join(timeout=5)
        for conn in list(self._connections):
            self._abort(conn)
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultyProxy({self.url} -> {self.target[0]}:{self.target[1]})"

    # -- loop thread ---------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        if not self._thread.is_alive():
            raise RuntimeError(f"{self!r} is not running")
        done = threading.Event()
        with self._commands_lock:
            self._commands.append((fn, done))
        self._wake_w.send(b"\0")
        if not done.wait(timeout=10):
            raise RuntimeError(f"{self!r} did not apply a command within 10 s")

    def _run_commands(self) -> None:
        with self._commands_lock:
            commands, self._commands = self._commands, []
        for fn, done in commands:
            try:
                fn()
            finally:
                done.set()

    def _run(self) -> None:
        try:
            while self._running:
                self._run_commands()
                if not self._running:
                    break
                timeout = self._update_interest()
                for key, mask in self._selector.select(timeout):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        self._service(key.data, key.fileobj, mask)  # type: ignore[arg-type]
        finally:
            # Release any caller still waiting on a command if the loop died.
            with self._commands_lock:
                for _, done in self._commands:
                    done.set()
                self._commands = []

    def _moving(self) -> bool:
        return not self._stalled and not self._dropping

    def _can_read(self, conn: _Connection, flow: _Flow) -> bool:
        return (self._moving() and not flow.eof and len(flow.buf) < _BUFFER_BYTES
                and (flow.to_target or conn.connected))

    def _can_write(self, conn: _Connection, flow: _Flow) -> bool:
        if not (self._moving() and conn.connected and flow.buf):
            return False
        if self._paces is None:
            return True
        pace = self._paces[flow.to_target]
        return pace.tokens >= pace.threshold(len(flow.buf))

    def _update_interest(self) -> float | None:
        """Register what each socket waits for now; return how long to sleep until tokens arrive."""
        now = time.monotonic()
        if self._paces is not None:
            for pace in self._paces.values():
                pace.refill(now)
        timeout: float | None = None
        wanted: dict[socket.socket, tuple[int, _Connection]] = {}
        for conn in self._connections:
            events = {conn.client: 0, conn.upstream: 0}
            if not conn.connected:
                events[conn.upstream] |= selectors.EVENT_WRITE
            for flow in conn.flows:
                if self._can_read(conn, flow):
                    events[flow.src] |= selectors.EVENT_READ
                if self._can_write(conn, flow):
                    events[flow.dst] |= selectors.EVENT_WRITE
                elif self._paces is not None and self._moving() and conn.connected and flow.buf:
                    pace = self._paces[flow.to_target]
                    wait = pace.seconds_until(pace.threshold(len(flow.buf)))
                    timeout = wait if timeout is None else min(timeout, wait)
            for sock, mask in events.items():
                wanted[sock] = (mask, conn)
        for sock in list(self._interest):
            if sock not in wanted or wanted[sock][0] == 0:
                self._selector.unregister(sock)
                del self._interest[sock]
        for sock, (mask, conn) in wanted.items():
            if mask == 0:
                continue
            if sock not in self._interest:
                self._selector.register(sock, mask, conn)
            elif self._interest[sock] != mask:
                self._selector.modify(sock, mask, conn)
            self._interest[sock] = mask
        return timeout

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.connections_accepted += 1
            if self._dropping:
                _reset(client)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream = socket.socket(self._target_family, socket.SOCK_STREAM)
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(client, upstream)
            self._connections.append(conn)
            err = upstream.connect_ex(self.target)
            if err == 0:
                conn.connected = True
            elif err not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                self._abort(conn)

    def _service(self, conn: _Connection, sock: socket.socket, mask: int) -> None:
        if conn not in self._connections:
            return  # aborted earlier in this round of events
        try:
            if mask & selectors.EVENT_WRITE:
                if sock is conn.upstream and not conn.connected:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, "connect to target failed")
                    conn.connected = True
                    self._pass_fin(conn, conn.up)  # the client may have finished before the target answered
                else:
                    self._send(conn, conn.up if sock is conn.upstream else conn.down)
            if mask & selectors.EVENT_READ:
                self._receive(conn, conn.up if sock is conn.client else conn.down)
        except OSError:
            self._abort(conn)
            return
        if conn.finished:
            self._connections.remove(conn)
            self._forget(conn)
            conn.client.close()
            conn.upstream.close()

    def _receive(self, conn: _Connection, flow: _Flow) -> None:
        if not self._can_read(conn, flow):
            return
        try:
            data = flow.src.recv(min(65536, _BUFFER_BYTES - len(flow.buf)))
        except (BlockingIOError, InterruptedError):
            return
        if data:
            flow.buf += data
        else:
            flow.eof = True
            self._pass_fin(conn, flow)

    def _send(self, conn: _Connection, flow: _Flow) -> None:
        if not self._can_write(conn, flow):
            return
        size = len(flow.buf)
        pace = None if self._paces is None else self._paces[flow.to_target]
        if pace is not None:
            size = min(size, int(pace.tokens))
            if size <= 0:
                return
        try:
            sent = flow.dst.send(memoryview(flow.buf)[:size])
        except (BlockingIOError, InterruptedError):
            return
        del flow.buf[:sent]
        if pace is not None:
            pace.tokens -= sent
        if flow.to_target:
            self.bytes_to_target += sent
        else:
            self.bytes_to_client += sent
        self._pass_fin(conn, flow)

    def _pass_fin(self, conn: _Connection, flow: _Flow) -> None:
        if flow.eof and not flow.buf and not flow.shut and conn.connected:
            flow.dst.shutdown(socket.SHUT_WR)
            flow.shut = True

    def _forget(self, conn: _Connection) -> None:
        for sock in (conn.client, conn.upstream):
            if sock in self._interest:
                self._selector.unregister(sock)
                del self._interest[sock]

    def _abort(self, conn: _Connection) -> None:
        if conn in self._connections:
            self._connections.remove(conn)
        self._forget(conn)
        _reset(conn.client)
        _reset(conn.upstream)
