"""Bootstrap: a node pulls a full copy of what each peer holds before it reports ready.

One pass per peer not yet bootstrapped (at most ``KURA_BOOTSTRAP_MAX_CONCURRENT_PEERS``
at once):

1. wait until the peer lists this node as a member (from then on its writers add
   outbox rows for us, so whatever the pass does not see arrives by replication);
2. namespace tombstones, page by page, applied first so nothing older comes back;
3. bucket digests (count and hash of ``(artifact id, version, origin)`` per 3-hex-digit
   prefix) of the peer and of this node: equal buckets are skipped;
4. the manifests of the divergent buckets, page by page; versions this node would not
   apply (it holds the same or newer) are skipped;
5. bodies fetched in framed batches, ``FETCHERS`` at a time, each batch claiming its
   bytes from the tmp staging budget first (waiting while it is full; a body larger
   than the whole budget proceeds alone), applied last-writer-wins in one commit.

The peer client has an idle read timeout and no total timeout: a slow transfer
completes, a stalled one fails. A pass is abandoned after ``KURA_BOOTSTRAP_TIMEOUT_MS``
without progress. A pass with any failure is retried (2 s × 2^(n−1), capped at 60 s);
the peer counts as bootstrapped only after a clean pass. Progress is visible in
``/ready`` and ``/status/rollout`` (``bootstrap_progress``), in an INFO line every 30 s
and in the ``kura_bootstrap_*`` metrics; each pass is a trace span (``app.tracing``) with
its counts, and the pass's requests to the peer carry it.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import gevent
from gevent.pool import Pool

from app import metrics, tracing
from app.errors import BudgetExhausted, KuraError
from app.replication.drain import backoff_delay
from app.replication.pacing import UNPACED, Pacer
from app.replication.peer_client import PeerClient, PeerError
from app.replication.readiness import BootstrapProgress, MeshState, PeerState
from app.replication.receive import SOURCE_BOOTSTRAP, artifact_from_fields, receive_frames
from app.members import RECHECK_S
from app.settings import Settings
from app.storage.store import APPLIED, ArtifactStore, ReplicatedArtifact

log = logging.getLogger("kura.bootstrap")

PREFIX_LEN = 3
PAGE_LIMIT = 1000
FETCHERS = 16
LISTERS = 4
FULL_WALK_FRACTION = 0.25
# One fetch: up to this many artifacts or bytes (a larger body goes alone). Big enough that
# a batch of large bodies becomes a segment of its own without a second copy.
FETCH_ITEMS = 1024
FETCH_BYTES = 32 * 1024 * 1024
SCHEDULE_S = 0.25
PROGRESS_LOG_S = 30.0
# Writers re-read the member list at most every RECHECK_S: wait a little longer than that
# after a peer first lists us before relying on its outbox for what the pass misses.
LISTING_GRACE_S = 3 * RECHECK_S
LISTING_WAIT_MAX_S = 10.0
BUDGET_WAIT_S = 0.2


class PassFailed(Exception):
    pass


class PassStalled(Exception):
    """No progress for KURA_BOOTSTRAP_TIMEOUT_MS: the pass is abandoned."""


def coalesce(divergent: set[str], peer_buckets: set[str], prefix_len: int) -> list[str]:
    """The fewest prefixes whose listings cover every divergent bucket and no bucket the
    peer holds that is not divergent (a fresh node lists everything with prefix ``""``)."""
    held: dict[str, int] = {}
    diverging: dict[str, int] = {}
    for bucket in peer_buckets:
        for n in range(prefix_len + 1):
            held[bucket[:n]] = held.get(bucket[:n], 0) + 1
    for bucket in divergent:
        for n in range(prefix_len + 1):
            diverging[bucket[:n]] = diverging.get(bucket[:n], 0) + 1
    out: list[str] = []

    def walk(prefix: str) -> None:
        if not diverging.get(prefix):
            return
        if diverging[prefix] == held.get(prefix, 0) or len(prefix) == prefix_len:
            out.append(prefix)
            return
        for digit in "0123456789abcdef":
            walk(prefix + digit)

    walk("")
    return out


class Bootstrapper:
    def __init__(self, settings: Settings, store: ArtifactStore, client: PeerClient, mesh: MeshState,
                 *, offload: Callable[..., Any] = lambda fn, *a: fn(*a), pacer: Pacer = UNPACED) -> None:
        self.settings = settings
        self.pacer = pacer
        self.store = store
        self.client = client
        self.mesh = mesh
        self._offload = offload
        self._timeout_s = settings.bootstrap_timeout_ms / 1000
        self._greenlet: gevent.Greenlet | None = None
        self._passes: dict[str, gevent.Greenlet] = {}

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._schedule_forever)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
        gevent.killall(list(self._passes.values()))

    def _schedule_forever(self) -> None:
        last_log = time.monotonic()
        while True:
            try:
                self.schedule()
                if time.monotonic() - last_log >= PROGRESS_LOG_S:
                    last_log = time.monotonic()
                    self._log_progress()
            except Exception:  # noqa: BLE001
                log.exception("event=bootstrap_schedule_failed")
            gevent.sleep(SCHEDULE_S)

    def schedule(self) -> None:
        """Start passes for peers that need one, within the concurrency limit."""
        for url in [u for u in self._passes if u not in self.mesh.peers]:
            self._passes.pop(url).kill(block=False)  # the peer left: its pass is moot
        now = time.monotonic()
        limit = self.settings.bootstrap_max_concurrent_peers
        for peer in sorted(self.mesh.peers.values(), key=lambda p: p.node_url):
            if len(self._passes) >= limit:
                break
            if peer.bootstrapped or peer.inflight or now < peer.next_attempt_at:
                continue
            peer.inflight = True
            self._passes[peer.node_url] = gevent.spawn(self._run_pass, peer)

    def _log_progress(self) -> None:
        for url in self._passes:
            peer = self.mesh.peers.get(url)
            if peer is None:
                continue
            p = peer.progress
            log.info("event=bootstrap_progress peer=%s attempt=%d phase=%s tombstones=%d "
                     "buckets=%d/%d pages=%d applied=%d failed=%d bytes=%d elapsed_s=%.0f",
                     url, p.attempt, p.phase, p.tombstones_applied, p.buckets_completed,
                     p.buckets_divergent, p.pages_fetched, p.artifacts_applied, p.artifacts_failed,
                     p.bytes, time.monotonic() - p.started_at)

    # -- one pass --------------------------------------------------------------------
    def _run_pass(self, peer: PeerState) -> None:
        started = time.monotonic()
        progress = BootstrapProgress(attempt=peer.progress.attempt + 1, started_at=started,
                                     last_progress_at=started)
        peer.progress = progress
        span = tracing.begin_bootstrap_pass(peer.node_url, progress.attempt)
        worker = gevent.spawn(tracing.carry(self.run_pass, span), peer, progress)
        result = "error"
        try:
            while not worker.ready():
                worker.join(timeout=1.0)
                if not worker.ready() and time.monotonic() - progress.last_progress_at > self._timeout_s:
                    worker.kill(PassStalled(f"no progress for {self._timeout_s:.0f} s"), block=True)
            if worker.successful():
                result = "ok"
            else:
                error = worker.exception
                progress.last_error = f"{type(error).__name__}: {error}"[:500]
        finally:
            if worker is not None and not worker.ready():
                worker.kill(block=True)
            elapsed = time.monotonic() - started
            metrics.BOOTSTRAP_RUNS.labels(result).inc()
            metrics.BOOTSTRAP_DURATION.observe(elapsed)
            peer.inflight = False
            progress.finished_at = time.monotonic()
            tracing.end_bootstrap_pass(span, result, progress)
            self._passes.pop(peer.node_url, None)
            if result == "ok":
                peer.failures = 0
                progress.phase = "done"
                # As Kura: counted once per clean pass.
                metrics.BOOTSTRAP_APPLIED.labels("namespace_tombstone").inc(progress.tombstones_applied)
                metrics.BOOTSTRAP_APPLIED.labels("artifact").inc(progress.artifacts_applied)
                log.info("event=bootstrap_completed peer=%s attempt=%d tombstones=%d buckets=%d "
                         "applied=%d ignored=%d bytes=%d elapsed_s=%.2f", peer.node_url,
                         progress.attempt, progress.tombstones_applied, progress.buckets_divergent,
                         progress.artifacts_applied, progress.artifacts_ignored, progress.bytes,
                         elapsed)
            else:
                peer.failures += 1
                delay = backoff_delay(peer.failures)
                peer.next_attempt_at = time.monotonic() + delay
                progress.phase = "failed"
                log.warning("event=bootstrap_failed peer=%s attempt=%d retry_in_s=%.0f error=%r",
                            peer.node_url, progress.attempt, delay, progress.last_error)

    def run_pass(self, peer: PeerState, progress: BootstrapProgress) -> None:
        """One bootstrap pass from ``peer``; raises on any failure, marks the peer done on a
        clean pass."""
        url = peer.node_url
        progress.phase = "waiting"
        against = self._wait_for_listing(peer)
        progress.phase = "tombstones"
        progress.transfer_started_at = time.monotonic()
        self._tombstones(url, progress)
        progress.phase = "digest"
        remote = self.client.digest(url, PREFIX_LEN)
        buckets = _buckets(remote)
        local = self._offload(self.store.catalog.bucket_digests, PREFIX_LEN)
        divergent = {b for b, d in buckets.items() if local.get(b) != d}
        log.info("event=bootstrap_digest peer=%s buckets=%d divergent=%d matched=%d", url,
                 len(buckets), len(divergent), len(buckets) - len(divergent))
        progress.buckets_total = len(buckets)
        progress.buckets_divergent = len(divergent)
        progress.touch()
        progress.phase = "manifests"
        self._walk(url, divergent, set(buckets), progress)
        if progress.artifacts_failed:
            raise PassFailed(f"{progress.artifacts_failed} artifacts failed: {progress.last_error}")
        peer.bootstrapped = True
        peer.bootstrapped_against = against

    def _walk(self, url: str, divergent: set[str], held: set[str], progress: BootstrapProgress) -> None:
        """List the divergent buckets' manifests and fetch what this node would apply.

        When most buckets differ (a fresh or long-gone node) one walk over everything,
        skipping the matched buckets' entries, beats a request per bucket; otherwise each
        coalesced prefix is listed, ``LISTERS`` at a time. Wanted versions from all
        listings are gathered into batches for ``FETCHERS`` concurrent body fetches."""
        if len(divergent) > FULL_WALK_FRACTION * max(1, len(held)):
            prefixes = [""]
        else:
            prefixes = coalesce(divergent, held, PREFIX_LEN)
        fetchers = Pool(FETCHERS)
        pending: list[tuple[str, ReplicatedArtifact]] = []
        pending_bytes = [0]

        def flush() -> None:
            batch = pending[:]
            pending.clear()
            pending_bytes[0] = 0
            if batch:
                fetchers.wait_available()
                fetchers.spawn(tracing.carry(self._fetch), url, batch, progress)

        def gather(wanted: list[tuple[str, ReplicatedArtifact]]) -> None:
            for pair in wanted:
                if pending and (len(pending) >= FETCH_ITEMS
                                or pending_bytes[0] + pair[1].size > FETCH_BYTES):
                    flush()
                pending.append(pair)
                pending_bytes[0] += pair[1].size

        def list_prefix(prefix: str) -> None:
            after = None
            while True:
                page = self.client.manifests(url, after, PAGE_LIMIT, prefix)
                progress.pages_fetched += 1
                progress.touch()
                entries = [e for e in page.get("manifests") or []
                           if not isinstance(e, dict) or str(e.get("artifact_id", ""))[:PREFIX_LEN] in divergent]
                gather(self._wanted(entries, progress))
                after = page.get("next_after")
                if not after:
                    break
            progress.buckets_completed += sum(1 for b in divergent if b.startswith(prefix))

        listers = Pool(LISTERS)
        try:
            for greenlet in [listers.spawn(tracing.carry(list_prefix), prefix) for prefix in prefixes]:
                greenlet.get()  # re-raises a listing failure: the pass fails
            flush()
            fetchers.join()
        finally:
            listers.kill()
            fetchers.kill()  # an abandoned pass takes its fetches along

    def _wait_for_listing(self, peer: PeerState) -> int | None:
        deadline = time.monotonic() + LISTING_WAIT_MAX_S
        while time.monotonic() < deadline:
            if peer.listed_us_at is not None and time.monotonic() - peer.listed_us_at >= LISTING_GRACE_S:
                return peer.admitted_us_ms
            gevent.sleep(0.1)
        log.warning("event=bootstrap_peer_does_not_list_us peer=%s: writes made on it will not "
                    "be replicated here until it discovers this node", peer.node_url)
        return peer.admitted_us_ms

    def _tombstones(self, url: str, progress: BootstrapProgress) -> None:
        after = None
        while True:
            page = self.client.tombstones(url, after, PAGE_LIMIT)
            progress.pages_fetched += 1
            for row in page.get("tombstones") or ():
                namespace, version = row.get("namespace_id"), row.get("version_ms")
                if not isinstance(namespace, str) or not isinstance(version, int):
                    raise PassFailed("malformed tombstone page")
                outcome = self.store.apply_replicated_namespace_delete(namespace, version)
                metrics.REPLICATION_APPLY_RESULTS.labels(SOURCE_BOOTSTRAP, "namespace_delete",
                                                         outcome).inc()
                if outcome == APPLIED:
                    progress.tombstones_applied += 1
            progress.touch()
            after = page.get("next_after")
            if not after:
                return

    def _wanted(self, entries: list[Any], progress: BootstrapProgress) -> list[tuple[str, ReplicatedArtifact]]:
        items: list[tuple[str, ReplicatedArtifact]] = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("artifact_id"), str):
                raise PassFailed("malformed manifest page")
            try:
                items.append((entry["artifact_id"], artifact_from_fields(entry)))
            except KuraError as exc:
                raise PassFailed(f"malformed manifest: {exc.message}") from None
        outcomes = self.store.replicated_outcomes([item for _, item in items])
        progress.artifacts_ignored += sum(1 for o in outcomes if o != APPLIED)
        return [pair for pair, outcome in zip(items, outcomes) if outcome == APPLIED]

    def _fetch(self, url: str, batch: list[tuple[str, ReplicatedArtifact]],
               progress: BootstrapProgress) -> None:
        size = sum(item.size for _, item in batch)
        try:
            with self.store.stage(hashing=False) as staged:
                while True:
                    try:
                        staged.reserve_upfront(size)
                        break
                    except BudgetExhausted:
                        progress.touch()  # waiting for budget is not a stall of the peer
                        gevent.sleep(BUDGET_WAIT_S)

                def read(n: int, _read: Callable[[int], bytes]) -> bytes:
                    data = _read(n)
                    if data:
                        progress.bytes += len(data)
                        progress.touch()
                    return data

                received = self.client.fetch_bodies(
                    url, [hex_id for hex_id, _ in batch],
                    lambda raw: receive_frames(self.store, self.pacer.reader(lambda n: read(n, raw)),
                                               SOURCE_BOOTSTRAP, staged))
        except (PeerError, KuraError, OSError) as exc:
            progress.artifacts_failed += len(batch)
            progress.last_error = str(exc)[:500]
            log.warning("event=bootstrap_fetch_failed peer=%s artifacts=%d error=%r", url, len(batch),
                        progress.last_error)
            return
        progress.artifacts_applied += received.applied
        progress.artifacts_ignored += received.artifacts - received.applied
        progress.touch()


def _buckets(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A peer's digest answer as ``{prefix: {"count", "hash"}}``."""
    rows = answer.get("buckets")
    if answer.get("prefix_len") != PREFIX_LEN or not isinstance(rows, list):
        raise PassFailed("malformed digest answer")
    buckets = {}
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("prefix"), str):
            raise PassFailed("malformed digest bucket")
        buckets[row["prefix"]] = {"count": row.get("count"), "hash": row.get("hash")}
    return buckets
