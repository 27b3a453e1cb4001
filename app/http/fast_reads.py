"""A narrow fast path for the hottest request a cache answers: a download that hits.

The HTTP worker offers every GET/HEAD to ``FastReads.serve`` right after gunicorn has
parsed it. For the plain downloads (``app.http.routes.download``) it reads the target
with the very parser the blueprint uses (``RouteSpec.parse_target`` on gunicorn's raw
path and query), looks the artifact up and writes the whole answer itself (headers and a
small body in one send; large bodies with the cooperative ``os.sendfile``), skipping
Flask, Werkzeug and gunicorn's response object. Anything else — hooks enabled, a draining
node, a miss, a target that does not parse, a request with a body, another route —
returns False and the request goes to the normal blueprint untouched, so every error and
edge case keeps exactly one definition: the blueprint's.
"""
from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any, Callable

from app import metrics
from app.errors import KuraError
from app.http.bodies import SMALL_BODY
from app.http.routes import RouteSpec, fast_path_specs
from app.http.services import NodeServices
from app.storage.store import Located

SendFile = Callable[[Any, int, int, int], None]


_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    """The Date header, formatted once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return _date_cache[1]


def _static_prefix(spec: RouteSpec) -> str:
    return spec.template[:spec.template.index("{")]


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
        self._samples: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    @classmethod
    def for_app(cls, app: Any, sendfile_all: SendFile) -> "FastReads | None":
        services: NodeServices | None = getattr(app, "extensions", {}).get("kura")
        if services is None or services.extensions is not None:
            return None  # hooks need the full request context: everything goes through Flask
        return cls(services, sendfile_all)

    def serve(self, req: Any, sock: Any, keep_alive: bool) -> bool:
        """Answer ``req`` if it is a plain artifact hit; False hands it to the blueprint."""
        if req.method not in ("GET", "HEAD") or self._node_state.draining:
            return False
        for name, value in req.headers:
            if name in ("CONTENT-LENGTH", "TRANSFER-ENCODING") and value not in ("0", ""):
                return False
        started = time.perf_counter()
        path = req.path
        for prefix, spec in self._specs:
            if path.startswith(prefix) and spec.match(path) is not None:
                break
        else:
            return False
        try:
            target = spec.parse_target(path, req.query, self._tenant)
        except KuraError:
            return False
        located = self._store.lookup(spec.producer or "", target.namespace_id, target.key or "")
        if located is None:
            return False  # the blueprint answers the miss (404 body, metrics)
        self._node_state.add_inflight(1)
        try:
            self._respond(req, sock, spec, located, keep_alive)
        finally:
            self._node_state.add_inflight(-1)
        elapsed = time.perf_counter() - started
        requests, duration, reads = self._hit_metrics(spec.template, located.manifest.producer)
        requests.inc()
        duration.observe(elapsed)
        self._node_state.note_latency(elapsed)  # bandwidth pacing (app.replication.pacing)
        reads.inc()
        analytics = self._services.analytics
        if analytics is not None and req.method == "GET":
            analytics.record(located.manifest.producer, target.tenant_id, target.namespace_id,
                             target.key or "", "download", located.size)
        if not keep_alive or req.should_close():
            raise StopIteration()  # gunicorn's way of ending the connection after this answer
        return True

    def _hit_metrics(self, template: str, producer: str) -> tuple[Any, Any, Any]:
        """The labelled samples a hit counts into, looked up once per route and producer."""
        key = (template, producer)
        found = self._samples.get(key)
        if found is None:
            found = self._samples[key] = (metrics.HTTP_REQUESTS.labels(template, "200"),
                                          metrics.HTTP_DURATION.labels(template),
                                          metrics.ARTIFACT_READS.labels(producer, "hit"))
        return found

    def _respond(self, req: Any, sock: Any, spec: RouteSpec, located: Located, keep_alive: bool) -> None:
        manifest = located.manifest
        close = not keep_alive or req.should_close()
        head = (f"HTTP/{req.version[0]}.{req.version[1]} 200 OK\r\n"
                f"Server: kura\r\nDate: {_http_date()}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n"
                f"Content-Type: {spec.content_type or manifest.content_type}\r\n"
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
        else:
            with self._store.open_body(located) as fh:
                sock.sendall(head)
                self._sendfile_all(sock, fh.fileno(), manifest.offset, manifest.size)
            metrics.SERVING_PATHS.labels("sendfile").inc()

