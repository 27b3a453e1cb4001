"""The replicator process (``python -m app.replication``): one per node, gevent-based.

Owns the node-wide background work: readiness (discovery), the internal API, and
store housekeeping (capacity eviction, multipart janitor). Outbox draining and
bootstrap from peers plug in here.
"""
from __future__ import annotations

import logging

from app import stop_signals
from app.node_state import KIND_REPLICATOR, NodeState, state_path
from app.replication.membership import write_members
from app.settings import Settings
from app.storage.housekeeping import Housekeeper
from app.storage.store import ArtifactStore

log = logging.getLogger("kura.replicator")


def main() -> None:
    from gevent import monkey

    monkey.patch_all()
    stop = stop_signals.listen()
    from gevent.pywsgi import WSGIServer

    from app.replication.internal_api import create_internal_app

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    node_state = NodeState(state_path(settings.data_dir))
    node_state.claim_slot(KIND_REPLICATOR)
    store = ArtifactStore(settings, node_state=node_state)
    housekeeper = Housekeeper(store)
    housekeeper.start()

    server = WSGIServer((settings.bind_host, settings.internal_port),
                        create_internal_app(settings), log=None)
    server.start()

    # Discovery: with no peers and no DNS name there is nothing to wait for. Peer
    # membership, bootstrap and readiness for a mesh arrive with replication.
    write_members(settings.data_dir, [])
    node_state.set("discovery_done", 1)
    node_state.set("generation", max(1, node_state.get("generation")))
    if not settings.replication_peers and not settings.discovery_dns_name:
        if not node_state.draining:
            node_state.set("ready", 1)
    else:
        log.warning("event=replication_unavailable peers=%d: this build cannot bootstrap from "
                    "peers yet; the node stays joining", len(settings.replication_peers))
    log.info("event=replicator_started internal_port=%d", settings.internal_port)

    stop.wait()
    server.stop(timeout=5)
    housekeeper.stop()
    store.close()
    log.info("event=replicator_stopped")
