"""A narrow fast path for the hottest request a cache answers: a download that hits.

The HTTP worker offers every GET/HEAD to ``FastReads.serve`` right after gunicorn has
parsed it. For the plain downloads (``app.http.routes.download``) it reads the target
with the very parser the blueprint uses (``RouteSpec.parse_target`` on gunicorn's raw
path and query), looks the artifact up and writes the whole answer itself (headers and a
small body in one send; large bodies with the cooperative ``os.sendfile``; a Range read
from the range's offset, ``app.http.ranges``), skipping Flask, Werkzeug and gunicorn's
response object. HTTP/2 streams get the same answer through gunicorn's HTTP/2 connection
(``serve_h2``). Anything else — hooks enabled, a draining node, a miss, a target that does
not parse, a range past the end, a request with a body, another route — returns False and
the request goes to the normal blueprint untouched, so every error and edge case keeps
exactly one definition: the blueprint's. An answer given here has its trace span like any
other (``app.tracing``), which covers the whole send.
"""
from __future__ import annotations

import errno
import os
import ssl
import sys
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Callable, Iterator

from app import metrics, tracing
from app.errors import KuraError
from app.http import ranges
from app.http.bodies import SMALL_BODY
from app.http.routes import RouteSpec, fast_path_specs
from app.http.services import NodeServices
from app.storage.store import Located

SendFile = Callable[[Any, int, int, int], None]
# Where sendfile cannot go (HTTP/2 frames, TLS), a large body leaves in reads of this size.
SEGMENT_READ = 256 * 1024


