"""Extension metrics (Kura's names), recorded in every process that runs hooks."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HOOKS = Counter(
    "kura_extension_hooks_total", "Lua hook calls by hook and result (ok, error, timeout, invalid)",
    ["hook", "result"])
HOOK_DURATION = Histogram(
    "kura_extension_hook_duration_seconds", "Lua hook call latency (including host I/O) by hook", ["hook"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
CACHE = Counter(
    "kura_extension_cache_total", "Decision cache lookups by cache (authenticate, authorize) and result "
    "(hit, miss, coalesced, evicted)", ["cache", "result"])
HTTP_CLIENT_REQUESTS = Counter(
    "kura_extension_http_client_requests_total", "kura.http_json attempts by client id and result "
    "(2xx..5xx, transport_error, budget)", ["client", "result"])
LUA_MEMORY = Gauge(
    "kura_extension_lua_memory_bytes", "Lua memory held by the hook states of the node (at most "
    "KURA_EXTENSION_MEMORY_LIMIT_BYTES per process)", multiprocess_mode="livesum")
ABANDONED = Gauge(
    "kura_extension_abandoned_hooks", "Hook calls abandoned while stuck in a Lua C function whose thread "
    "has not ended yet", multiprocess_mode="livesum")

# Pre-bound children for the cache-hit fast path.
AUTHN_HIT = CACHE.labels(cache="authenticate", result="hit")
AUTHZ_HIT = CACHE.labels(cache="authorize", result="hit")
