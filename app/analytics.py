"""Analytics webhooks: cache traffic reported to a Tuist server (Kura's contract).

Enabled by ``KURA_ANALYTICS_SERVER_URL`` and ``KURA_ANALYTICS_SIGNING_KEY`` (both or none).
Uploads and downloads of namespace-scoped Xcode CAS blobs and Gradle entries are batched
and POSTed as ``{"events": [...]}`` to ``{server}/webhooks/cache`` (with ``cas_id``) and
``{server}/webhooks/gradle-cache`` (with ``cache_key``), signed with
``x-cache-signature`` = lower-case hex HMAC-SHA256(signing key, exact body), and
``x-cache-endpoint`` = host[:port] of ``KURA_NODE_URL``.

Best effort and never on the request path: recording an event only appends to a bounded
in-memory queue (``KURA_ANALYTICS_QUEUE_CAPACITY``; a full queue drops the event); one
background thread per process (a greenlet in gevent workers) sends a pipeline's batch
once it holds ``KURA_ANALYTICS_BATCH_SIZE`` events or every ``KURA_ANALYTICS_BATCH_TIMEOUT_MS``,
with ``KURA_ANALYTICS_REQUEST_TIMEOUT_MS``. Each pipeline has a circuit breaker: after
``_CIRCUIT_BREAKER_FAILURE_THRESHOLD`` failed batches it opens for ``_OPEN_MS`` (batches
are dropped, counted ``circuit_open``), then lets one batch through (half open).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import requests

from app import metrics
from app.settings import Settings

log = logging.getLogger("kura.analytics")

XCODE = "xcode"
GRADLE = "gradle"
PATHS = {XCODE: "/webhooks/cache", GRADLE: "/webhooks/gradle-cache"}
CAS_KEY_PREFIX = "blob/"  # Xcode CAS artifacts (keyvalue entries are not reported)
CONNECT_TIMEOUT_S = 0.5

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_STATE_CODES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


@dataclass(frozen=True)
class Event:
    pipeline: str
    account_handle: str
    project_handle: str
    action: str  # "upload" | "download"
    size: int
    key: str  # cas_id (xcode) or cache_key (gradle)

    def to_json(self) -> dict[str, Any]:
        """Kura's field order (serde struct order): the body is signed as sent."""
        field = "cas_id" if self.pipeline == XCODE else "cache_key"
        return {"account_handle": self.account_handle, "project_handle": self.project_handle,
                "action": self.action, "size": self.size, field: self.key}


def event_for(producer: str, tenant: str, namespace: str, key: str, action: str,
              size: int) -> Event | None:
    """The event a cache operation reports, or None (not namespace-scoped, not reported)."""
    if not namespace:
        return None
    if producer == "xcode" and key.startswith(CAS_KEY_PREFIX):
        return Event(XCODE, tenant, namespace, action, size, key[len(CAS_KEY_PREFIX):])
    if producer == "gradle":
        return Event(GRADLE, tenant, namespace, action, size, key)
    return None


def sign(key: str, body: bytes) -> str:
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def endpoint_of(node_url: str) -> str:
    """host[:port] of the node URL (Kura's ``x-cache-endpoint``)."""
    parts = urlsplit(node_url)
    if not parts.hostname:
        return node_url
    return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname


class CircuitBreaker:
    """Closed → open after ``threshold`` consecutive failures; open → half open after
    ``open_s``; a half-open success closes it, a half-open failure opens it again."""

    def __init__(self, threshold: int, open_s: float, clock: Callable[[], float]) -> None:
        self.threshold = threshold
        self.open_s = open_s
        self._clock = clock
        self.state = CLOSED
        self.failures = 0
        self.opened_until = 0.0

    def allow(self) -> tuple[bool, tuple[str, str] | None]:
        if self.state == OPEN:
            if self._clock() < self.opened_until:
                return False, None
            self.state = HALF_OPEN
            self.opened_until = self._clock() + self.open_s
            return True, (OPEN, HALF_OPEN)
        return True, None

    def success(self) -> tuple[str, str] | None:
        previous, self.state, self.failures = self.state, CLOSED, 0
        return (previous, CLOSED) if previous != CLOSED else None

    def failure(self) -> tuple[str, str] | None:
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures + 1 >= self.threshold):
            previous = self.state
            self.state, self.failures = OPEN, 0
            self.opened_until = self._clock() + self.open_s
            return (previous, OPEN)
        if self.state == CLOSED:
            self.failures += 1
        return None


