"""Every public HTTP route, declared once, next to its view.

``@route(bp, "/api/cache/cas/{id}", methods=["GET"], operation=READ, producer="xcode",
target=Targets(QUERY_TENANT, QUERY_NAMESPACE, PathKey("id", "CAS id", prefix="blob/")))``
registers the Flask rule and the route's ``RouteSpec`` together. The spec is the only
statement of the route's facts:

- its Kura template (``ctx.route`` for the hooks, the ``route`` label of the metrics);
- its operation and producer (the hooks' ``ctx.operation`` / ``ctx.producer``);
- how its target (tenant, namespace, storage key, hash) is read: ``RouteSpec.parse_target``
  works on the raw request target (the path exactly as sent, still percent-encoded, and
  the query string), never on Flask's request, so the HTTP worker's download fast path
  (``app.http.fast_reads``) reads exactly what the blueprint reads.

The Flask rule is derived from the template with a converter that accepts anything, so
Flask only dispatches (and answers 405 with ``Allow``); whether the path fits the template
is decided here, segment by segment on the raw path. A key with an encoded slash
(``%2F``) is therefore refused with 400, a literal extra segment is 404, and no artifact
route ever redirects (Werkzeug's slash merging is off: artifact keys are not file paths).

Query parameters follow Kura: a repeated name keeps its last value; ``tenant_id`` and
``namespace_id`` fall back to their aliases ``account_handle`` / ``project_handle`` only
when absent, so ``?tenant_id=&account_handle=a`` is a missing tenant. Path segments and
the query parameters a route reads must be valid UTF-8 once percent-decoded.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol
from urllib.parse import parse_qsl, quote, unquote_to_bytes

from flask import Blueprint, Flask, g, request
from werkzeug.routing import BaseConverter

from app.errors import BadRequest, NotFound, TooLarge
from app.storage.keys import validate_component

if TYPE_CHECKING:
    from app.storage.multipart import MultipartUploads, Upload

READ = "artifact.read"
WRITE = "artifact.write"
INSPECT = "artifact.inspect"
NAMESPACE_DELETE = "namespace.delete"

TENANT_WIDE = "_"  # path segment meaning the tenant-wide namespace "" (stock Gradle URLs)
ALIASES = {"tenant_id": ("account_handle",), "namespace_id": ("project_handle",)}


def decode(raw: str, what: str) -> str:
    """Percent-decode one path segment or query value; it must be UTF-8."""
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"Invalid {what}: not valid UTF-8") from None


class Query:
    """A query string parsed once, the way Kura reads it (see the module docstring)."""

    def __init__(self, query_string: str) -> None:
        self._values: dict[str, str] = {}
        # surrogateescape keeps undecodable bytes so that reading them can refuse them.
        for name, value in parse_qsl(query_string, keep_blank_values=True, errors="surrogateescape"):
            self._values[name] = value

    def raw(self, name: str) -> str | None:
        """The value of ``name`` (or of its first alias present), empty string included."""
        for key in (name, *ALIASES.get(name, ())):
            if key in self._values:
                return _strict(self._values[key], name)
        return None

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of ``name`` or its alias; an empty value counts as absent."""
        return self.raw(name) or default

    def required(self, name: str) -> str:
        value = self.get(name)
        if not value:
            raise BadRequest(f"Missing {name}")
        return value

    def to_dict(self) -> dict[str, str]:
        """Every parameter, for the hooks' ``ctx.query`` (undecodable bytes replaced)."""
        return {_lossy(name): _lossy(value) for name, value in self._values.items()}


def _strict(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"Invalid {what}: not valid UTF-8") from None
    return value


def _lossy(value: str) -> str:
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True)
class Sources:
    """What a target parser may read. ``path_args`` are the raw (still encoded) segments."""

    path_args: Mapping[str, str]
    query: Query
    node_tenant: str
    read_body: "Callable[[int, str], bytes] | None" = None  # (limit, too-large message)
    max_document_bytes: int = 0
    uploads: "MultipartUploads | None" = None


@dataclass(frozen=True)
class Target:
    """What a request addresses: the view stores or serves exactly this, and the hooks'
    ``ctx`` carries exactly this (``key`` is ``ctx.artifact_key``)."""

    tenant_id: str
    namespace_id: str
    key: str | None
    artifact_hash: str | None
    query: Query
    document: bytes | None = None  # keyvalue PUT: the document as stored
    upload: "Upload | None" = None  # module part/complete: the upload, None when unknown


