"""Who is in the mesh: static ``KURA_PEERS`` plus DNS discovery, probed every 2 s (SPEC 6.3).

Each round resolves ``KURA_DISCOVERY_DNS_NAME`` (A and AAAA records, through dnspython
so the resolver is a real one and can be pointed at a given server; see
``resolution``), turns every address into a peer URL with the scheme and port of
``KURA_NODE_URL`` (over ``https`` each address is verified under the DNS name, as
certificates name hosts, not addresses), adds the static peers, and asks each for
``/_internal/status``. A peer is admitted when it answers with this node's tenant and
a node URL that is not this node's. A known peer is dropped at once when no target
leads to it any more (its address left DNS), and after ``KURA_PEER_LOSS_TIMEOUT_MS``
(kura-py, default 15 s) when it is still a target but does not answer, so a stalled or
restarting peer does not churn the topology (Kura drops a peer on its first missed
probe). Any change bumps the generation (``MeshState``); the admitted peers are
published to ``run/members.json`` for the node's writers.

Initial discovery completes on the first round in which some target answered (this
node's own address counts), or at once when there is nothing to discover.
"""
from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit

import gevent
from gevent.pool import Pool

from app import metrics
from app.members import MembersPublisher
from app.replication.peer_client import PeerClient, PeerError
from app.replication.readiness import MeshState
from app.replication.resolution import Resolver
from app.settings import Settings

log = logging.getLogger("kura.membership")

PROBE_INTERVAL_S = 2.0


class Discovery:
    """Turns the configuration into the URLs probed each round."""

    def __init__(self, settings: Settings, resolver: Resolver) -> None:
        self.static = tuple(p.rstrip("/") for p in settings.peers)
        self.dns_name = settings.discovery_dns_name
        node = urlsplit(settings.resolved_node_url)
        self.scheme = node.scheme or "http"
        self.port = node.port or (443 if self.scheme == "https" else 80)
        self.resolver = resolver

    def targets(self) -> dict[str, str | None]:
        """Probe URL → the TLS server name to verify it under (None: the URL's own host).
        Over https each discovered address is probed and verified under the DNS name
        (certificates name hosts, not addresses), so every pod behind the name is seen."""
        targets: dict[str, str | None] = {url: None for url in self.static}
        if self.dns_name:
            for address in self.resolver.addresses(self.dns_name):
                host = f"[{address}]" if ":" in address else address
                name = self.dns_name if self.scheme == "https" else None
                targets.setdefault(f"{self.scheme}://{host}:{self.port}", name)
        return targets


class Membership:
    def __init__(self, settings: Settings, client: PeerClient, mesh: MeshState,
                 resolver: Resolver) -> None:
        self.settings = settings
        self.client = client
        self.mesh = mesh
        self.discovery = Discovery(settings, resolver)
        self._greenlet: gevent.Greenlet | None = None
        self._target_of: dict[str, str] = {}  # peer node URL -> the target that last reached it
        self._members = MembersPublisher(settings.resolved_run_dir)
        self.rounds = 0

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()

    def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.probe_round()
            except Exception:  # noqa: BLE001 - membership must keep going
                log.exception("event=membership_round_failed")
            gevent.sleep(max(0.1, PROBE_INTERVAL_S - (time.monotonic() - started)))

    def probe_round(self) -> None:
        targets = self.discovery.targets()
        answers: dict[str, dict[str, Any]] = {}

        def probe(target: str) -> None:
            try:
                answers[target] = self.client.status(target, targets[target])
            except PeerError as exc:
                log.debug("event=peer_probe_failed target=%s error=%s", target, exc)

        Pool(32).map(probe, list(targets))
        seen: dict[str, dict[str, Any]] = {}
        own = self.mesh.own_url
        for target, doc in answers.items():
            node_url = str(doc.get("node_url", "")).rstrip("/")
            if doc.get("tenant_id") != self.settings.tenant_id:
                log.debug("event=peer_rejected target=%s reason=tenant", target)
                continue
            if not node_url or node_url == own:
                continue
            seen[node_url] = doc
            self._target_of[node_url] = target
        observed = not targets or bool(answers)
        current = set(targets)
        still_targeted = {url for url, target in self._target_of.items() if target in current}
        before = self.mesh.generation
        joined, left = self.mesh.apply_membership(seen, observed, still_targeted,
                                                  self.settings.peer_loss_timeout_ms / 1000)
        for url in left:
            self._target_of.pop(url, None)
        self.rounds += 1
        for url in joined:
            metrics.MEMBERSHIP_PEER_CHANGES.labels("discovered").inc()
            log.info("event=peer_joined peer=%s generation=%d", url, self.mesh.generation)
        for url in left:
            metrics.MEMBERSHIP_PEER_CHANGES.labels("lost").inc()
            log.warning("event=peer_left peer=%s generation=%d", url, self.mesh.generation)
        # Every round: written when changed, and again after a failed write (a full disk).
        self._members.publish(list(self.mesh.peers))
        if self.mesh.generation != before:
            log.info("event=membership_changed generation=%d peers=%d",
                     self.mesh.generation, len(self.mesh.peers))
