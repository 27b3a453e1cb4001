"""Liveness, readiness and rollout status (Kura's probe documents) and the node's metrics.

The replicator decides readiness (``app.replication.readiness``) and publishes the mesh
view; these routes combine it with what this process sees live (draining, in-flight
counts, the writer lock, the REAPI processes serving) so the bodies match Kura's and its
rollout gate and dashboards work unchanged.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from app.http.services import services
from app.node_state import KIND_HTTP, KIND_REAPI
from app.replication.readiness import read_snapshot, reasons

bp = Blueprint("probes", __name__)
PROBE_ENDPOINTS = frozenset({"probes.up", "probes.ready", "probes.rollout", "prometheus_metrics"})

STATE_JOINING = "joining"
STATE_SERVING = "serving"
STATE_DRAINING = "draining"


def _view() -> dict[str, Any]:
    """The facts every probe document is made of, read once per request."""
    svc = services()
    node = svc.node_state
    snapshot = read_snapshot(svc.settings.resolved_run_dir)
    draining = node.draining
    writer_lock = bool(node.get("writer_lock"))
    serving = bool(node.get("ready"))
    reapi_serving = (node.serving(KIND_REAPI), svc.settings.resolved_grpc_workers)
    ready = serving and writer_lock and not draining and reapi_serving[0] >= reapi_serving[1]
    state = STATE_DRAINING if draining else (STATE_SERVING if serving else STATE_JOINING)
    return {
        "snapshot": snapshot, "draining": draining, "writer_lock": writer_lock, "ready": ready,
        "state": state, "generation": node.get("generation"),
        "known": list(snapshot.get("known_peers", [])),
        "reasons": reasons(snapshot, draining=draining, writer_lock=writer_lock, serving=serving,
                           reapi_serving=reapi_serving),
        "http_inflight": node.inflight(KIND_HTTP), "grpc_inflight": node.inflight(KIND_REAPI),
    }


@bp.get("/up")
def up() -> Response:
    svc = services()
    view = _view()
    own = svc.settings.resolved_node_url
    nodes = sorted({own, *view["known"]})
    regions = view["snapshot"].get("regions", {})
    return jsonify({
        "status": "ok",
        "generation": view["generation"],
        "tenant_id": svc.settings.tenant_id,
        "region": svc.settings.region,
        "node": svc.settings.region,  # Kura reports the region here
        "node_url": own,
        "connected_nodes": sorted(view["known"]),
        "ring_members": len(nodes),
        "members": nodes,
        "regions": sorted({svc.settings.region, *regions.values()} - {""}),
        "nodes": nodes,
    })


def _bootstrap_fields(view: dict[str, Any]) -> dict[str, Any]:
    snapshot = view["snapshot"]
    return {
        "initial_discovery_completed": bool(snapshot.get("initial_discovery_completed")),
        "writer_lock_owned": view["writer_lock"],
        "http_inflight_requests": view["http_inflight"],
        "grpc_inflight_requests": view["grpc_inflight"],
        "bootstrap_progress": snapshot.get("bootstrap_progress", []),
    }


@bp.get("/ready")
def ready() -> Response:
    view = _view()
    snapshot = view["snapshot"]
    doc = {
        "status": "ok" if view["ready"] else "not_ready",
        "generation": view["generation"],
        "state": view["state"],
        "ready": view["ready"],
        "draining": view["draining"],
        "known_peers": view["known"],
        "bootstrapped_peers": list(snapshot.get("bootstrapped_peers", [])),
        "bootstrap_inflight_peers": list(snapshot.get("bootstrap_inflight_peers", [])),
        "reasons": view["reasons"],
        **_bootstrap_fields(view),
    }
    response = jsonify(doc)
    response.status_code = 200 if view["ready"] else 503
    return response


@bp.get("/status/rollout")
def rollout() -> Response:
    svc = services()
    view = _view()
    snapshot = view["snapshot"]
    return jsonify({
        "generation": view["generation"],
        "ready": view["ready"],
        "state": view["state"],
        "tenant_id": svc.settings.tenant_id,
        "region": svc.settings.region,
        "node_url": svc.settings.resolved_node_url,
        "ring_members": len(view["known"]) + 1,
        "bootstrap_known_peers": len(view["known"]),
        "bootstrap_completed_peers": len(snapshot.get("bootstrapped_peers", [])),
        "bootstrap_inflight_peers": len(snapshot.get("bootstrap_inflight_peers", [])),
        "outbox_messages": svc.store.outbox.depth(),
        "reasons": view["reasons"],
        **_bootstrap_fields(view),
    })
