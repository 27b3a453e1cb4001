"""The node's Prometheus metrics, with Kura's names.

Every process of a node (HTTP workers, the REAPI process, the replicator)
records into the multiprocess directory named by ``PROMETHEUS_MULTIPROC_DIR``
(set by the gunicorn master before any child starts: ``prometheus/`` in the node's
per-run directory on a memory filesystem, see ``app.run_dir``); ``/metrics``
aggregates them. Those files are memory-mapped: ``app.metric_files`` makes them
reserve every page before touching it. Without that variable (unit tests) the
default in-process registry is used.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app import metric_files

metric_files.install()  # before the first sample below is created

HTTP_REQUESTS = Counter(
    "kura_http_requests_total", "HTTP requests by route template and status",
    ["route", "status"])
HTTP_DURATION = Histogram(
    "kura_http_request_duration_seconds", "HTTP request latency by route template",
    ["route"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
ARTIFACT_READS = Counter(
    "kura_artifact_reads_total", "Artifact reads by producer and result (hit, miss, error)",
    ["producer", "result"])
ARTIFACT_WRITES = Counter(
    "kura_artifact_writes_total", "Artifact writes by producer and result (created, updated, exists, "
    "rejected, error)", ["producer", "result"])
ARTIFACT_READ_BYTES = Counter(
    "kura_artifact_read_bytes_total", "Artifact body bytes served", ["producer"])
ARTIFACT_WRITE_BYTES = Counter(
    "kura_artifact_write_bytes_total", "Artifact body bytes stored", ["producer"])
SERVING_PATHS = Counter(
    "kura_artifact_serving_paths_total",
    "How each download was served: sendfile (zero-copy from the segment), pread (small body read "
    "whole), inline (from LMDB), read (segment reads where sendfile cannot go: HTTP/2, TLS), "
    "copy (user-space fallback)", ["path"])
SEGMENTS_CREATED = Counter("kura_segments_created_total", "Segment files created")
SEGMENT_ROTATIONS = Counter("kura_segment_rotations_total", "Active segments sealed and rotated")
EVICTED_SEGMENTS = Counter("kura_eviction_segments_total", "Segments evicted (unlinked) for capacity")
EVICTED_BYTES = Counter("kura_eviction_bytes_total", "Segment bytes reclaimed by eviction")
EVICTED_ARTIFACTS = Counter("kura_eviction_artifacts_total", "Artifacts dropped by eviction")
COPIED_FORWARD = Counter(
    "kura_eviction_copied_forward_total", "Recently read artifacts copied out of a segment before "
    "it was evicted")
BACKPRESSURE = Counter(
    "kura_backpressure_rejections_total", "Writes rejected with 429 / RESOURCE_EXHAUSTED by budget",
    ["budget"])
MULTIPART_EXPIRED = Counter(
    "kura_multipart_uploads_expired_total", "Abandoned multipart uploads removed by the janitor")


GRPC_REQUESTS = Counter(
    "kura_grpc_requests_total", "gRPC calls by full method name and status code", ["method", "code"])
GRPC_DURATION = Histogram(
    "kura_grpc_request_duration_seconds", "gRPC call latency by method", ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def default_registry() -> CollectorRegistry:
    from prometheus_client import REGISTRY

    return REGISTRY


def scrape_registry() -> CollectorRegistry:
    """A registry that reads every process's metrics (multiprocess mode) or this one's."""
    from prometheus_client import multiprocess

    path = multiprocess_dir()
    if not path:
        return default_registry()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


# -- replication, bootstrap, membership (Kura's names) -------------------------------
_KURA_BUCKETS = tuple(0.001 * 2 ** k for k in range(16))  # Kura's exponential_buckets(0.001, 2, 16)
REPLICATION_REQUESTS = Counter(
    "kura_replication_requests_total", "Outbox deliveries to peers by target (host:port), operation "
    "(upsert_artifact, delete_namespace) and result (ok, error)", ["target", "operation", "result"])
REPLICATION_DURATION = Histogram(
    "kura_replication_request_duration_seconds", "Duration of outbox deliveries by operation",
    ["operation"], buckets=_KURA_BUCKETS)
REPLICATION_APPLY_RESULTS = Counter(
    "kura_replication_apply_results_total", "Changes received from peers by source (replication, "
    "bootstrap), item type (artifact, namespace_delete) and outcome (applied, ignored_stale, "
    "ignored_tombstone, ignored_older)", ["source", "item_type", "outcome"])
OUTBOX_DELIVERED = Counter(
    "kura_replication_outbox_delivered_total", "Outbox rows delivered to a peer and deleted")
OUTBOX_DROPPED = Counter(
    "kura_replication_outbox_dropped_total", "Outbox rows dropped because their peer left the mesh")
BOOTSTRAP_RUNS = Counter(
    "kura_bootstrap_runs_total", "Bootstrap passes by result (ok, error)", ["result"])
BOOTSTRAP_DURATION = Histogram(
    "kura_bootstrap_duration_seconds", "Duration of bootstrap passes", buckets=_KURA_BUCKETS)
BOOTSTRAP_APPLIED = Counter(
    "kura_bootstrap_applied_items_total", "Items applied by clean bootstrap passes by type "
    "(artifact, namespace_tombstone)", ["item_type"])
MEMBERSHIP_PEER_CHANGES = Counter(
    "kura_membership_peer_changes_total", "Peers discovered or lost by this node's membership",
    ["change"])


# -- analytics webhooks (Kura's names) --------------------------------------------------
ANALYTICS_EVENTS = Counter(
    "kura_analytics_events_total", "Analytics events by pipeline (queue, xcode, gradle) and result "
    "(enqueued, dropped, sent, delivery_error, circuit_open)", ["pipeline", "result"])
ANALYTICS_BATCHES = Counter(
    "kura_analytics_batches_total", "Analytics webhook batch sends by pipeline and result",
    ["pipeline", "result"])
ANALYTICS_BATCH_DURATION = Histogram(
    "kura_analytics_batch_duration_seconds", "Analytics webhook batch send duration", ["pipeline"],
    buckets=_KURA_BUCKETS)
ANALYTICS_QUEUE_DEPTH = Gauge(
    "kura_analytics_queue_depth", "Analytics events waiting to be sent", multiprocess_mode="livesum")
ANALYTICS_QUEUE_CAPACITY = Gauge(
    "kura_analytics_queue_capacity", "Analytics queue capacity", multiprocess_mode="livesum")
ANALYTICS_CIRCUIT_STATE = Gauge(
    "kura_analytics_circuit_state", "Analytics circuit breaker: 0 closed, 1 open, 2 half open",
    ["pipeline"], multiprocess_mode="livemax")
ANALYTICS_CIRCUIT_TRANSITIONS = Counter(
    "kura_analytics_circuit_transitions_total", "Analytics circuit breaker transitions",
    ["pipeline", "from", "to"])
