"""Keep-alive HTTP/1.1 load generator for large bodies: one process per connection.

wrk reads responses through an 8 KiB buffer, which makes it the bottleneck for
multi-megabyte bodies. This client instead reads bodies with ``recv_into`` into a
preallocated 4 MiB buffer (the bytes are counted and dropped) and sends PUT bodies
with ``socket.sendfile`` from a file on disk, so its cost per byte is a few
syscalls. Each connection lives in its own process (spawned, so no parent state
crosses a fork) and all start together behind a barrier.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from dataclasses import dataclass, field

RECV_BUFFER = 4 * 1024 * 1024


@dataclass(frozen=True)
class BulkSpec:
    """What every connection of one cell does.

    ``path`` may contain ``{key}``: each request then gets a unique 64-hex key
    (``key_prefix`` + connection + sequence), so every PUT is a new artifact.
    """

    host: str
    port: int
    method: str
    path: str
    concurrency: int
    duration_s: float
    max_requests_per_connection: int
    body_file: str = ""
    body_size: int = 0
    key_prefix: str = ""
    extra_headers: tuple[tuple[str, str], ...] = ()
    copy_free_reads: bool = True  # False: copy every body byte into user space (like a real client)


@dataclass
class ConnectionResult:
    requests: int = 0
    errors: int = 0
    body_bytes: int = 0
    started: float = 0.0
    finished: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    cpu_s: float = 0.0
    first_error: str = ""


@dataclass
class BulkResult:
    requests: int
    errors: int
    body_bytes: int
    wall_s: float
    latencies_s: list[float]
    statuses: dict[int, int]
    client_cpu_s: float
    first_error: str


def unique_key(prefix: str, connection: int, sequence: int) -> str:
    return (prefix + f"{connection:04x}{sequence:012x}").rjust(64, "0")[-64:]


class _Connection:
    """A blocking HTTP/1.1 connection that reads with recv_into and never buffers bodies."""

    def __init__(self, host: str, port: int, copy_free: bool = True) -> None:
        self.host, self.port = host, port
        self.buf = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buf)
        self.sock: socket.socket | None = None
        self.start = self.end = 0  # unread bytes are buf[start:end]
        self.discard_flags = socket.MSG_TRUNC if copy_free else 0

    def connect(self) -> None:
        self.close()
        self.sock = socket.create_connection((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.start = self.end = 0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _fill(self) -> int:
        assert self.sock is not None
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            tail = self.end - self.start
            self.buf[0:tail] = self.buf[self.start:self.end]
            self.start, self.end = 0, tail
        got = self.sock.recv_into(self.view[self.end:])
        if got == 0:
            raise ConnectionError("server closed the connection")
        self.end += got
        return got

    def _read_head(self) -> bytes:
        while True:
            idx = self.buf.find(b"\r\n\r\n", self.start, self.end)
            if idx >= 0:
                head = bytes(self.buf[self.start:idx])
                self.start = idx + 4
                return head
            self._fill()

    def _readline(self) -> bytes:
        while True:
            idx = self.buf.find(b"\r\n", self.start, self.end)
            if idx >= 0:
                line = bytes(self.buf[self.start:idx])
                self.start = idx + 2
                return line
            self._fill()

    def _discard(self, count: int) -> int:
        """Consume ``count`` body bytes; large reads go straight from the socket into the buffer."""
        assert self.sock is not None
        remaining = count
        buffered = min(remaining, self.end - self.start)
        self.start += buffered
        remaining -= buffered
        if remaining:
            # The buffer is empty now: read the rest of the body straight into it.
            self.start = self.end = 0
        while remaining:
            # MSG_TRUNC on TCP drops the bytes in the kernel without copying them out,
            # which keeps this client cheap next to the server on a small machine.
            got = self.sock.recv_into(self.view, min(remaining, RECV_BUFFER), self.discard_flags)
            if got == 0:
                raise ConnectionError("server closed the connection mid-body")
            remaining -= got
        return count

    def request(self, method: str, path: str, headers: list[tuple[str, str]],
                body_fd: int | None, body_size: int) -> tuple[int, int, bool]:
        """Send one request and drain its response: (status, body bytes, keep-alive)."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if method in ("PUT", "POST"):
            lines.append(f"Content-Length: {body_size}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        if body_fd is not None and body_size:
            if body_size <= 64 * 1024:
                self.sock.sendall(head + os.pread(body_fd, body_size, 0))
            else:
                self.sock.sendall(head)
                sent = 0
                while sent < body_size:
                    n = os.sendfile(self.sock.fileno(), body_fd, sent, body_size - sent)
                    if n == 0:
                        raise ConnectionError("sendfile sent nothing")
                    sent += n
        else:
            self.sock.sendall(head)
        status_and_headers = self._read_head().split(b"\r\n")
        status = int(status_and_headers[0].split()[1])
        length, chunked, close = -1, False, False
        for line in status_and_headers[1:]:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                length = int(value.strip())
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif lname == b"connection" and value.strip().lower() == b"close":
                close = True
        received = 0
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif chunked:
            while True:
                size = int(self._readline().split(b";")[0], 16)
                if size == 0:
                    while self._readline():
                        pass
                    break
                received += self._discard(size)
                self._readline()
        elif length >= 0:
            received = self._discard(length)
        else:
            close = True
            try:
                while True:
                    received += self._fill()
                    self.start = self.end = 0
            except ConnectionError:
                pass
        if close:
            self.close()
        return status, received, not close


def _run_connection(spec: BulkSpec, index: int, barrier: object, queue: object) -> None:
    result = ConnectionResult()
    body_fd = os.open(spec.body_file, os.O_RDONLY) if spec.body_file else None
    conn = _Connection(spec.host, spec.port, spec.copy_free_reads)
    headers = list(spec.extra_headers)
    if spec.method in ("PUT", "POST"):
        headers.append(("Content-Type", "application/octet-stream"))
    try:
        conn.connect()
    except OSError as exc:
        result.first_error = f"connect: {exc}"
    barrier.wait()  # type: ignore[attr-defined]
    cpu0 = os.times()
    result.started = time.monotonic()
    deadline = result.started + spec.duration_s
    seq = 0
    while seq < spec.max_requests_per_connection and (seq == 0 or time.monotonic() < deadline):
        path = spec.path.replace("{key}", unique_key(spec.key_prefix, index, seq)) \
            if "{key}" in spec.path else spec.path
        seq += 1
        t0 = time.perf_counter()
        try:
            status, received, _ = conn.request(spec.method, path, headers, body_fd, spec.body_size)
        except (OSError, ValueError, IndexError) as exc:
            result.errors += 1
            result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
            conn.close()
            continue
        result.latencies_s.append(time.perf_counter() - t0)
        result.requests += 1
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status >= 300:
            result.errors += 1
            result.first_error = result.first_error or f"HTTP {status} for {spec.method} {path}"
        result.body_bytes += spec.body_size if spec.method in ("PUT", "POST") else received
    result.finished = time.monotonic()
    cpu1 = os.times()
    result.cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    conn.close()
    if body_fd is not None:
        os.close(body_fd)
    queue.put(result)  # type: ignore[attr-defined]


def run_bulk(spec: BulkSpec) -> BulkResult:
    """Run one cell: ``spec.concurrency`` connections, each in its own process."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(spec.concurrency + 1)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run_connection, args=(spec, i, barrier, queue), daemon=True)
             for i in range(spec.concurrency)]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=120)
    hard_timeout = spec.duration_s * 4 + 120
    results: list[ConnectionResult] = []
    for _ in procs:
        results.append(queue.get(timeout=hard_timeout))
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    statuses: dict[int, int] = {}
    for res in results:
        for code, count in res.statuses.items():
            statuses[code] = statuses.get(code, 0) + count
    started = min(r.started for r in results)
    finished = max(r.finished for r in results)
    return BulkResult(
        requests=sum(r.requests for r in results),
        errors=sum(r.errors for r in results),
        body_bytes=sum(r.body_bytes for r in results),
        wall_s=max(finished - started, 1e-9),
        latencies_s=[lat for r in results for lat in r.latencies_s],
        statuses=statuses,
        client_cpu_s=sum(r.cpu_s for r in results),
        first_error=next((r.first_error for r in results if r.first_error), ""),
    )
