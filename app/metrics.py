"""Every Prometheus metric a process of the node records, with Kura's names and labels.

One module for every process role (HTTP workers, the REAPI process, the replicator,
the Lua hooks that run in the first two): a name, its labels and the label values that
Kura's dashboards, runbooks and e2e checks use are defined here once. Node-wide gauges
that are read from the store or the shared node state at scrape time (outbox depth,
readiness, in-flight requests, memory, ...) are served by ``app.http.node_metrics``.

Label values follow Kura's: artifact reads are ``ok`` / ``not_found`` / ``error``, writes
``ok`` / ``error`` / ``already_present`` (plus ``rejected``, which Kura does not count), the byte
counters carry the same ``result``, and a request no route matched is ``/_unmatched``.

Every process records into the multiprocess directory named by
``PROMETHEUS_MULTIPROC_DIR`` (set by the gunicorn master before any child starts:
``prometheus/`` in the node's per-run directory on a memory filesystem, see
``app.run_dir``); ``/metrics`` aggregates them. Those files are memory-mapped:
``app.metric_files`` makes them reserve every page before touching it. Without that
variable (unit tests) the default in-process registry is used.
"""
from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app import metric_files
from app.errors import KuraError

metric_files.install()  # before the first sample below is created

# Kura's exponential_buckets(0.001, 2, 16): 1 ms .. 32.8 s.
KURA_BUCKETS = tuple(0.001 * 2 ** k for k in range(16))

# -- label values ---------------------------------------------------------------------
OK = "ok"
NOT_FOUND = "not_found"
ERROR = "error"
EXISTS = "already_present"  # Kura's: a write skipped, the artifact is already stored (body not read)
REJECTED = "rejected"  # a write refused for the client's fault or a full budget (4xx)
ABORTED = "aborted"  # a download the client stopped reading before its end
TOO_LARGE = "too_large"
UNMATCHED_ROUTE = "/_unmatched"
SERVER_ERROR = "server_error"

# -- HTTP -------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "kura_http_requests_total", "HTTP requests by route template and status (public and internal "
    "listeners)", ["route", "status"])
HTTP_DURATION = Histogram(
    "kura_http_request_duration_seconds", "Public HTTP request latency by route template (probes, "
    "/metrics, internal and unmatched routes excluded)", ["route"], buckets=KURA_BUCKETS)
HTTP_EXCEPTIONS = Counter(
    "kura_http_exceptions_total", "HTTP answers with a 5xx status by route and kind (server_error)",
    ["route", "kind"])


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: the hot paths record several samples per
    request, and prometheus_client's ``labels`` validates and locks on every call. The
    label values are bounded sets (routes, producers, results, statuses, paths)."""
    key = (metric, labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


def record_http(route: str, status: int, public_elapsed_s: float | None = None) -> None:
    """One HTTP answer: ``public_elapsed_s`` is the latency of a public request (None for
    probes, internal and unmatched routes, which Kura keeps out of the latency histogram)."""
    child(HTTP_REQUESTS, route, str(status)).inc()
    if status >= 500:
        child(HTTP_EXCEPTIONS, route, SERVER_ERROR).inc()
    if public_elapsed_s is not None:
        child(HTTP_DURATION, route).observe(public_elapsed_s)


# -- artifacts --------------------------------------------------------------------------
ARTIFACT_READS = Counter(
    "kura_artifact_reads_total", "Artifact reads by producer and result (ok, not_found, error)",
    ["producer", "result"])
ARTIFACT_WRITES = Counter(
    "kura_artifact_writes_total", "Artifact writes by producer and result (ok, error; already_present: "
    "already stored, body not read; rejected: the client's fault or a full budget)",
    ["producer", "result"])
ARTIFACT_READ_BYTES = Counter(
    "kura_artifact_read_bytes_total", "Artifact bytes read by producer and result", ["producer", "result"])
ARTIFACT_WRITE_BYTES = Counter(
    "kura_artifact_write_bytes_total", "Artifact bytes stored by producer and result",
    ["producer", "result"])
ARTIFACT_EGRESS_COMPLETIONS = Counter(
    "kura_artifact_egress_completions_total", "Artifact response bodies that ended, by producer and "
    "result (ok: sent whole; aborted: the client went away first; error)", ["producer", "result"])
ARTIFACT_EGRESS_BYTES = Counter(
    "kura_artifact_egress_bytes_total", "Artifact response body bytes sent to clients by producer and "
    "result", ["producer", "result"])
SERVING_PATHS = Counter(
    "kura_artifact_serving_paths_total",
    "How each download was served: sendfile (zero-copy from the segment), pread (small body read "
    "whole), inline (from LMDB), read (segment reads where sendfile cannot go: HTTP/2, TLS), "
    "copy (user-space fallback)", ["path"])
MULTIPART_PARTS = Counter(
    "kura_multipart_parts_total", "Multipart part uploads by result (ok, not_found, too_large, "
    "rejected, error)", ["result"])


def served(path: str) -> None:
    """One download served by ``path`` (sendfile, pread, inline, read, copy)."""
    child(SERVING_PATHS, path).inc()


def artifact_read(producer: str, result: str, size: int = 0, *, count: int = 1) -> None:
    """``count`` artifact reads (one unless a batch is counted at once); ``size`` is the
    body bytes about to be served (``ok`` only)."""
    child(ARTIFACT_READS, producer, result).inc(count)
    if size > 0:
        child(ARTIFACT_READ_BYTES, producer, result).inc(size)


def artifact_write(producer: str, result: str, size: int = 0, *, count: int = 1) -> None:
    """``count`` artifact writes (one unless a batch is counted at once); ``size`` is the
    body bytes stored (``ok`` only)."""
    child(ARTIFACT_WRITES, producer, result).inc(count)
    if size > 0:
        child(ARTIFACT_WRITE_BYTES, producer, result).inc(size)


def artifact_egress(producer: str, result: str, sent: int) -> None:
    """One artifact response body that ended after ``sent`` body bytes."""
    child(ARTIFACT_EGRESS_COMPLETIONS, producer, result).inc()
    if sent > 0:
        child(ARTIFACT_EGRESS_BYTES, producer, result).inc(sent)


def failed_write_result(exc: BaseException) -> str:
    """``rejected`` for a client's fault or a full budget (a 4xx), else ``error``."""
    return REJECTED if isinstance(exc, KuraError) and exc.http_status < 500 else ERROR


