"""Per-request bookkeeping shared by every route: draining, in-flight count, the target,
the hooks, the metrics and the trace span (``app.tracing``; probes have none)."""
from __future__ import annotations

import time

from flask import Flask, Response, g, request

from app import metrics, tracing
from app.errors import Draining
from app.http import hooks, routes
from app.http.probes import PROBE_ENDPOINTS
from app.http.services import services


def _route() -> str:
    """The ``route`` label: the declared Kura template; a probe's rule; else ``/_unmatched``."""
    spec = routes.spec_for(request.endpoint)
    if spec is not None:
        return spec.template
    rule = request.url_rule
    return rule.rule if rule is not None else metrics.UNMATCHED_ROUTE


def _before() -> None:
    g.kura_started = time.perf_counter()
    if request.endpoint in PROBE_ENDPOINTS:
        return
    if tracing.TRACER is not None:
        tracing.begin_flask_request(_route())
    node = services()
    if node.node_state.draining:
        raise Draining()
    node.node_state.add_inflight(1)
    g.kura_inflight = True
    spec = routes.spec_for(request.endpoint)
    if spec is None:
        # With hooks on, an undeclared endpoint is refused (fail closed). When no rule
        # matched at all, Flask answers 404/405 and no view runs.
        if node.extensions is not None and request.endpoint is not None:
            hooks.refuse_undeclared()
        return
    # Parsed before the hooks: a request without a valid target is a 400 for everyone.
    target = routes.current_target()
    if node.extensions is not None:
        hooks.authorize_request(node.extensions, spec, target, node.settings.tenant_id)


def _after(response: Response) -> Response:
    extensions = services().extensions
    if extensions is not None:
        hooks.add_response_headers(extensions, response)
    route = _route()
    started = g.get("kura_started")
    # Public requests only (not probes): the latency histogram and bandwidth pacing.
    public = started is not None and g.get("kura_inflight") and route != metrics.UNMATCHED_ROUTE
    elapsed = time.perf_counter() - started if public else None
    metrics.record_http(route, response.status_code, elapsed)
    if elapsed is not None:
        services().node_state.note_latency(elapsed)
    if tracing.TRACER is not None:
        tracing.note_flask_response(response)
    return response


def _teardown(_exc: BaseException | None) -> None:
    if g.pop("kura_inflight", False):
        services().node_state.add_inflight(-1)
    if tracing.TRACER is not None:
        tracing.end_flask_request(_exc)


def install(app: Flask) -> None:
    app.before_request(_before)
    app.after_request(_after)
    app.teardown_request(_teardown)
