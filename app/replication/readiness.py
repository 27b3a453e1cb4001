"""The mesh as this node sees it, and the readiness gate built on it (SPEC section 6.6).

``MeshState`` lives in the replicator: membership updates it every probe round,
bootstrap records its passes in it, and it decides when the node may serve. Kura's
rule: a node is ready iff it holds the writer lock, is not draining, has completed
initial discovery, 5 s have passed since the last generation change (topology
change), and it has a clean bootstrap pass from every known peer. Once ready it
stays ready until the next generation change ("serving" is sticky).

The replicator publishes a snapshot (``mesh.json`` in the run directory, atomic replace) and
the flags in the shared node state; the HTTP workers build ``/up``, ``/ready`` and
``/status/rollout`` from them with ``ready_document`` and friends, so the bodies have
one definition.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from app.run_dir import MESH
from app.state_files import StateFile, read_json, replace_json

log = logging.getLogger("kura.replicator")
SETTLE_S = 5.0

REASON_WRITER_LOCK = "writer lock not held"
REASON_DRAINING = "draining"
REASON_DISCOVERY = "initial discovery incomplete"
REASON_SETTLING = "discovery settling"
REASON_BOOTSTRAP = "bootstrap in progress"
REASON_INCOMPLETE = "bootstrap incomplete for {}"
# kura-py: the node runs several REAPI processes; it is ready only when all of them serve.
REASON_REAPI = "REAPI processes serving: {} of {}"


@dataclass
class BootstrapProgress:
    """What one bootstrap pass from one peer has done so far."""

    phase: str = "waiting"  # waiting, tombstones, digest, manifests, done, failed
    attempt: int = 0
    tombstones_applied: int = 0
    buckets_total: int = 0
    buckets_divergent: int = 0
    buckets_completed: int = 0
    pages_fetched: int = 0
    artifacts_applied: int = 0
    artifacts_ignored: int = 0
    artifacts_failed: int = 0
    bytes: int = 0
    started_at: float = 0.0
    transfer_started_at: float = 0.0  # when the peer listed us and the transfer began
    finished_at: float = 0.0
    last_progress_at: float = 0.0
    last_error: str = ""

    def touch(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.last_progress_at = clock()

    def to_json(self, peer: str, now: float) -> dict[str, Any]:
        doc = asdict(self)
        for internal in ("started_at", "transfer_started_at", "finished_at", "last_progress_at"):
            doc.pop(internal)
        end = self.finished_at or now
        doc["peer"] = peer
        doc["elapsed_ms"] = int((end - self.started_at) * 1000) if self.started_at else 0
        doc["transfer_ms"] = (int((end - self.transfer_started_at) * 1000)
                              if self.transfer_started_at else 0)
        return doc


@dataclass
class PeerState:
    node_url: str
    region: str
    admitted_ms: int  # when this node admitted the peer (reported to it in /_internal/status)
    last_seen: float = 0.0  # monotonic time of its last answer to a probe
    # When the peer admitted *this* node (its /_internal/status ``known_peers``), None if it
    # does not list us; and when we first saw it listing us.
    admitted_us_ms: int | None = None
    listed_us_at: float | None = None
    bootstrapped: bool = False
    bootstrapped_against: int | None = None  # admitted_us_ms our last clean pass relied on
    inflight: bool = False
    failures: int = 0
    next_attempt_at: float = 0.0
    progress: BootstrapProgress = field(default_factory=BootstrapProgress)


class MeshState:
    """Membership, bootstrap and readiness state of the replicator (one per node)."""

    def __init__(self, own_url: str, clock: Callable[[], float] = time.monotonic, *,
                 settle_s: float = SETTLE_S) -> None:
        self.own_url = own_url
        self._clock = clock
        self._settle_s = settle_s
        self.generation = 0
        self.initial_discovery_completed = False
        self.settle_until = 0.0
        self.peers: dict[str, PeerState] = {}
        self.serving = False

    # -- membership --------------------------------------------------------------------
    def apply_membership(self, seen: dict[str, dict[str, Any]], discovery_observed: bool,
                         still_targeted: set[str], loss_s: float) -> tuple[list[str], list[str]]:
        """One probe round: ``seen`` maps each admitted peer's node URL to its status
        document. A known peer that no target leads to any more (gone from DNS) is lost at
        once; one that is still targeted but does not answer is lost after ``loss_s``
        (kura-py: a stalled or restarting peer does not churn the topology at once).
        Returns ``(joined, left)``; any change bumps the generation and clears serving."""
        now = self._clock()
        joined = [url for url in seen if url not in self.peers]
        left = [url for url, peer in self.peers.items() if url not in seen
                and (url not in still_targeted or now - peer.last_seen >= loss_s)]
        for url in left:
            del self.peers[url]
        now_ms = int(time.time() * 1000)
        for url in joined:
            self.peers[url] = PeerState(url, str(seen[url].get("region", "")), now_ms)
        for url, doc in seen.items():
            self.peers[url].last_seen = now
            self._note_listing(self.peers[url], doc, now)
        changed = bool(joined or left)
        if not self.initial_discovery_completed:
            if discovery_observed:
                self.initial_discovery_completed = True
                self._bump(now)
        elif changed:
            self._bump(now)
        return joined, left

    def _note_listing(self, peer: PeerState, doc: dict[str, Any], now: float) -> None:
        known = doc.get("known_peers")
        admitted = known.get(self.own_url) if isinstance(known, dict) else None
        admitted = admitted if isinstance(admitted, int) else None
        if admitted is None:
            peer.admitted_us_ms = None
            peer.listed_us_at = None
            return
        if admitted != peer.admitted_us_ms:
            peer.admitted_us_ms = admitted
            peer.listed_us_at = now
        if (peer.bootstrapped and peer.bootstrapped_against is not None
                and admitted != peer.bootstrapped_against):
            # The peer dropped us and admitted us again: it may have dropped outbox rows
            # meant for us meanwhile, so what it holds must be pulled again.
            peer.bootstrapped = False

    def _bump(self, now: float) -> None:
        self.generation += 1
        self.settle_until = now + self._settle_s
        self.serving = False

    def last_seen(self, url: str) -> float:
        """When ``url`` last answered a probe (this state's monotonic clock; 0: never)."""
        peer = self.peers.get(url)
        return peer.last_seen if peer is not None else 0.0

    def known_peers(self) -> dict[str, int]:
        """Admitted peers and when (for ``/_internal/status``)."""
        return {url: p.admitted_ms for url, p in self.peers.items()}

    # -- readiness ---------------------------------------------------------------------
    def settled(self) -> bool:
        return self.initial_discovery_completed and self._clock() >= self.settle_until

    def maybe_mark_serving(self, draining: bool) -> bool:
        if draining or self.serving or not self.settled():
            return self.serving
        peers = self.peers.values()
        if all(p.bootstrapped and not p.inflight for p in peers):
            self.serving = True
        return self.serving

    def snapshot(self) -> dict[str, Any]:
        """What the HTTP workers need for the probe documents (``mesh.json``)."""
        now = self._clock()
        peers = sorted(self.peers.values(), key=lambda p: p.node_url)
        return {
            "generation": self.generation,
            "initial_discovery_completed": self.initial_discovery_completed,
            "settle_until_ms": int((time.time() + self.settle_until - now) * 1000),
            "serving": self.serving,
            "known_peers": [p.node_url for p in peers],
            "bootstrapped_peers": [p.node_url for p in peers if p.bootstrapped],
            "bootstrap_inflight_peers": [p.node_url for p in peers if p.inflight],
            "regions": {p.node_url: p.region for p in peers},
            "bootstrap_progress": [p.progress.to_json(p.node_url, now) for p in peers
                                   if p.progress.attempt],
            "written_ms": int(time.time() * 1000),
        }


# -- publishing to the node's other processes -------------------------------------------
PUBLISH_S = 0.25


class Publisher:
    """Decides readiness and publishes the mesh view every ``PUBLISH_S``: the flags and
    counts in the shared node state, the snapshot in ``run/mesh.json`` (when it changed)."""

    def __init__(self, mesh: MeshState, node_state: Any, run_dir: str) -> None:
        self.mesh = mesh
        self.node_state = node_state
        self.run_dir = run_dir
        self._file = StateFile(mesh_path(run_dir))
        self._last = ""
        self._greenlet: Any = None

    def publish(self) -> None:
        node, mesh = self.node_state, self.mesh
        serving = mesh.maybe_mark_serving(node.draining)
        snapshot = mesh.snapshot()
        node.set("generation", mesh.generation)
        node.set("discovery_done", int(mesh.initial_discovery_completed))
        node.set("members", len(mesh.peers))
        node.set("bootstrap_known", len(snapshot["known_peers"]))
        node.set("bootstrap_completed", len(snapshot["bootstrapped_peers"]))
        node.set("bootstrap_inflight", len(snapshot["bootstrap_inflight_peers"]))
        node.set("ready", int(serving and not node.draining))
        key = json.dumps({k: v for k, v in snapshot.items() if k != "written_ms"}, sort_keys=True)
        # A failed write (a full disk) leaves _last as it was: written again next time.
        if key != self._last and self._file.write(snapshot):
            self._last = key

    def start(self) -> None:
        import gevent

        def forever() -> None:
            while True:
                try:
                    self.publish()
                except Exception:  # noqa: BLE001 - keep publishing
                    log.exception("event=publish_failed")
                gevent.sleep(PUBLISH_S)

        self._greenlet = gevent.spawn(forever)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()


def mesh_path(run_dir: str) -> str:
    return os.path.join(run_dir, MESH)


def publish(run_dir: str, snapshot: dict[str, Any]) -> None:
    """Write the snapshot (raises OSError when it cannot be written)."""
    replace_json(mesh_path(run_dir), snapshot)


def read_snapshot(run_dir: str) -> dict[str, Any]:
    doc = read_json(mesh_path(run_dir))
    return doc if isinstance(doc, dict) else {}


def reasons(snapshot: dict[str, Any], *, draining: bool, writer_lock: bool, serving: bool,
            reapi_serving: tuple[int, int] = (0, 0)) -> list[str]:
    """Why the node is not ready, in Kura's words (empty when it is). ``reapi_serving``:
    REAPI processes serving and expected."""
    out = []
    if not writer_lock:
        out.append(REASON_WRITER_LOCK)
    if reapi_serving[0] < reapi_serving[1]:
        out.append(REASON_REAPI.format(*reapi_serving))
    if draining:
        out.append(REASON_DRAINING)
    discovered = bool(snapshot.get("initial_discovery_completed"))
    if not discovered:
        out.append(REASON_DISCOVERY)
    if not serving:
        if discovered and snapshot.get("settle_until_ms", 0) > time.time() * 1000:
            out.append(REASON_SETTLING)
        if snapshot.get("bootstrap_inflight_peers"):
            out.append(REASON_BOOTSTRAP)
        done = set(snapshot.get("bootstrapped_peers", ()))
        missing = [p for p in snapshot.get("known_peers", ()) if p not in done]
        if missing:
            out.append(REASON_INCOMPLETE.format(", ".join(missing)))
    return out
