"""The operator's Lua hooks (``app.extensions``) on every public HTTP route.

Runs ``authenticate`` + ``authorize`` before the view (a denial becomes the hook's
status with the JSON error shape) and merges ``response_headers`` into the answer.
Probes, ``/metrics`` and unmatched paths are never hooked; ``/_internal/*`` is not
served on this port at all.
"""
from __future__ import annotations

from flask import Response, g, request

from app.extensions import Extensions, HookContext
from app.http import params
from app.http.route_table import INSPECT, READ, ROUTES
from app.http.services import services


def _context(extensions_tenant: str) -> HookContext | None:
    info = ROUTES.get(request.endpoint or "")
    if info is None:
        return None
    view_args = request.view_args or {}
    operation = info.operation
    if request.method == "HEAD" and operation == READ:
        operation = INSPECT
    tenant = view_args.get("tenant") or params.tenant_id(required=False)
    if "namespace" in view_args:
        namespace = params.path_namespace(view_args["namespace"])
    else:
        namespace = params.namespace_id(info.default_namespace)
    artifact_hash = view_args.get("hash_") or request.args.get("hash")
    artifact_key = (view_args.get("cas_id") or view_args.get("cache_key") or view_args.get("hash_")
                    or request.args.get("name"))
    return HookContext(
        transport="http", route=info.template, method=request.method, operation=operation,
        server_tenant_id=extensions_tenant, tenant_id=tenant or None, namespace_id=namespace or None,
        producer=info.producer, artifact_key=artifact_key, artifact_hash=artifact_hash,
        headers={name.lower(): value for name, value in request.headers.items()},
        query=request.args.to_dict(flat=True))


def authorize_request(extensions: Extensions) -> None:
    """Before the view: raise the hook's denial, or remember the principal."""
    ctx = _context(services().settings.tenant_id)
    if ctx is None:
        return
    g.kura_hook_ctx = ctx
    g.kura_principal = None
    g.kura_principal = extensions.check(ctx)


def add_response_headers(extensions: Extensions, response: Response) -> None:
    ctx = g.get("kura_hook_ctx")
    if ctx is None:
        return
    for name, value in extensions.response_headers(ctx, g.get("kura_principal"),
                                                   response.status_code).items():
        response.headers[name] = value
