"""Every public HTTP route, declared once, next to its view.

``@route(bp, "/api/cache/cas/{id}", methods=["GET"], operation=READ, producer="xcode",
target=Targets(QUERY_TENANT, QUERY_NAMESPACE, PathKey("id", "CAS id", prefix="blob/")))``
registers the Flask rule and the route's ``RouteSpec`` together. The spec is the only
statement of the route's facts:

- its Kura template (``ctx.route`` for the hooks, the ``route`` label of the metrics);
- its operation and producer (the hooks' ``ctx.operation`` / ``ctx.producer``);
- how its target (tenant, namespace, storage key, hash) is read (``app.http.targets``):
  ``RouteSpec.parse_target`` works on the raw path and query string, and serves the
  blueprint and the download fast path alike.

The Flask rule is derived from the template with a converter that accepts anything, so
Flask only dispatches (and answers 405 with ``Allow``); whether the path fits the template
is decided here, segment by segment on the raw path. A key with an encoded slash
(``%2F``) is therefore refused with 400, a literal extra segment is 404, and no artifact
route ever redirects (Werkzeug's slash merging is off: artifact keys are not file paths).
The one exception is a variable at the root (Bazel's ``/{namespace_id}/cas/{hash}``): it
matches one decoded segment, so an encoded slash there is a path of another shape (404).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping
from urllib.parse import quote, unquote_to_bytes

from flask import Blueprint, Flask, g, request
from gunicorn.util import split_request_uri
from werkzeug.routing import BaseConverter

from app.errors import NotFound
from app.http.artifacts import serve_artifact
from app.http.bodies import read_document
from app.http.services import services
from app.http.targets import Query, Sources, Target, TargetParser

if TYPE_CHECKING:
    from app.storage.multipart import MultipartUploads

READ = "artifact.read"
WRITE = "artifact.write"
INSPECT = "artifact.inspect"
NAMESPACE_DELETE = "namespace.delete"

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

    @functools.cached_property
    def _segments(self) -> tuple[tuple[str | None, str, bytes], ...]:
        """Per template segment: the variable's name (None for a literal), the literal and
        its bytes; worked out once, ``match`` runs on every request."""
        return tuple((p[1:-1] if _is_var(p) else None, p, p.encode()) for p in self.parts)

    @property
    def flask_rule(self) -> str:
        # A variable right at the root matches one decoded segment only: matching anything,
        # it would claim paths of other routes, and Werkzeug would dispatch ``PUT
        # /api/cache/cas/x`` to ``/{namespace_id}/cas/{hash}`` instead of answering 405.
        return "/".join((f"<segment:{p[1:-1]}>" if i == 1 else f"<raw:{p[1:-1]}>") if _is_var(p) else p
                        for i, p in enumerate(self.parts))

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The raw segments of the template's variables, or None if the path has another shape."""
        want = self._segments
        got = raw_path.split("/")
        if self.trailing_slash and len(got) == len(want) + 1 and got[-1] == "":
            got.pop()
        if len(got) != len(want):
            return None
        args: dict[str, str] = {}
        for (name, literal, literal_bytes), segment in zip(want, got):
            if name is not None:
                if not segment:
                    return None
                args[name] = segment
            elif segment != literal and ("%" not in segment
                                         or unquote_to_bytes(segment) != literal_bytes):
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


View = Callable[[Target], Any]


def route(bp: Blueprint, template: str, *, methods: Iterable[str], operation: str,
          target: TargetParser, producer: str | None = None, name: str | None = None,
          trailing_slash: bool = False) -> Callable[[View], View]:
    """Register ``view(target)`` on ``bp`` under the rule derived from ``template``.

    ``name``: the endpoint name (default: the view's), so one view can serve two rules.
    ``trailing_slash``: one trailing ``/`` is tolerated (stock Gradle base URLs).
    """

    def register(view: View) -> View:
        _register(bp, name or view.__name__, view,
                  RouteSpec(template, tuple(methods), operation, producer, target,
                            trailing_slash=trailing_slash))
        return view

    return register


def download(bp: Blueprint, template: str, *, producer: str, target: TargetParser, name: str = "get",
             not_found: str = "Artifact not found", content_type: str | None = None,
             trailing_slash: bool = False) -> None:
    """A plain artifact download (GET/HEAD): look the target up and serve it, or 404.

    Only these routes are on the fast path (``app.http.fast_reads``), which answers a hit
    the same way without Flask; ``content_type`` overrides the stored one.
    """

    def serve(target: Target) -> Any:
        return serve_artifact(producer, target.namespace_id, target.key or "", not_found,
                              content_type=content_type)

    _register(bp, name, serve, RouteSpec(template, ("GET",), READ, producer, target, fast_path=True,
                                         content_type=content_type, trailing_slash=trailing_slash))



def _register(bp: Blueprint, name: str, view: View, spec: RouteSpec) -> None:
    endpoint = f"{bp.name}.{name}"
    if endpoint in SPECS:
        raise RuntimeError(f"route {endpoint} declared twice")
    SPECS[endpoint] = spec

    @functools.wraps(view)
    def dispatch(**_raw_args: str) -> Any:
        return view(current_target())

    # No automatic OPTIONS answer: every method that reaches a view is a declared one
    # (OPTIONS gets 405 with ``Allow``, as in Kura).
    bp.add_url_rule(spec.flask_rule, endpoint=name, view_func=dispatch, methods=list(spec.methods),
                    provide_automatic_options=False)


# --- Flask glue -----------------------------------------------------------------------


class _RawSegment(BaseConverter):
    """Matches anything (slashes too): the spec, not Flask, decides the path's shape."""

    regex = r"[\s\S]+?"  # never empty; control characters too (the spec refuses them)
    part_isolating = False


class _RootSegment(BaseConverter):
    """One decoded path segment (see ``RouteSpec.flask_rule``)."""

    regex = r"[^/]+"


def install(app: Flask) -> None:
    """Call before registering blueprints."""
    app.url_map.converters["raw"] = _RawSegment
    app.url_map.converters["segment"] = _RootSegment
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False


def raw_target(environ: Mapping[str, Any]) -> tuple[str, str]:
    """The request's path as sent (percent-encoded) and its query string.

    gunicorn passes the request-target as ``RAW_URI`` (Werkzeug's test client too); its
    path is split off the way gunicorn splits it for the fast path.
    """
    raw_uri = environ.get("RAW_URI")
    if raw_uri:
        path = split_request_uri(raw_uri).path
    else:  # another WSGI server: PATH_INFO has lost the difference between / and %2F
        path = quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/")
    return path, environ.get("QUERY_STRING", "")


def current_target() -> Target:
    """The current request's target, parsed once per request (before the hooks run)."""
    target = g.get("kura_target")
    if target is None:
        spec = spec_for(request.endpoint)
        if spec is None:
            raise NotFound("Not found")
        svc = services()
        path, query_string = raw_target(request.environ)
        target = spec.parse_target(path, query_string, svc.settings.tenant_id,
                                   read_body=read_document,
                                   max_document_bytes=svc.settings.max_keyvalue_bytes,
                                   uploads=svc.uploads)
        g.kura_target = target
    return target

