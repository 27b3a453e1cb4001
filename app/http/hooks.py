"""The operator's Lua hooks (``app.extensions``) on every public HTTP route.

``ctx`` is built from the route's declaration (``app.http.routes``) and the target the
view will serve or store, parsed once: the hooks see exactly what the server does.
``authenticate`` + ``authorize`` run before the view (a denial becomes the hook's status
with the JSON error shape) and ``response_headers`` is merged into the answer.

Fail closed: with hooks enabled, a matched endpoint that is not a probe and has no
route declaration is refused with 403 ``Forbidden`` (``refuse_undeclared``); a path no
rule matches reaches no view and gets Flask's 404/405. Probes and ``/metrics`` are never
hooked; ``/_internal/*`` is not served on this port at all.
"""
from __future__ import annotations

from flask import Response, g, request

from app.errors import Forbidden
from app.extensions import Extensions, HookContext
from app.http.routes import RouteSpec
from app.http.targets import Target


def context(spec: RouteSpec, target: Target, method: str, server_tenant_id: str,
            headers: dict[str, str]) -> HookContext:
    return HookContext(
        transport="http", route=spec.template, method=method, operation=spec.operation_for(method),
        server_tenant_id=server_tenant_id, tenant_id=target.tenant_id or None,
        namespace_id=target.namespace_id or None, producer=spec.producer,
        artifact_key=target.key, artifact_hash=target.artifact_hash,
        headers={name.lower(): value for name, value in headers.items()},
        query=target.query.to_dict())


def authorize_request(extensions: Extensions, spec: RouteSpec, target: Target,
                      server_tenant_id: str) -> None:
    """Before the view: raise the hook's denial, or remember the principal."""
    ctx = context(spec, target, request.method, server_tenant_id, dict(request.headers.items()))
    g.kura_hook_ctx = ctx
    g.kura_principal = None
    g.kura_principal = extensions.check(ctx)


def refuse_undeclared() -> None:
    raise Forbidden("Forbidden")


def add_response_headers(extensions: Extensions, response: Response) -> None:
    ctx = g.get("kura_hook_ctx")
    if ctx is None:
        return
    for name, value in extensions.response_headers(ctx, g.get("kura_principal"),
                                                   response.status_code).items():
        response.headers[name] = value