# -- storage ----------------------------------------------------------------------------
SEGMENTS_CREATED = Counter("kura_segments_created_total", "Segment files created")
SEGMENT_ROTATIONS = Counter("kura_segment_rotations_total", "Active segments sealed and rotated")
STORAGE_SYNCS = Counter(
    "kura_storage_syncs_total", "fdatasync calls that made acknowledged writes durable, by file: "
    "segment (artifact bodies) or lmdb (metadata commits); group commit makes them fewer than writes",
    ["file"])
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

# -- gRPC (REAPI process) ---------------------------------------------------------------
GRPC_REQUESTS = Counter(
    "kura_grpc_requests_total", "gRPC calls by full method name and status code", ["method", "code"])
GRPC_DURATION = Histogram(
    "kura_grpc_request_duration_seconds", "gRPC call latency by method", ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

# -- replication, bootstrap, membership (replicator) ------------------------------------
REPLICATION_REQUESTS = Counter(
    "kura_replication_requests_total", "Outbox deliveries to peers by target (host:port), operation "
    "(upsert_artifact, delete_namespace) and result (ok, error)", ["target", "operation", "result"])
REPLICATION_DURATION = Histogram(
    "kura_replication_request_duration_seconds", "Duration of outbox deliveries by operation",
    ["operation"], buckets=KURA_BUCKETS)
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
    "kura_bootstrap_duration_seconds", "Duration of bootstrap passes", buckets=KURA_BUCKETS)
BOOTSTRAP_APPLIED = Counter(
    "kura_bootstrap_applied_items_total", "Items applied by clean bootstrap passes by type "
    "(artifact, namespace_tombstone)", ["item_type"])
MEMBERSHIP_PEER_CHANGES = Counter(
    "kura_membership_peer_changes_total", "Peers discovered or lost by this node's membership",
    ["change"])

# -- analytics webhooks (HTTP workers) --------------------------------------------------
ANALYTICS_EVENTS = Counter(
    "kura_analytics_events_total", "Analytics events by pipeline (queue, xcode, gradle) and result "
    "(enqueued, dropped, sent, delivery_error, circuit_open)", ["pipeline", "result"])
ANALYTICS_BATCHES = Counter(
    "kura_analytics_batches_total", "Analytics webhook batch sends by pipeline and result",
    ["pipeline", "result"])
ANALYTICS_BATCH_DURATION = Histogram(
    "kura_analytics_batch_duration_seconds", "Analytics webhook batch send duration", ["pipeline"],
    buckets=KURA_BUCKETS)
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

# -- Lua extension hooks (HTTP workers and the REAPI process) ---------------------------
EXTENSION_HOOKS = Counter(
    "kura_extension_hooks_total", "Lua hook calls by hook and result (ok, error, timeout, invalid)",
    ["hook", "result"])
EXTENSION_HOOK_DURATION = Histogram(
    "kura_extension_hook_duration_seconds", "Lua hook call latency (including host I/O) by hook", ["hook"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
EXTENSION_CACHE = Counter(
    "kura_extension_cache_total", "Decision cache lookups by cache (authenticate, authorize) and result "
    "(hit, miss, coalesced, evicted)", ["cache", "result"])
EXTENSION_HTTP_CLIENT_REQUESTS = Counter(
    "kura_extension_http_client_requests_total", "kura.http_json attempts by client id and result "
    "(2xx..5xx, transport_error, budget)", ["client", "result"])
EXTENSION_LUA_MEMORY = Gauge(
    "kura_extension_lua_memory_bytes", "Lua memory held by the hook states of the node (at most "
    "KURA_EXTENSION_MEMORY_LIMIT_BYTES per process)", multiprocess_mode="livesum")
EXTENSION_ABANDONED = Gauge(
    "kura_extension_abandoned_hooks", "Hook calls abandoned while stuck in a Lua C function whose thread "
    "has not ended yet", multiprocess_mode="livesum")
# Pre-bound children for the cache-hit fast path.
EXTENSION_AUTHN_HIT = EXTENSION_CACHE.labels(cache="authenticate", result="hit")
EXTENSION_AUTHZ_HIT = EXTENSION_CACHE.labels(cache="authorize", result="hit")


# -- registries -------------------------------------------------------------------------
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
