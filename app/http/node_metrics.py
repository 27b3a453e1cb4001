"""Gauges read from the store at scrape time (one value per node, not per process)."""
from __future__ import annotations

import os
from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from flask import Flask
from prometheus_flask_exporter import PrometheusMetrics

from app import metrics
from app.node_state import KIND_HTTP, KIND_NAMES, KIND_REAPI, NodeState
from app.replication.pacing import effective_limit
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
        yield from self._mesh()
        rss = GaugeMetricFamily("kura_process_resident_memory_bytes",
                                "Resident memory of each process of the node", labels=["role", "pid"])
        for pid, kind in self.node_state.processes():
            value = _resident_bytes(pid)
            if value is not None:
                rss.add_metric([KIND_NAMES.get(kind, "other"), str(pid)], value)
        yield rss


    def _mesh(self) -> Iterator[GaugeMetricFamily]:
        """Readiness, drain and membership gauges with Kura's names (one value per node)."""
        node = self.node_state
        draining = node.draining
        serving = bool(node.get("ready"))
        writer_lock = bool(node.get("writer_lock"))
        ready = serving and writer_lock and not draining
        traffic = 2 if draining else (1 if serving else 0)
        settings = self.store.settings
        info = GaugeMetricFamily("kura_node_info", "This node's identity", labels=["region", "tenant_id"])
        info.add_metric([settings.region, settings.tenant_id], 1)
        yield info
        for name, help_text, value in (
            ("kura_ready_state", "1 when /ready answers 200", int(ready)),
            ("kura_drain_state", "1 while the node drains", int(draining)),
            ("kura_traffic_state", "0 joining, 1 serving, 2 draining", traffic),
            ("kura_writer_lock_owned", "1 while this node holds its data directory's lock", int(writer_lock)),
            ("kura_initial_discovery_completed", "1 once the first discovery round answered",
             node.get("discovery_done")),
            ("kura_membership_generation", "Membership generation (bumped by topology changes)",
             node.get("generation")),
            ("kura_discovered_peer_nodes", "Peers admitted by membership", node.get("members")),
            ("kura_bootstrap_known_peers", "Known peers", node.get("bootstrap_known")),
            ("kura_bootstrap_completed_peers", "Peers with a clean bootstrap pass",
             node.get("bootstrap_completed")),
            ("kura_bootstrap_inflight_peers", "Peers being bootstrapped from now",
             node.get("bootstrap_inflight")),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        yield from self._bandwidth()

    def _bandwidth(self) -> Iterator[GaugeMetricFamily]:
        """Peer-traffic pacing as the replicator computes it (``app.replication.pacing``)."""
        settings = self.store.settings
        node = self.node_state
        inflight = node.public_inflight()
        latency_ms = node.public_latency_ewma_ms()
        configured = settings.replication_bandwidth_limit_bytes_per_second
        target = settings.replication_public_latency_target_ms
        for name, help_text, value in (
            ("kura_replication_bandwidth_configured_limit_bytes_per_second",
             "KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND (0: unpaced)", configured),
            ("kura_replication_bandwidth_effective_limit_bytes_per_second",
             "What peer traffic may use now, public load considered (0: unpaced)",
             effective_limit(configured, inflight, latency_ms, target)),
            ("kura_replication_bandwidth_public_latency_target_ms",
             "KURA_REPLICATION_PUBLIC_LATENCY_TARGET_MS", target),
            ("kura_public_request_latency_ewma_ms",
             "Public request latency EWMA (slowest recent process of the node)", latency_ms),
            ("kura_public_http_inflight_requests", "Public HTTP requests in flight",
             node.inflight(KIND_HTTP)),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)


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


class NodeMetricsExporter(PrometheusMetrics):
    """prometheus-flask-exporter's /metrics endpoint, serving every process's metrics plus the
    node-wide gauges. The stock exporter builds a fresh registry per scrape in multiprocess
    mode and silently drops custom collectors (so the gauges vanished on a real node); here
    each scrape reads the multiprocess files and asks ``NodeCollector`` as well."""

    def __init__(self, app: Flask, collector: NodeCollector) -> None:
        self._node_collector = collector
        super().__init__(app, path="/metrics", registry=CollectorRegistry(), export_defaults=False)

    def generate_metrics(self, accept_header: str | None = None, names: list[str] | None = None
                         ) -> tuple[str, str]:
        registry = metrics.scrape_registry()
        if registry is metrics.default_registry():
            registry = CollectorRegistry()
            registry.register(_Delegate())
        registry.register(self._node_collector)
        if names:
            registry = registry.restricted_registry(names)
        generate_latest, content_type = choose_encoder(accept_header)
        return generate_latest(registry).decode("utf-8"), content_type


def install(app: Flask, store: ArtifactStore, node_state: NodeState) -> None:
    NodeMetricsExporter(app, NodeCollector(store, node_state))