class Analytics:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.server_url = settings.analytics_server_url.rstrip("/")
        self._key = settings.analytics_signing_key
        self.endpoint = endpoint_of(settings.resolved_node_url)
        self.capacity = settings.analytics_queue_capacity
        self.batch_size = settings.analytics_batch_size
        self.batch_timeout_s = settings.analytics_batch_timeout_ms / 1000
        self.request_timeout_s = settings.analytics_request_timeout_ms / 1000
        self._clock = clock
        self._queue: queue.Queue[Event | None] = queue.Queue(self.capacity)
        self._breakers = {p: CircuitBreaker(settings.analytics_circuit_breaker_failure_threshold,
                                            settings.analytics_circuit_breaker_open_ms / 1000, clock)
                          for p in PATHS}
        self._session = requests.Session()
        self._session.trust_env = False
        self._thread: threading.Thread | None = None
        metrics.ANALYTICS_QUEUE_CAPACITY.set(self.capacity)
        for pipeline in PATHS:
            metrics.ANALYTICS_CIRCUIT_STATE.labels(pipeline).set(0)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Analytics | None":
        return cls(settings) if settings.analytics_server_url else None

    # -- the request path: never blocks ---------------------------------------------
    def record(self, producer: str, tenant: str, namespace: str, key: str, action: str,
               size: int) -> None:
        event = event_for(producer, tenant, namespace, key, action, size)
        if event is None:
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            metrics.ANALYTICS_EVENTS.labels("queue", "dropped").inc()
            return
        metrics.ANALYTICS_EVENTS.labels("queue", "enqueued").inc()
        metrics.ANALYTICS_QUEUE_DEPTH.set(self._queue.qsize())

    # -- the sender ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="analytics", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (best effort, bounded by ``timeout_s``) and stop."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        self._session.close()

    def _run(self) -> None:
        batches: dict[str, list[Event]] = {p: [] for p in PATHS}
        deadline = self._clock() + self.batch_timeout_s
        while True:
            try:
                event = self._queue.get(timeout=max(0.0, deadline - self._clock()))
            except queue.Empty:
                event = _TICK
            metrics.ANALYTICS_QUEUE_DEPTH.set(self._queue.qsize())
            if event is None:
                for pipeline, batch in batches.items():
                    self._flush(pipeline, batch)
                return
            if event is not _TICK:
                batch = batches[event.pipeline]
                batch.append(event)
                if len(batch) >= self.batch_size:
                    self._flush(event.pipeline, batch)
            if self._clock() >= deadline:
                for pipeline, batch in batches.items():
                    self._flush(pipeline, batch)
                deadline = self._clock() + self.batch_timeout_s

    def _flush(self, pipeline: str, batch: list[Event]) -> None:
        if not batch:
            return
        events, count = list(batch), len(batch)
        batch.clear()
        breaker = self._breakers[pipeline]
        allowed, transition = breaker.allow()
        self._note_transition(pipeline, transition)
        if not allowed:
            metrics.ANALYTICS_EVENTS.labels(pipeline, "circuit_open").inc(count)
            metrics.ANALYTICS_BATCHES.labels(pipeline, "circuit_open").inc()
            return
        body = json.dumps({"events": [e.to_json() for e in events]}, separators=(",", ":")).encode()
        started = time.perf_counter()
        try:
            response = self._session.post(
                self.server_url + PATHS[pipeline], data=body,
                timeout=(CONNECT_TIMEOUT_S, self.request_timeout_s),
                headers={"content-type": "application/json", "x-cache-signature": sign(self._key, body),
                         "x-cache-endpoint": self.endpoint})
            response.close()
            result = "ok" if 200 <= response.status_code < 300 else (
                "error_status_4xx" if 400 <= response.status_code < 500 else
                "error_status_5xx" if response.status_code >= 500 else "error_status_other")
        except requests.ConnectTimeout:
            result = "error_connect"
        except requests.Timeout:
            result = "error_timeout"
        except requests.ConnectionError:
            result = "error_connect"
        except requests.RequestException:
            result = "error_other"
        metrics.ANALYTICS_BATCH_DURATION.labels(pipeline).observe(time.perf_counter() - started)
        metrics.ANALYTICS_BATCHES.labels(pipeline, result).inc()
        if result == "ok":
            metrics.ANALYTICS_EVENTS.labels(pipeline, "sent").inc(count)
            self._note_transition(pipeline, breaker.success())
        else:
            metrics.ANALYTICS_EVENTS.labels(pipeline, "delivery_error").inc(count)
            log.warning("event=analytics_batch_failed pipeline=%s events=%d result=%s", pipeline,
                        count, result)
            self._note_transition(pipeline, breaker.failure())

    def _note_transition(self, pipeline: str, transition: tuple[str, str] | None) -> None:
        if transition is None:
            return
        previous, current = transition
        metrics.ANALYTICS_CIRCUIT_TRANSITIONS.labels(pipeline, previous, current).inc()
        metrics.ANALYTICS_CIRCUIT_STATE.labels(pipeline).set(_STATE_CODES[current])
        log.info("event=analytics_circuit pipeline=%s from=%s to=%s", pipeline, previous, current)


_TICK = Event("", "", "", "", 0, "")
