"""Liveness, readiness, rollout status and the node's aggregated metrics."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from app.http.services import services
from app.node_state import KIND_HTTP, KIND_REAPI
from app.replication.membership import read_members

bp = Blueprint("probes", __name__)
PROBE_ENDPOINTS = frozenset({"probes.up", "probes.ready", "probes.rollout", "prometheus_metrics"})


def _state() -> str:
    node = services().node_state
    if node.draining:
        return "draining"
    return "serving" if node.get("ready") else "joining"


def _rollout() -> dict:
    svc = services()
    node = svc.node_state
    peers = read_members(svc.settings.data_dir)
    state = _state()
    return {
        "generation": node.get("generation"),
        "ready": state == "serving",
        "state": state,
        "tenant_id": svc.settings.tenant_id,
        "region": svc.settings.region,
        "node_url": svc.settings.resolved_node_url,
        "ring_members": sorted({svc.settings.resolved_node_url, *peers}),
        "outbox_messages": svc.store.outbox.depth(),
        "bootstrap_known_peers": node.get("bootstrap_known"),
        "bootstrap_completed_peers": node.get("bootstrap_completed"),
        "bootstrap_inflight_peers": node.get("bootstrap_inflight"),
        "http_inflight_requests": node.inflight(KIND_HTTP),
        "grpc_inflight_requests": node.inflight(KIND_REAPI),
    }


@bp.get("/up")
def up() -> Response:
    svc = services()
    return jsonify({
        "status": "ok",
        "tenant_id": svc.settings.tenant_id,
        "region": svc.settings.region,
        "node_url": svc.settings.resolved_node_url,
        "generation": svc.node_state.get("generation"),
        "members": sorted({svc.settings.resolved_node_url, *read_members(svc.settings.data_dir)}),
    })


@bp.get("/ready")
def ready() -> Response:
    doc = _rollout()
    response = jsonify(doc)
    response.status_code = 200 if doc["ready"] else 503
    return response


@bp.get("/status/rollout")
def rollout() -> Response:
    return jsonify(_rollout())
