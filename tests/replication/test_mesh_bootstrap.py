"""A fresh node pulls a full copy from its peers before it reports ready; DNS discovery."""
from __future__ import annotations

import random
import time

from app.settings import Settings
from app.storage.store import ArtifactStore
from tests.mesh import MeshNode, gradle_path, make_mesh, quiescent, start, wait_until
from tests.nodes import make_node

SEEDED = 2000


def seed(member: MeshNode, prefix: str, count: int) -> dict[str, bytes]:
    """Write artifacts straight into a stopped node's store (fast; the node serves them later)."""
    settings = Settings(data_dir=str(member.node.data_dir), node_url=member.advertised)
    store = ArtifactStore(settings)
    rng = random.Random(prefix)
    bodies = {f"{prefix}-{i}": rng.randbytes(rng.randint(0, 800)) for i in range(count)}
    items = list(bodies.items())
    for start_at in range(0, len(items), 500):
        store.put_many("gradle", "", items[start_at:start_at + 500])
    store.close()
    return bodies


def test_fresh_node_bootstraps_everything_from_two_peers(tmp_path, faulty_proxy) -> None:
    a, b, c = make_mesh(tmp_path, ["a", "b", "c"], proxy_factory=faulty_proxy,
                        KURA_PEER_IDLE_TIMEOUT_MS="4000", KURA_PEER_LOSS_TIMEOUT_MS="30000",
                        KURA_PEER_CONNECT_TIMEOUT_MS="1000")
    bodies = seed(a, "from-a", SEEDED)
    bodies.update(seed(b, "from-b", SEEDED))
    # b holds a namespace that a cleaned later: it must not reach c.
    settings = Settings(data_dir=str(b.node.data_dir), node_url=b.advertised)
    store = ArtifactStore(settings)
    store.put_many("gradle", "gone", [(f"old-{i}", b"old") for i in range(50)])
    store.close()
    time.sleep(0.01)
    store = ArtifactStore(Settings(data_dir=str(a.node.data_dir), node_url=a.advertised))
    store.delete_namespace("gone")
    store.close()
    start([a, b])
    assert b.get(gradle_path("old-1", "gone")).status_code == 404  # b bootstrapped a's tombstone

    # c joins while its links to a and b are slow (so it is still pulling from both when
    # it compares digests with b), and b stalls in the middle of c's bootstrap.
    a.proxy.throttle(300 * 1024)
    b.proxy.throttle(150 * 1024)
    c.node.start(wait=False)
    def transferring_from_b() -> bool:
        progress = {p["peer"]: p for p in c.ready().get("bootstrap_progress", [])}
        mine = progress.get(b.advertised, {})
        return mine.get("phase") == "manifests" and mine.get("pages_fetched", 0) >= 2

    wait_until(transferring_from_b, 60, "c fetching manifests from b")
    b.proxy.stall()  # longer than the idle timeout: the pass from b fails and is retried
    for _ in range(6):
        time.sleep(1)
        r = c.get("/ready")
        assert r.status_code == 503
        incomplete = [x for x in r.json()["reasons"] if x.startswith("bootstrap incomplete for ")]
        assert incomplete and b.advertised in incomplete[0].split("for ", 1)[1].split(", ")
    b.proxy.forward()
    a.proxy.forward()
    c.node.wait_ready(120)
    doc = c.ready()
    assert doc["bootstrapped_peers"] == sorted([a.advertised, b.advertised])
    progress = {p["peer"]: p for p in doc["bootstrap_progress"]}
    assert progress[b.advertised]["attempt"] >= 2  # the stalled pass failed and was retried
    for key, body in bodies.items():
        r = c.get(gradle_path(key))
        assert r.status_code == 200 and r.content == body, key
    assert all(c.get(gradle_path(f"old-{i}", "gone")).status_code == 404 for i in range(50))
    assert c.metric("kura_bootstrap_runs_total", result="error") >= 1
    assert c.metric("kura_bootstrap_runs_total", result="ok") >= 2
    assert c.metric("kura_replication_apply_results_total", source="bootstrap", item_type="artifact",
                    outcome="applied") >= 2 * SEEDED
    assert c.metric("kura_bootstrap_completed_peers") == 2


def test_dns_discovery_with_several_loopback_addresses(tmp_path, dns_server) -> None:
    name = "kura-headless.test"
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    dns = dns_server({name: hosts})
    first = make_node(tmp_path, "n0", KURA_HTTP_WORKERS="1")
    ports = {k: first.env[k] for k in ("KURA_PORT", "KURA_GRPC_PORT", "KURA_INTERNAL_PORT")}
    members = []
    for i, host in enumerate(hosts):
        node = first if i == 0 else make_node(tmp_path, f"n{i}", KURA_HTTP_WORKERS="1")
        node.env.update(ports)  # the same ports on every address, as pods in a StatefulSet
        node.env.update({"KURA_BIND_HOST": host, "KURA_DISCOVERY_DNS_NAME": name,
                         "KURA_DISCOVERY_DNS_SERVER": f"127.0.0.1:{dns.port}",
                         "KURA_NODE_URL": f"http://{host}:{ports['KURA_INTERNAL_PORT']}"})
        members.append(MeshNode(f"n{i}", node))
    try:
        start(members)
        urls = sorted(m.advertised for m in members)
        for member in members:
            assert member.ready()["known_peers"] == [u for u in urls if u != member.advertised]
            assert member.get("/up").json()["nodes"] == urls
        assert members[0].put(gradle_path("via-dns"), b"found").status_code == 201
        wait_until(lambda: all(m.get(gradle_path("via-dns")).content == b"found" for m in members),
                   15, "the write on every node")
        # A node that leaves DNS leaves the membership at once.
        generation = members[0].rollout()["generation"]
        dns.set_records({name: hosts[:2]})
        wait_until(lambda: members[0].ready()["known_peers"] == [members[1].advertised], 10,
                   "n2 gone from n0's view")
        assert members[0].rollout()["generation"] > generation
        wait_until(lambda: quiescent(members[:2]), 15, "n0 and n1 ready again")
    finally:
        for member in members:
            member.node.stop()
