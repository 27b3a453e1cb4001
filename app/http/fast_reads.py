"""A narrow fast path for the hottest request a cache answers: a download that hits.

The HTTP worker offers every GET/HEAD to ``FastReads.serve`` right after gunicorn has
parsed it. For the plain downloads (``app.http.routes.download``) it reads the target
with the very parser the blueprint uses (``RouteSpec.parse_target`` on gunicorn's raw
path and query), looks the artifact up and writes the whole answer itself (headers and a
small body in one send; large bodies with the cooperative ``os.sendfile``), skipping
Flask, Werkzeug and gunicorn's response object. HTTP/2 streams get the same answer
through gunicorn's HTTP/2 connection (``serve_h2``). Anything else — hooks enabled, a draining
node, a miss, a target that does not parse, a request with a body, another route —
returns False and the request goes to the normal blueprint untouched, so every error and
edge case keeps exactly one definition: the blueprint's.
"""
from __future__ import annotations

import errno
import os
import ssl
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Callable, Iterator

from app import metrics
from app.errors import KuraError
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


def _static_prefix(spec: RouteSpec) -> str:
    return spec.template[:spec.template.index("{")]


@dataclass(frozen=True)
class _Hit:
    """A request the fast path answers: its route, target and the artifact found."""

    spec: RouteSpec
    target: Any
    located: Located
    started: float


class FastReads:
    def __init__(self, services: NodeServices, sendfile_all: SendFile) -> None:
        self._services = services
        self._store = services.store
        self._node_state = services.node_state
        self._tenant = services.settings.tenant_id
        self._sendfile_all = sendfile_all
        # A cheap first filter; a path spelled with encoded literals fails it and simply
        # goes to the blueprint.
        self._specs = [(_static_prefix(spec), spec) for spec in fast_path_specs()]

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
        self._node_state.add_inflight(1)
        try:
            self._respond(req, sock, hit, keep_alive)
        finally:
            self._node_state.add_inflight(-1)
        self._account(req, hit)
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
        self._node_state.add_inflight(1)
        try:
            self._respond_h2(req, h2_conn, hit)
        finally:
            self._node_state.add_inflight(-1)
        self._account(req, hit)
        return True

    def _lookup(self, req: Any) -> _Hit | None:
        if req.method not in ("GET", "HEAD") or self._node_state.draining:
            return None
        for name, value in req.headers:
            if name in ("CONTENT-LENGTH", "TRANSFER-ENCODING") and value not in ("0", ""):
                return None
        started = time.perf_counter()
        path = req.path
        for prefix, spec in self._specs:
            if path.startswith(prefix) and spec.match(path) is not None:
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
        return _Hit(spec, target, located, started)

    def _account(self, req: Any, hit: _Hit) -> None:
        """The metrics, pacing sample and analytics event of one answered hit."""
        elapsed = time.perf_counter() - hit.started
        metrics.HTTP_REQUESTS.labels(hit.spec.template, "200").inc()
        metrics.HTTP_DURATION.labels(hit.spec.template).observe(elapsed)
        self._node_state.note_latency(elapsed)  # bandwidth pacing (app.replication.pacing)
        manifest = hit.located.manifest
        metrics.ARTIFACT_READS.labels(manifest.producer, "hit").inc()
        analytics = self._services.analytics
        if analytics is not None and req.method == "GET":
            analytics.record(manifest.producer, hit.target.tenant_id, hit.target.namespace_id,
                             hit.target.key or "", "download", hit.located.size)

    def _respond(self, req: Any, sock: Any, hit: _Hit, keep_alive: bool) -> None:
        located = hit.located
        manifest = located.manifest
        close = not keep_alive or req.should_close()
        head = (f"HTTP/{req.version[0]}.{req.version[1]} 200 OK\r\n"
                f"Server: kura\r\nDate: {_http_date()}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n"
                f"Content-Type: {hit.spec.content_type or manifest.content_type}\r\n"
                f"Content-Length: {manifest.size}\r\n\r\n").encode("latin-1")
        if req.method == "HEAD":
            sock.sendall(head)
            return
        metrics.ARTIFACT_READ_BYTES.labels(manifest.producer).inc(manifest.size)
        if located.inline_body is not None:
            metrics.SERVING_PATHS.labels("inline").inc()
            sock.sendall(head + located.inline_body)
        elif manifest.size <= SMALL_BODY:
            metrics.SERVING_PATHS.labels("pread").inc()
            sock.sendall(head + self._store.read_bytes(located))
        elif isinstance(sock, ssl.SSLSocket):
            sock.sendall(head)
            for chunk in self._segment_reads(located):
                sock.sendall(chunk)
            metrics.SERVING_PATHS.labels("read").inc()
        else:
            with self._store.open_body(located) as fh:
                sock.sendall(head)
                self._sendfile_all(sock, fh.fileno(), manifest.offset, manifest.size)
            metrics.SERVING_PATHS.labels("sendfile").inc()

    def _respond_h2(self, req: Any, h2_conn: Any, hit: _Hit) -> None:
        located = hit.located
        manifest = located.manifest
        stream_id = req.stream.stream_id
        headers = [("content-type", hit.spec.content_type or manifest.content_type),
                   ("content-length", str(manifest.size)),
                   ("server", "kura"), ("date", _http_date())]
        head_only = req.method == "HEAD" or manifest.size == 0
        if not h2_conn.send_response_headers(stream_id, 200, headers, end_stream=head_only):
            return  # the peer reset the stream
        if req.method == "HEAD":
            return
        metrics.ARTIFACT_READ_BYTES.labels(manifest.producer).inc(manifest.size)
        if manifest.size == 0:
            path = "inline" if located.inline_body is not None else "pread"
        elif located.inline_body is not None:
            path = "inline"
            h2_conn.send_data(stream_id, located.inline_body, end_stream=True)
        elif manifest.size <= SMALL_BODY:
            path = "pread"
            h2_conn.send_data(stream_id, self._store.read_bytes(located), end_stream=True)
        else:
            path = "read"
            sent = 0
            for chunk in self._segment_reads(located):
                sent += len(chunk)
                # A memoryview: gunicorn slices what it sends into frames without copies.
                if not h2_conn.send_data(stream_id, memoryview(chunk),
                                         end_stream=sent == manifest.size):
                    return  # reset or stalled past the timeout; gunicorn reset the stream
        metrics.SERVING_PATHS.labels(path).inc()

    def _segment_reads(self, located: Located) -> Iterator[bytes]:
        """The body in reads of :data:`SEGMENT_READ` bytes; exactly ``located.size`` bytes."""
        offset, size = located.manifest.offset, located.size
        with self._store.open_body(located) as fh:
            fd = fh.fileno()
            done = 0
            while done < size:
                chunk = os.pread(fd, min(SEGMENT_READ, size - done), offset + done)
                if not chunk:  # never a short body silently
                    raise OSError(errno.EIO, "segment ended before Content-Length")
                done += len(chunk)
                yield chunk
