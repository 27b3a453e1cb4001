"""A narrow fast path for the hottest request a cache answers: a download that hits.

The HTTP worker offers every GET/HEAD to ``FastReads.serve`` right after gunicorn has
parsed it. For the plain artifact routes it looks the artifact up and writes the whole
answer itself (headers and a small body in one send; large bodies with the cooperative
``os.sendfile``), skipping Flask, Werkzeug and gunicorn's response object. Anything else
— hooks enabled, a draining node, a miss, a malformed id, a request with a body, an
unknown route — returns False and the request goes to the normal blueprint untouched,
so every error and edge case keeps exactly one definition: the blueprint's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Callable
from urllib.parse import parse_qsl


from app import metrics
from app.errors import KuraError
from app.http import keyvalue, params, xcode_cas
from app.http.bodies import SMALL_BODY
from app.http.route_table import ROUTES, RouteInfo
from app.http.services import NodeServices
from app.storage.keys import validate_component
from app.storage.store import Located

SendFile = Callable[[Any, int, int, int], None]


@dataclass(frozen=True)
class _Route:
    info: RouteInfo
    key_prefix: str = ""
    tenant_required: bool = True
    content_type: str | None = None


_XCODE = _Route(ROUTES["xcode_cas.download"], xcode_cas.KEY_PREFIX)
_KEYVALUE = _Route(ROUTES["keyvalue.get_entry"], keyvalue.KEY_PREFIX, content_type=keyvalue.CONTENT_TYPE)
_GRADLE = _Route(ROUTES["gradle.get"])
_GRADLE_PATH = _Route(ROUTES["gradle.get_by_path"], tenant_required=False)
_NX = _Route(ROUTES["nx.get"], tenant_required=False)
_NX_PATH = _Route(ROUTES["nx.get_in_namespace"], tenant_required=False)
_METRO = _Route(ROUTES["metro.get"], tenant_required=False)


_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    """The Date header, formatted once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return _date_cache[1]


def _match(parts: list[str]) -> tuple[_Route, str, str | None] | None:
    """``(route, key, namespace from the path or None)`` for a split path."""
    n = len(parts)
    if n == 4 and parts[1] == "v1" and parts[2] == "cache":
        return _NX, parts[3], None
    if n == 5 and parts[1] == "api":
        if parts[2] == "cache":
            route = {"cas": _XCODE, "gradle": _GRADLE, "keyvalue": _KEYVALUE}.get(parts[3])
            return (route, parts[4], None) if route else None
        if parts[2] == "metro" and parts[3] == "cache":
            return _METRO, parts[4], None
        return None
    if parts[1] == "gradle" and (n == 5 or (n == 6 and parts[5] == "")):
        return _GRADLE_PATH, parts[4], params.path_namespace(parts[3])
    if n == 6 and parts[1] == "nx" and parts[3] == "v1" and parts[4] == "cache":
        return _NX_PATH, parts[5], params.path_namespace(parts[2])
    return None


class FastReads:
    def __init__(self, services: NodeServices, sendfile_all: SendFile) -> None:
        self._services = services
        self._store = services.store
        self._node_state = services.node_state
        self._sendfile_all = sendfile_all

    @classmethod
    def for_app(cls, app: Any, sendfile_all: SendFile) -> "FastReads | None":
        services: NodeServices | None = getattr(app, "extensions", {}).get("kura")
        if services is None or services.extensions is not None:
            return None  # hooks need the full request context: everything goes through Flask
        return cls(services, sendfile_all)

    def serve(self, req: Any, sock: Any, keep_alive: bool) -> bool:
        """Answer ``req`` if it is a plain artifact hit; False hands it to the blueprint."""
        if req.method not in ("GET", "HEAD") or "%" in req.path or self._node_state.draining:
            return False
        for name, value in req.headers:
            if name in ("CONTENT-LENGTH", "TRANSFER-ENCODING") and value not in ("0", ""):
                return False
        started = time.perf_counter()
        try:
            matched = _match(req.path.split("/"))
            if matched is None:
                return False
            route, raw_key, path_namespace = matched
            query = dict(parse_qsl(req.query, keep_blank_values=True)) if req.query else {}
            tenant = query.get("tenant_id") or query.get("account_handle")
            if route.tenant_required and not tenant:
                return False
            if path_namespace is None:
                namespace = (query.get("namespace_id") or query.get("project_handle")
                             or route.info.default_namespace)
                validate_component(namespace, "namespace_id", allow_empty=True)
            else:
                namespace = path_namespace
            key = route.key_prefix + validate_component(raw_key, "key")
            located = self._store.lookup(route.info.producer or "", namespace, key)
            if located is None:
                return False  # the blueprint answers the miss (404 body, metrics)
        except KuraError:
            return False
        self._node_state.add_inflight(1)
        try:
            self._respond(req, sock, route, located, keep_alive)
        finally:
            self._node_state.add_inflight(-1)
        metrics.HTTP_REQUESTS.labels(route.info.template, "200").inc()
        metrics.HTTP_DURATION.labels(route.info.template).observe(time.perf_counter() - started)
        metrics.ARTIFACT_READS.labels(located.manifest.producer, "hit").inc()
        if not keep_alive or req.should_close():
            raise StopIteration()  # gunicorn's way of ending the connection after this answer
        return True

    def _respond(self, req: Any, sock: Any, route: _Route, located: Located, keep_alive: bool) -> None:
        manifest = located.manifest
        close = not keep_alive or req.should_close()
        head = (f"HTTP/{req.version[0]}.{req.version[1]} 200 OK\r\n"
                f"Server: kura\r\nDate: {_http_date()}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n"
                f"Content-Type: {route.content_type or manifest.content_type}\r\n"
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

