"""``/metrics``: every process's samples plus the node-wide gauges, in Kura's shape.

The node-wide gauges are read at scrape time from the store, the shared node state and
``/proc`` (one value per node, not per process): outbox depth, readiness, in-flight
requests, staging, multipart uploads, memory, disk. The exposition is always the Prometheus
text format 0.0.4 (in OpenMetrics a family named ``kura_x_total`` would claim the counter
``kura_x``'s own ``kura_x_total`` samples), and every ``kura_*`` counter appears twice: under its
name (``kura_http_requests_total``, what Kura's Grafana dashboard queries) and under the
name Kura's own scrapes produce (``kura_http_requests_total_total``: Kura's Rust client
appends ``_total`` to counter names that already end in it, and Tuist's alert rules and
e2e checks query those). So both a Kura dashboard and Kura's alerts work unchanged.
"""
from __future__ import annotations

import os
from importlib import metadata
from typing import Iterable, Iterator, NamedTuple

from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_flask_exporter import PrometheusMetrics

from app import metrics
from app.node_state import KIND_HTTP, KIND_NAMES, KIND_REAPI, NodeState
from app.replication.pacing import effective_limit
from app.storage.store import ArtifactStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # whatever Accept asks for


def _version() -> str:
    try:
        return metadata.version("kura-py")
    except metadata.PackageNotFoundError:
        return "unknown"


class NodeCollector(Collector):
    def __init__(self, store: ArtifactStore, node_state: NodeState) -> None:
        self.store = store
        self.node_state = node_state
        self.version = _version()
        self.capacity_bytes = store.settings.resolved_capacity_bytes()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        settings = self.store.settings
        stats = self.store.stats()
        node = self.node_state
        info = GaugeMetricFamily("kura_node_info", "This node's identity (always 1)",
                                 labels=["region", "tenant_id", "node_url", "version"])
        info.add_metric([settings.region, settings.tenant_id, settings.resolved_node_url, self.version], 1)
        yield info
        for name, help_text, value in (
            ("kura_process_start_time_seconds", "Unix time the node (its gunicorn master) started",
             node.get("started_ms") / 1000),
            ("kura_outbox_messages", "Replication messages waiting in the outbox", stats["outbox_messages"]),
            ("kura_outbox_capacity", "KURA_OUTBOX_MAX_DEPTH: writes are refused with 429 past it",
             settings.outbox_max_depth),
            ("kura_artifacts", "Artifacts stored on this node", stats["artifacts"]),
            ("kura_segments", "Segment files on this node", stats["segments"]),
            ("kura_multipart_uploads", "Multipart uploads started and not yet completed or expired",
             stats["multipart_uploads"]),
            ("kura_tmp_dir_bytes", "Bytes held in the KURA_TMP_DIR staging budget",
             self.store.staging.used_bytes()),
            ("kura_http_inflight_requests", "Public HTTP requests in flight (probes excepted)",
             node.inflight(KIND_HTTP)),
            ("kura_grpc_inflight_requests", "gRPC calls in flight", node.inflight(KIND_REAPI)),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        yield from self._disk()
        yield from self._memory()
        yield from self._mesh()

    def _disk(self) -> Iterator[GaugeMetricFamily]:
        """The data directory's filesystem and the capacity the node evicts down to."""
        try:
            stats = os.statvfs(self.store.settings.data_dir)
        except OSError:
            return
        for name, help_text, value in (
            ("kura_data_filesystem_size_bytes", "Size of the data directory's filesystem",
             stats.f_blocks * stats.f_frsize),
            ("kura_data_filesystem_free_bytes", "Free bytes of the data directory's filesystem "
             "(available to the node)", stats.f_bavail * stats.f_frsize),
            ("kura_cas_capacity_bytes", "KURA_CAS_CAPACITY_BYTES as resolved: segments are evicted "
             "past it", self.capacity_bytes),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)

    def _memory(self) -> Iterator[GaugeMetricFamily]:
        """Kura's process gauges for the node as a whole (all its processes), and each
        process's resident memory by role."""
        node = self.node_state
        processes = [(pid, KIND_NAMES.get(kind, "other")) for pid, kind in node.processes()]
        master = node.get("master_pid")
        if master:
            processes.append((master, "master"))
        by_process = GaugeMetricFamily("kura_node_process_resident_memory_bytes",
                                       "Resident memory of each process of the node by role",
                                       labels=["role", "pid"])
        totals = _Memory(0, 0, 0)
        for pid, role in processes:
            sizes = _memory_bytes(pid)
            if sizes is None:
                continue
            by_process.add_metric([role, str(pid)], sizes.resident)
            totals = _Memory(*(a + b for a, b in zip(totals, sizes)))
        for name, help_text, value in (
            ("kura_process_resident_memory_bytes", "Resident memory of the node (every process of it)",
             totals.resident),
            ("kura_process_resident_anon_bytes", "Anonymous resident memory of the node (every process "
             "of it)", totals.resident - totals.file),
            ("kura_process_resident_file_bytes", "File-backed and shared resident memory of the node "
             "(every process of it; LMDB and segment pages mapped by it)", totals.file),
            ("kura_process_virtual_memory_bytes", "Virtual memory of the node (every process of it)",
             totals.virtual),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        yield by_process

    def _mesh(self) -> Iterator[GaugeMetricFamily]:
        """Readiness, drain and membership gauges with Kura's names (one value per node)."""
        node = self.node_state
        draining = node.draining
        serving = bool(node.get("ready"))
        writer_lock = bool(node.get("writer_lock"))
        ready = serving and writer_lock and not draining
        traffic = 2 if draining else (1 if serving else 0)
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


class _Memory(NamedTuple):
    virtual: int
    resident: int
    file: int  # resident pages backed by a file or shared memory (statm's "shared")


def _memory_bytes(pid: int) -> _Memory | None:
    """A process's memory in bytes, None once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            pages = [int(field) for field in fh.read().split()[:3]]
    except (OSError, ValueError):
        return None
    if len(pages) < 3:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    return _Memory(*(count * page for count in pages))


class KuraCounterNames(Collector):
    """Every ``kura_*`` counter of ``source`` under both of its names (module docstring);
    only the samples named in ``names`` when it is given (``/metrics?name[]=...``)."""

    def __init__(self, source: Iterable[Collector], names: Iterable[str] = ()) -> None:
        self.source = source
        self.names = frozenset(names)

    def collect(self) -> Iterator[Metric]:
        for collector in self.source:
            for metric in collector.collect():
                found = [metric]
                if metric.type == "counter" and metric.name.startswith("kura_"):
                    found.append(_doubled(metric))
                for family in found:
                    if self.names:
                        family.samples = [s for s in family.samples if s.name in self.names]
                    if family.samples or not self.names:
                        yield family


def _doubled(counter: Metric) -> Metric:
    alias = Metric(counter.name + "_total", counter.documentation, "counter")
    sample_name = counter.name + "_total"
    alias.samples = [sample._replace(name=sample_name + "_total")
                     for sample in counter.samples if sample.name == sample_name]
    return alias


class _Delegate(Collector):
    """Exposes the default in-process registry (single-process runs and tests)."""

    def collect(self) -> Iterator[Metric]:
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
        processes = metrics.scrape_registry()
        if processes is metrics.default_registry():
            processes = _Delegate()
        registry = CollectorRegistry()
        registry.register(KuraCounterNames([processes, self._node_collector], names or ()))
        return generate_latest(registry).decode("utf-8"), CONTENT_TYPE


def install(app: Flask, store: ArtifactStore, node_state: NodeState) -> None:
    NodeMetricsExporter(app, NodeCollector(store, node_state))
