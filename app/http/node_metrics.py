"""Gauges read from the store at scrape time (one value per node, not per process)."""
from __future__ import annotations

import os
from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from flask import Flask
from prometheus_flask_exporter import PrometheusMetrics

from app import metrics
from app.node_state import KIND_HTTP, KIND_NAMES, KIND_REAPI, NodeState
from app.storage.store import ArtifactStore


class NodeCollector(Collector):
    def __init__(self, store: ArtifactStore, node_state: NodeState) -> None:
        self.store = store
        self.node_state = node_state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.store.stats()
        yield GaugeMetricFamily("kura_outbox_messages", "Replication messages waiting in the outbox",
                                value=stats["outbox_messages"])
        yield GaugeMetricFamily("kura_artifacts", "Artifacts stored on this node", value=stats["artifacts"])
        yield GaugeMetricFamily("kura_segments", "Segment files on this node", value=stats["segments"])
        yield GaugeMetricFamily("kura_tmp_staged_bytes", "Bytes held in the tmp staging budget",
                                value=self.store.staging.used_bytes())
        inflight = GaugeMetricFamily("kura_inflight_requests", "Requests in flight", labels=["transport"])
        inflight.add_metric(["http"], self.node_state.inflight(KIND_HTTP))
        inflight.add_metric(["grpc"], self.node_state.inflight(KIND_REAPI))
        yield inflight
        yield GaugeMetricFamily("kura_draining", "1 while the node drains",
                                value=1 if self.node_state.draining else 0)
        rss = GaugeMetricFamily("kura_process_resident_memory_bytes",
                                "Resident memory of each process of the node", labels=["role", "pid"])
        for pid, kind in self.node_state.processes():
            value = _resident_bytes(pid)
            if value is not None:
                rss.add_metric([KIND_NAMES.get(kind, "other"), str(pid)], value)
        yield rss


def _resident_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _Delegate(Collector):
    """Exposes the default in-process registry (single-process runs and tests)."""

    def collect(self) -> Iterator[object]:
        from prometheus_client import REGISTRY

        return REGISTRY.collect()


def install(app: Flask, store: ArtifactStore, node_state: NodeState) -> None:
    registry = metrics.scrape_registry()
    if registry is metrics.default_registry():
        registry = CollectorRegistry()
        registry.register(_Delegate())
    registry.register(NodeCollector(store, node_state))
    PrometheusMetrics(app, path="/metrics", registry=registry, export_defaults=False)