@dataclass(frozen=True)
class KeyRead:
    key: str | None
    artifact_hash: str | None = None
    document: bytes | None = None


class TargetParser(Protocol):
    def parse(self, sources: Sources) -> Target: ...


# --- small declarative sources ------------------------------------------------------


class QueryTenant:
    """``tenant_id`` (alias ``account_handle``) from the query; required."""

    def read(self, s: Sources) -> str:
        value = s.query.get("tenant_id")
        if not value:
            raise BadRequest("Missing tenant_id")
        return validate_component(value, "tenant_id")


@dataclass(frozen=True)
class PathTenant:
    var: str = "tenant_id"

    def read(self, s: Sources) -> str:
        return validate_component(decode(s.path_args[self.var], "tenant_id"), "tenant_id")


class NodeTenant:
    """Routes that carry no tenant (Nx, Metro) are the node's own tenant, as in Kura."""

    def read(self, s: Sources) -> str:
        return s.node_tenant


@dataclass(frozen=True)
class QueryNamespace:
    """``namespace_id`` (alias ``project_handle``); absent or empty is ``default``."""

    default: str = ""

    def read(self, s: Sources) -> str:
        value = s.query.get("namespace_id")
        if not value:
            return self.default
        return validate_component(value, "namespace_id")


@dataclass(frozen=True)
class PathNamespace:
    """A namespace path segment; ``_`` is the tenant-wide namespace."""

    var: str = "namespace_id"

    def read(self, s: Sources) -> str:
        value = decode(s.path_args[self.var], "namespace_id")
        if value == TENANT_WIDE:
            return ""
        return validate_component(value, "namespace_id")


@dataclass(frozen=True)
class PathKey:
    """The key is ``prefix`` + one path segment; ``hashed``: the segment is also the hash."""

    var: str
    what: str
    prefix: str = ""
    hashed: bool = True

    def read(self, s: Sources) -> KeyRead:
        value = validate_component(decode(s.path_args[self.var], self.what), self.what)
        return KeyRead(self.prefix + value, value if self.hashed else None)


class ModuleKey:
    """Module cache: ``{cache_category}/{hash}/{name}`` from the query."""

    def read(self, s: Sources) -> KeyRead:
        hash_ = validate_component(s.query.required("hash"), "hash")
        name = validate_component(s.query.required("name"), "name")
        category = validate_component(s.query.get("cache_category") or "builds", "cache_category")
        return KeyRead(module_key(category, hash_, name), hash_)


def module_key(category: str, hash_: str, name: str) -> str:
    return f"{category}/{hash_}/{name}"


class NoKey:
    def read(self, s: Sources) -> KeyRead:
        return KeyRead(None)


class _Reads(Protocol):
    def read(self, s: Sources) -> Any: ...


@dataclass(frozen=True)
class Targets:
    """The common shape: a tenant source, a namespace source and a key source."""

    tenant: _Reads
    namespace: _Reads
    key: _Reads = field(default_factory=NoKey)

    def parse(self, s: Sources) -> Target:
        tenant = self.tenant.read(s)
        namespace = self.namespace.read(s)
        key = self.key.read(s)
        return Target(tenant, namespace, key.key, key.artifact_hash, s.query, document=key.document)


QUERY_TENANT = QueryTenant()
NODE_TENANT = NodeTenant()
QUERY_NAMESPACE = QueryNamespace()


# --- the route spec -------------------------------------------------------------------


@dataclass(frozen=True)
class RouteSpec:
    template: str
    methods: tuple[str, ...]
    operation: str
    producer: str | None
    target: TargetParser
    fast_path: bool = False
    content_type: str | None = None
    trailing_slash: bool = False

    @property
    def parts(self) -> list[str]:
        return self.template.split("/")

    @property
    def flask_rule(self) -> str:
        return "/".join(f"<raw:{p[1:-1]}>" if _is_var(p) else p for p in self.parts)

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The raw segments of the template's variables, or None if the path has another shape."""
        want = self.parts
        got = raw_path.split("/")
        if self.trailing_slash and len(got) == len(want) + 1 and got[-1] == "":
            got.pop()
        if len(got) != len(want):
            return None
        args: dict[str, str] = {}
        for pattern, segment in zip(want, got):
            if _is_var(pattern):
                if not segment:
                    return None
                args[pattern[1:-1]] = segment
            elif unquote_to_bytes(segment) != pattern.encode():
                return None
        return args

    def parse_target(self, raw_path: str, query_string: str, node_tenant: str, *,
                     read_body: "Callable[[int, str], bytes] | None" = None,
                     max_document_bytes: int = 0,
                     uploads: "MultipartUploads | None" = None) -> Target:
        """Read the request's target; ``BadRequest`` (400) / ``NotFound`` (404) if it has none."""
        args = self.match(raw_path)
        if args is None:
            raise NotFound("Not found")
        return self.target.parse(Sources(args, Query(query_string), node_tenant, read_body,
                                         max_document_bytes, uploads))

    def operation_for(self, method: str) -> str:
        return INSPECT if method == "HEAD" and self.operation == READ else self.operation