_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    """The Date header, formatted once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return _date_cache[1]


def _variable_first(spec: RouteSpec) -> bool:
    return spec.parts[1].startswith("{")


_STATUS_LINES = {status: f" {status} {HTTPStatus(status).phrase}\r\n" for status in (200, 206)}


@dataclass(frozen=True)
class _Hit:
    """A request the fast path answers: its route, target, the artifact found and the part
    of it to send (``byte_range`` None: all of it)."""

    spec: RouteSpec
    path: str
    target: Any
    located: Located
    byte_range: ranges.ByteRange | None
    started: float

    @property
    def status(self) -> int:
        return ranges.status(self.byte_range)

    @property
    def extent(self) -> tuple[int, int]:
        """``(start, length)`` of the bytes the answer sends."""
        return ranges.extent(self.byte_range, self.located.size)


class FastReads:
    def __init__(self, services: NodeServices, sendfile_all: SendFile) -> None:
        self._services = services
        self._store = services.store
        self._node_state = services.node_state
        self._tenant = services.settings.tenant_id
        self._sendfile_all = sendfile_all
        # The candidate routes by the path's first segment, in declaration order (a route
        # with a variable there is a candidate for every path). A path spelled with encoded
        # literals is no candidate and simply goes to the blueprint.
        specs = fast_path_specs()
        firsts = {spec.parts[1] for spec in specs if not _variable_first(spec)}
        self._candidates = {first: [spec for spec in specs if spec.parts[1] == first
                                    or _variable_first(spec)] for first in firsts}
        self._anywhere = [spec for spec in specs if _variable_first(spec)]

    @classmethod
    def for_app(cls, app: Any, sendfile_all: SendFile) -> "FastReads | None":
        services: NodeServices | None = getattr(app, "extensions", {}).get("kura")
        if services is None or services.extensions is not None:
            return None  # hooks need the full request context: everything goes through Flask
        return cls(services, sendfile_all)

    def serve(self, req: Any, sock: Any, keep_alive: bool) -> bool:
        """Answer HTTP/1.x ``req`` on ``sock`` if it is a plain artifact hit; False hands it
        to the blueprint. The body goes out with ``os.sendfile`` unless ``sock`` is TLS."""
        hit = self._lookup(req)
        if hit is None:
            return False
        self._answer(req, hit, lambda: self._respond(req, sock, hit, keep_alive))
        if not keep_alive or req.should_close():
            raise StopIteration()  # gunicorn's way of ending the connection after this answer
        return True

    def serve_h2(self, req: Any, h2_conn: Any) -> bool:
        """Answer HTTP/2 ``req`` on its stream of ``h2_conn`` (gunicorn's
        ``HTTP2ServerConnection``) if it is a plain artifact hit. HTTP/2 frames the body,
        so it leaves in segment reads of :data:`SEGMENT_READ` bytes, never with sendfile."""
        hit = self._lookup(req)
        if hit is None:
            return False
        self._answer(req, hit, lambda: self._respond_h2(req, h2_conn, hit))
        return True

    def _lookup(self, req: Any) -> _Hit | None:
        if req.method not in ("GET", "HEAD") or self._node_state.draining:
            return None
        ranged: dict[str, list[str]] = {}
        for name, value in req.headers:  # one pass over the head
            if name in ("CONTENT-LENGTH", "TRANSFER-ENCODING") and value not in ("0", ""):
                return None
            if name in ("RANGE", "IF-RANGE"):
                ranged.setdefault(name, []).append(value)
        started = time.perf_counter()
        path = req.path
        segments = path.split("/", 2)
        candidates = self._candidates.get(segments[1], self._anywhere) if len(segments) > 1 else ()
        for spec in candidates:
            if spec.match(path) is not None:
                break
        else:
            return None
        try:
            target = spec.parse_target(path, req.query, self._tenant)
        except KuraError:
            return None
        located = self._store.lookup(spec.producer or "", target.namespace_id, target.key or "")
        if located is None:
            return None  # the blueprint answers the miss (404 body, metrics)
        try:
            byte_range = ranges.select(req.method, _joined(ranged, "RANGE"),
                                       _joined(ranged, "IF-RANGE"), located.size)
        except KuraError:
            return None  # the blueprint answers 416
        return _Hit(spec, path, target, located, byte_range, started)

    def _answer(self, req: Any, hit: _Hit, respond: Callable[[], bool]) -> None:
        """Send the answer with ``respond`` (False: the client reset it part-way) and count
        it: read, egress, request metrics, its span, the pacing sample, analytics."""
        producer = hit.located.manifest.producer
        body_size = hit.extent[1] if req.method == "GET" else 0
        metrics.artifact_read(producer, metrics.OK, body_size)
        span = None if tracing.TRACER is None else tracing.start_http_span(
            req.method, hit.spec.template, hit.path, tracing.carrier(req.headers), None)
        self._node_state.add_inflight(1)
        try:
            finished = respond()
        except BaseException:
            if body_size:
                # The client went away (or the segment failed) mid-answer; how much of the
                # body left is unknown here.
                metrics.artifact_egress(producer, metrics.ABORTED, 0)
            raise
        finally:
            self._node_state.add_inflight(-1)
            if span is not None:
                tracing.set_http_response(span, req.method, hit.status, body_size)
                tracing.end_span(span, sys.exc_info()[1])
        if body_size:
            metrics.artifact_egress(producer, *((metrics.OK, body_size) if finished
                                                else (metrics.ABORTED, 0)))
        elapsed = time.perf_counter() - hit.started
        metrics.record_http(hit.spec.template, hit.status, elapsed)
        self._node_state.note_latency(elapsed)  # bandwidth pacing (app.replication.pacing)
        analytics = self._services.analytics
        if analytics is not None and req.method == "GET":
            analytics.record(producer, hit.target.tenant_id, hit.target.namespace_id,
                             hit.target.key or "", "download", hit.located.size)

    def _respond(self, req: Any, sock: Any, hit: _Hit, keep_alive: bool) -> bool:
        located = hit.located
        manifest = located.manifest
        (start, length), status = hit.extent, hit.status
        close = not keep_alive or req.should_close()
        head = (f"HTTP/{req.version[0]}.{req.version[1]}{_STATUS_LINES[status]}"
                f"Server: kura\r\nDate: {_http_date()}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n"
                f"Content-Type: {hit.spec.content_type or manifest.content_type}\r\n"
                + "".join(f"{name}: {value}\r\n" for name, value in _extra_headers(hit))
                + f"Content-Length: {length}\r\n\r\n").encode("latin-1")
        if req.method == "HEAD":
            sock.sendall(head)
            return True
        if located.inline_body is not None:
            metrics.served("inline")
            sock.sendall(head + located.inline_body[start:start + length])
        elif length <= SMALL_BODY:
            metrics.served("pread")
            sock.sendall(head + self._store.read_bytes(located, start, length))
        elif isinstance(sock, ssl.SSLSocket):
            sock.sendall(head)
            for chunk in self._segment_reads(located, start, length):
                sock.sendall(chunk)
            metrics.served("read")
        else:
            with self._store.open_body(located) as fh:
                sock.sendall(head)
                self._sendfile_all(sock, fh.fileno(), manifest.offset + start, length)
            metrics.served("sendfile")
        return True

    def _respond_h2(self, req: Any, h2_conn: Any, hit: _Hit) -> bool:
        located = hit.located
        manifest = located.manifest
        start, length = hit.extent
        stream_id = req.stream.stream_id
        headers = [("content-type", hit.spec.content_type or manifest.content_type),
                   *((name.lower(), value) for name, value in _extra_headers(hit)),
                   ("content-length", str(length)),
                   ("server", "kura"), ("date", _http_date())]
        if req.method == "HEAD" or length <= SMALL_BODY:
            if req.method == "HEAD" or not length:
                body, path = b"", "inline" if located.inline_body is not None else "pread"
            elif located.inline_body is not None:
                body, path = located.inline_body[start:start + length], "inline"
            else:
                body, path = self._store.read_bytes(located, start, length), "pread"
            if not h2_conn.send_small_response(stream_id, hit.status, headers, body):
                return False  # the peer reset the stream
            if req.method == "GET":
                metrics.served(path)
            return True
        if not h2_conn.send_response_headers(stream_id, hit.status, headers):
            return False  # the peer reset the stream
        sent = 0
        for chunk in self._segment_reads(located, start, length):
            sent += len(chunk)
            # A memoryview: gunicorn slices what it sends into frames without copies.
            if not h2_conn.send_data(stream_id, memoryview(chunk), end_stream=sent == length):
                return False  # reset or stalled past the timeout; gunicorn reset the stream
        metrics.served("read")
        return True

    def _segment_reads(self, located: Located, start: int, length: int) -> Iterator[bytes]:
        """``length`` bytes of the body from ``start``, in reads of :data:`SEGMENT_READ`."""
        offset = located.manifest.offset + start
        with self._store.open_body(located) as fh:
            fd = fh.fileno()
            done = 0
            while done < length:
                chunk = os.pread(fd, min(SEGMENT_READ, length - done), offset + done)
                if not chunk:  # never a short body silently
                    raise OSError(errno.EIO, "segment ended before Content-Length")
                done += len(chunk)
                yield chunk


def _extra_headers(hit: _Hit) -> list[tuple[str, str]]:
    """The headers kept from the upload (``Manifest.headers``), then the range's own."""
    return [*hit.located.manifest.headers, *ranges.response_headers(hit.byte_range)]


def _joined(headers: dict[str, list[str]], name: str) -> str | None:
    """Header ``name`` (gunicorn upper-cases names) as the blueprint reads it from gunicorn's
    environ: repeated values joined with a comma."""
    values = headers.get(name)
    return ",".join(values) if values else None
