"""Outbox delivery: every local write reaches every member of the mesh (SPEC section 6.1).

One greenlet per member reads that member's outbox rows a window at a time (a backlog
of any size costs ``WINDOW`` rows of memory), sends the artifacts' current versions
in framed batches (bodies streamed from their segments, never whole in memory) with
at most ``CONCURRENCY`` batches in flight, and deletes the rows of each batch as the peer
acknowledges it (2xx), in one transaction. A failure backs the peer off for
2 s × 2^(n−1), capped at 60 s (cut short once membership hears from the peer again), and
the rows stay: delivery is retried forever and is at-least-once (duplicates are
harmless: the receiver applies last-writer-wins).

Rows of peers that left the membership are dropped once initial discovery is done
(a peer that comes back bootstraps what it missed). Public writes never wait for any
of this: they only add rows. Each batch (and each namespace delete) sent is a trace span
(``app.tracing``) that the peer's request carries as its parent.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import gevent
from gevent.pool import Pool

from app import metrics, tracing
from app.errors import KuraError
from app.replication.frames import BodyStream
from app.replication.pacing import UNPACED, Pacer
from app.replication.peer_client import PeerClient, PeerError
from app.storage.store import ArtifactStore, Located

log = logging.getLogger("kura.replication")

WINDOW = 1024
BATCH_ITEMS = 256
BATCH_BYTES = 8 * 1024 * 1024
CONCURRENCY = 4
IDLE_POLL_S = 0.05
SUPERVISE_S = 0.5
BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 60.0
BACKOFF_TICK_S = 0.25
# A probe that answered right after a failure says little (the failure may be the peer's
# load, not its absence); one answering a while later means it is back.
BACKOFF_PROBE_MARGIN_S = 1.0


def backoff_delay(failures: int) -> float:
    """2 s × 2^(n−1), capped at 60 s, for the n-th consecutive failure."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1))


@dataclass
class PeerDelivery:
    """What the drainer knows about one peer (shown in logs and tests)."""

    peer: str
    failures: int = 0
    retry_at: float = 0.0
    delivered: int = 0  # rows acknowledged since the node started
    last_error: str = ""
    greenlet: gevent.Greenlet | None = field(default=None, repr=False)