def _is_var(part: str) -> bool:
    return part.startswith("{") and part.endswith("}")


SPECS: dict[str, RouteSpec] = {}


def spec_for(endpoint: str | None) -> RouteSpec | None:
    return SPECS.get(endpoint or "")


def fast_path_specs() -> list[RouteSpec]:
    return [spec for spec in SPECS.values() if spec.fast_path]


def route(bp: Blueprint, template: str, *, methods: Iterable[str], operation: str,
          target: TargetParser, producer: str | None = None, fast_path: bool = False,
          content_type: str | None = None, trailing_slash: bool = False
          ) -> Callable[[Callable[[Target], Any]], Callable[[Target], Any]]:
    """Register ``view(target)`` on ``bp`` under the rule derived from ``template``.

    ``fast_path``: a hit may be answered by ``app.http.fast_reads`` without Flask; the
    view must then be a plain ``serve_artifact(producer, namespace, key, content_type)``.
    ``trailing_slash``: one trailing ``/`` is tolerated (stock Gradle base URLs).
    """

    def register(view: Callable[[Target], Any]) -> Callable[[Target], Any]:
        spec = RouteSpec(template, tuple(methods), operation, producer, target, fast_path,
                         content_type, trailing_slash)
        endpoint = f"{bp.name}.{view.__name__}"
        if endpoint in SPECS:
            raise RuntimeError(f"route {endpoint} declared twice")
        SPECS[endpoint] = spec

        @functools.wraps(view)
        def dispatch(**_raw_args: str) -> Any:
            return view(current_target())

        bp.add_url_rule(spec.flask_rule, endpoint=view.__name__, view_func=dispatch,
                        methods=list(methods))
        return view

    return register


# --- Flask glue -----------------------------------------------------------------------


class _RawSegment(BaseConverter):
    """Matches anything (slashes too): the spec, not Flask, decides the path's shape."""

    regex = r"[\s\S]+?"  # never empty; control characters too (the spec refuses them)
    part_isolating = False


def install(app: Flask) -> None:
    """Call before registering blueprints."""
    app.url_map.converters["raw"] = _RawSegment
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False


def raw_target(environ: Mapping[str, Any]) -> tuple[str, str]:
    """The request's path as sent (percent-encoded) and its query string.

    gunicorn passes the request-target as ``RAW_URI`` (Werkzeug's test client too); its
    path is split off the way gunicorn splits it for the fast path.
    """
    raw_uri = environ.get("RAW_URI")
    if raw_uri:
        from gunicorn.util import split_request_uri

        path = split_request_uri(raw_uri).path
    else:  # another WSGI server: PATH_INFO has lost the difference between / and %2F
        path = quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/")
    return path, environ.get("QUERY_STRING", "")


def current_target() -> Target:
    """The current request's target, parsed once per request (before the hooks run)."""
    target = g.get("kura_target")
    if target is None:
        from app.http.services import services

        spec = spec_for(request.endpoint)
        if spec is None:
            raise NotFound("Not found")
        svc = services()
        path, query_string = raw_target(request.environ)
        target = spec.parse_target(path, query_string, svc.settings.tenant_id,
                                   read_body=_read_small_body,
                                   max_document_bytes=svc.settings.max_keyvalue_bytes,
                                   uploads=svc.uploads)
        g.kura_target = target
    return target


def _read_small_body(limit: int, too_large: str) -> bytes:
    """A small request body (a document), whole, at most ``limit`` bytes."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise TooLarge(too_large)
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise TooLarge(too_large)
    if declared is not None and len(raw) != declared:
        raise BadRequest(f"Incomplete body: received {len(raw)} of {declared} bytes")
    return raw
