"""Per-request bookkeeping shared by every route: draining, in-flight count, metrics."""
from __future__ import annotations

import time

from flask import Flask, Response, g, request

from app import metrics
from app.errors import Draining
from app.http import hooks
from app.http.probes import PROBE_ENDPOINTS
from app.http.route_table import template_for
from app.http.services import services


def _route() -> str:
    rule = request.url_rule
    return template_for(request.endpoint, rule.rule if rule is not None else None)


def _before() -> None:
    g.kura_started = time.perf_counter()
    if request.endpoint in PROBE_ENDPOINTS:
        return
    node = services()
    if node.node_state.draining:
        raise Draining()
    node.node_state.add_inflight(1)
    g.kura_inflight = True
    if node.extensions is not None:
        hooks.authorize_request(node.extensions)


def _after(response: Response) -> Response:
    extensions = services().extensions
    if extensions is not None:
        hooks.add_response_headers(extensions, response)
    route = _route()
    metrics.HTTP_REQUESTS.labels(route, str(response.status_code)).inc()
    started = g.get("kura_started")
    if started is not None:
        metrics.HTTP_DURATION.labels(route).observe(time.perf_counter() - started)
    return response


def _teardown(_exc: BaseException | None) -> None:
    if g.pop("kura_inflight", False):
        services().node_state.add_inflight(-1)


def install(app: Flask) -> None:
    app.before_request(_before)
    app.after_request(_after)
    app.teardown_request(_teardown)