class OutboxDrainer:
    def __init__(self, store: ArtifactStore, client: PeerClient, members: Callable[[], tuple[str, ...]],
                 discovery_done: Callable[[], bool], *, pacer: Pacer = UNPACED,
                 last_seen: Callable[[str], float] = lambda peer: 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``last_seen(peer)``: when membership last heard from ``peer`` (same clock): a peer
        that answers its probes again is retried at once instead of after its backoff."""
        self.store = store
        self.client = client
        self.pacer = pacer
        self._last_seen = last_seen
        self._members = members
        self._discovery_done = discovery_done
        self._clock = clock
        self.peers: dict[str, PeerDelivery] = {}
        self._supervisor: gevent.Greenlet | None = None

    def start(self) -> None:
        self._supervisor = gevent.spawn(self._supervise)

    def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.kill()
        gevent.killall([p.greenlet for p in self.peers.values() if p.greenlet is not None])

    # -- supervision ----------------------------------------------------------------
    def _supervise(self) -> None:
        while True:
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - keep supervising; the next round retries
                log.exception("event=outbox_supervise_failed")
            gevent.sleep(SUPERVISE_S)

    def reconcile(self) -> None:
        """Start a delivery loop for each member, stop it for each peer that left, and drop
        the rows of peers that are no longer members."""
        members = set(self._members())
        for peer in members - set(self.peers):
            state = self.peers[peer] = PeerDelivery(peer)
            state.greenlet = gevent.spawn(self._deliver_forever, state)
        for peer in set(self.peers) - members:
            state = self.peers.pop(peer)
            if state.greenlet is not None:
                state.greenlet.kill(block=False)
        if not self._discovery_done():
            return  # after a restart, rows wait for their peers to be discovered again
        for peer in list(self.store.outbox.peers_with_rows()):
            if peer not in members:
                dropped = self.store.outbox.drop_peer(peer)
                metrics.OUTBOX_DROPPED.inc(dropped)
                log.warning("event=outbox_rows_dropped peer=%s rows=%d reason=peer_left_membership",
                            peer, dropped)

    # -- delivery -------------------------------------------------------------------
    def _deliver_forever(self, state: PeerDelivery) -> None:
        seen_seq = -1
        while True:
            rows = self.store.outbox.peek(state.peer, WINDOW)
            if not rows:
                seen_seq = self._wait_for_rows(seen_seq)
                continue
            delivered, error = self.deliver(state.peer, rows)
            state.delivered += delivered
            if error is None:
                if state.failures:
                    log.info("event=replication_peer_recovered peer=%s after_failures=%d",
                             state.peer, state.failures)
                state.failures = 0
                continue
            state.failures += 1
            state.last_error = error
            delay = backoff_delay(state.failures)
            state.retry_at = self._clock() + delay
            log.warning("event=replication_failed peer=%s failures=%d retry_in_s=%.0f error=%r",
                        state.peer, state.failures, delay, error[:300])
            self._back_off(state)

    def _back_off(self, state: PeerDelivery) -> None:
        """Wait until ``state.retry_at``, or less once the peer answers a probe again."""
        failed_at = self._clock()
        while self._clock() < state.retry_at:
            if self._last_seen(state.peer) > failed_at + BACKOFF_PROBE_MARGIN_S:
                log.info("event=replication_retry_early peer=%s reason=peer_answers_again", state.peer)
                return
            gevent.sleep(min(BACKOFF_TICK_S, max(0.0, state.retry_at - self._clock())))

    def _wait_for_rows(self, seen_seq: int) -> int:
        """Sleep until some process of the node enqueued a row (the outbox sequence moved)."""
        deadline = self._clock() + 1.0
        while self._clock() < deadline:
            seq = self.store.outbox.last_seq()
            if seq != seen_seq:
                return seq
            gevent.sleep(IDLE_POLL_S)
        return self.store.outbox.last_seq()

    def _complete(self, keys: list[bytes]) -> None:
        """Delete acknowledged rows at once (each batch as its answer arrives, so the outbox
        depth follows the delivery and a failure later in the window resends nothing)."""
        if keys:
            self.store.outbox.complete_many(keys)
            metrics.OUTBOX_DELIVERED.inc(len(keys))

    def deliver(self, peer: str, rows: list[tuple[bytes, dict]]) -> tuple[int, str | None]:
        """Send ``rows`` to ``peer``; returns how many rows it acknowledged and the first error."""
        delivered: list[bytes] = []
        errors: list[str] = []
        puts: dict[str, list[bytes]] = {}
        for key, message in rows:
            op = message.get("op")
            if op == "delete_ns":
                try:
                    with tracing.outbox_namespace_delete(peer):
                        self.client.delete_namespace(peer, message["ns"], int(message["v"]))
                    delivered.append(key)
                except PeerError as exc:
                    errors.append(str(exc))
                    break  # the peer is failing: the rest waits for the retry
            elif op == "put":
                puts.setdefault(message["aid"], []).append(key)
            else:
                log.error("event=outbox_row_unknown op=%r", op)
                delivered.append(key)
        batches, gone = self._batches(puts) if not errors else ([], [])
        for hex_id in gone:  # deleted or evicted since: nothing left to send
            delivered.extend(puts[hex_id])
        self._complete(delivered)
        count = len(delivered)
        if errors:
            return count, errors[0]

        def send(batch: list[tuple[str, Located]]) -> None:
            try:
                stream = BodyStream(self.store, list(batch), pace=self.pacer.acquire)
                try:
                    with tracing.outbox_delivery(peer, len(batch), stream.length):
                        self.client.send_batch(peer, stream.frames(), stream.length)
                finally:
                    stream.close()
            except PeerError as exc:
                errors.append(str(exc))
                return
            except (OSError, KuraError) as exc:  # a body vanished under us: the next round re-reads
                errors.append(f"local read failed: {exc}")
                return
            keys = [key for hex_id, _ in batch for key in puts[hex_id]]
            self._complete(keys)
            acknowledged.append(len(keys))

        acknowledged: list[int] = []
        Pool(CONCURRENCY).map(send, batches)
        return count + sum(acknowledged), (errors[0] if errors else None)

    def _batches(self, puts: dict[str, list[bytes]]) -> tuple[list[list[tuple[str, Located]]], list[str]]:
        batches: list[list[tuple[str, Located]]] = []
        gone: list[str] = []
        current: list[tuple[str, Located]] = []
        current_bytes = 0
        for hex_id in puts:
            located = self.store.lookup_id(bytes.fromhex(hex_id))
            if located is None:
                gone.append(hex_id)
                continue
            if current and (len(current) >= BATCH_ITEMS or current_bytes + located.size > BATCH_BYTES):
                batches.append(current)
                current, current_bytes = [], 0
            current.append((hex_id, located))
            current_bytes += located.size
        if current:
            batches.append(current)
        return batches, gone
