"""The replicator process (``python -m app.replication``): the mesh's composition root.

One per node, gevent-based. It owns: the internal peer API on ``KURA_INTERNAL_PORT``
(``internal_api``, optionally with mutual TLS: ``peer_tls``), membership and discovery
(``membership``), bootstrap from peers (``bootstrap``), outbox delivery (``drain``), the
bandwidth pacing all of them share (``pacing``), the readiness gate (``readiness``), and
store housekeeping (capacity eviction, multipart janitor). It publishes the mesh view
to the node's other processes (``run/members.json``, ``run/mesh.json`` and the shared
node state).
"""
from __future__ import annotations

import logging

from app import stop_signals, tracing
from app.node_state import KIND_REPLICATOR, NodeState, state_path
from app.settings import Settings

log = logging.getLogger("kura.replicator")


def main() -> None:
    from gevent import monkey

    monkey.patch_all()
    stop = stop_signals.listen()
    from app.replication.bootstrap import Bootstrapper
    from app.replication.drain import OutboxDrainer
    from app.replication.internal_api import create_internal_app, serve_internal_api
    from app.replication.membership import Membership
    from app.replication.pacing import Pacer
    from app.replication.peer_client import PeerClient
    from app.replication.peer_tls import PeerTls
    from app.replication.readiness import SETTLE_S, MeshState, Publisher
    from app.replication.resolution import Resolver
    from app.storage.housekeeping import Housekeeper
    from app.storage.segments import cooperative_offload
    from app.storage.store import ArtifactStore

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tracing.start(settings, "replicator")  # after the monkey patching: its exporter is a greenlet
    node_state = NodeState(state_path(settings.resolved_run_dir))
    node_state.claim_slot(KIND_REPLICATOR)
    offload = cooperative_offload()
    store = ArtifactStore(settings, node_state=node_state, offload=offload)
    housekeeper = Housekeeper(store)
    housekeeper.start()

    # With nothing to discover (no KURA_PEERS, no DNS name) the topology cannot change, so
    # there is nothing to settle: a single node is ready after its first round.
    alone = not settings.peers and not settings.discovery_dns_name
    mesh = MeshState(settings.resolved_node_url, settle_s=0.0 if alone else SETTLE_S)
    resolver = Resolver(settings.discovery_dns_server)
    tls = PeerTls.from_settings(settings)
    if tls is not None:
        tls.start_watching()
    client = PeerClient(connect_timeout_s=settings.peer_connect_timeout_ms / 1000,
                        idle_timeout_s=settings.peer_idle_timeout_ms / 1000,
                        resolve=resolver.address if settings.discovery_dns_server else None, tls=tls)
    pacer = Pacer(settings.replication_bandwidth_limit_bytes_per_second,
                  settings.replication_public_latency_target_ms,
                  lambda: (node_state.public_inflight(), node_state.public_latency_ewma_ms()))
    server = serve_internal_api(settings, create_internal_app(
        settings, store, known_peers=mesh.known_peers, offload=offload, pacer=pacer), tls)
    publisher = Publisher(mesh, node_state, settings.resolved_run_dir)

    membership = Membership(settings, client, mesh, resolver)
    bootstrapper = Bootstrapper(settings, store, client, mesh, offload=offload, pacer=pacer)
    drainer = OutboxDrainer(store, client, lambda: tuple(mesh.peers),
                            lambda: mesh.initial_discovery_completed, pacer=pacer,
                            last_seen=mesh.last_seen)
    membership.start()
    bootstrapper.start()
    drainer.start()

    publisher.start()
    log.info("event=replicator_started internal_port=%d node_url=%s peers=%d dns_name=%s",
             settings.internal_port, settings.resolved_node_url, len(settings.peers),
             settings.discovery_dns_name or "-")

    stop.wait()
    publisher.stop()
    membership.stop()
    bootstrapper.stop()
    drainer.stop()
    server.stop(timeout=2)  # within the master's stop grace; a cut transfer is retried
    client.close()
    if tls is not None:
        tls.stop_watching()
    housekeeper.stop()
    store.close()
    tracing.shutdown()  # exports the spans still queued (bounded)
    log.info("event=replicator_stopped")
