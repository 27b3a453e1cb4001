"""The mesh benchmark: ``.venv/bin/python -m bench.mesh_bench [--quick] [--out FILE]``.

Three figures (issue 9), each against a reference measured in the same run:

1. Replication lag: three nodes; 2,000 × 4 KiB written round-robin through all of them
   (8 concurrent clients); time from the last acknowledged write until every node's
   outbox is empty, i.e. every peer acknowledged (durably applied) every write.
   Afterwards every key is read back from every node (not timed) and mismatches counted.
2. Bootstrap throughput: a fresh node pulls 1 GiB in 10,000 artifacts (plus the 1 GiB
   reference artifact) from a peer, durably; reference: one HTTP GET of that 1 GiB
   artifact from the same peer (sendfile, the bytes dropped by the client). Figure:
   bootstrap MiB/s (bytes moved ÷ time from the start of the transfer to the end of the
   pass, i.e. without start-up and the wait for the peer to list the new node) ÷
   reference MiB/s.
3. Public 4 KiB GET latency (wrk, c=8) on the peer while it serves that bootstrap,
   against the same with nothing else running.
4. Backlog: 100,000 writes pile up while a peer is down; when it is back, the drain time
   and the growth of the replicator's resident memory while it drains.
5. Pacing and TLS (issue 10): 1 GiB of outbox backlog shipped to a peer that comes back,
   with public 4 KiB GETs (wrk, c=8) on the shipping node meanwhile: pacing at its default,
   pacing off, and the same GETs on a node with no replication at all; then the drain
   throughput over mutual TLS against plain HTTP (pacing off for both).

Seeding writes straight into the peer's data directory before it starts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from bench import wrk_load
from bench.bulk_client import BulkSpec, run_bulk
from bench.servers import KuraNode, machine_description, wait_http_ok

GIB = 1024 ** 3
TENANT = "default"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _gradle(key: str) -> str:
    return f"/api/cache/gradle/{key}?tenant_id={TENANT}"


def _mesh(workdir: Path, names: list[str], extra: dict[str, str] | None = None) -> list[KuraNode]:
    for name in names:
        (workdir / name).mkdir(parents=True, exist_ok=True)
    nodes = [KuraNode(workdir / name, data_dir=workdir / name / "data",
                      extra_env={"KURA_HTTP_WORKERS": "1", **(extra or {})}) for name in names]
    for node in nodes:
        node.extra_env["KURA_PEERS"] = ",".join(f"http://127.0.0.1:{n.internal_port}"
                                                for n in nodes if n is not node)
    return nodes


def _wait_ready(nodes: list[KuraNode], timeout_s: float = 180.0) -> None:
    for node in nodes:
        if wait_http_ok(f"{node.base_url}/ready", timeout_s, node.alive) is None:
            raise RuntimeError(f"{node.base_url} not ready:\n{node.log_tail()}")


def _outbox(node: KuraNode, session: requests.Session) -> int:
    return session.get(f"{node.base_url}/status/rollout", timeout=10).json()["outbox_messages"]


def replication_lag(workdir: Path, writes: int, reps: int) -> dict[str, Any]:
    nodes = _mesh(workdir, ["a", "b", "c"])
    for node in nodes:
        node.start()
    try:
        _wait_ready(nodes)
        body = os.urandom(4096)
        runs = []
        for rep in range(reps):
            keys = [f"lag{rep}-{i:05d}" for i in range(writes)]
            local = threading.local()

            def put(i: int) -> float:
                session = getattr(local, "session", None)
                if session is None:
                    session = local.session = requests.Session()
                node = nodes[i % len(nodes)]
                r = session.put(node.base_url + _gradle(keys[i]), data=body, timeout=60)
                if r.status_code != 201:
                    raise RuntimeError(f"write {i}: {r.status_code} {r.text[:200]}")
                return time.monotonic()

            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                acks = list(pool.map(put, range(writes)))
            last_ack = max(acks)
            session = requests.Session()
            while any(_outbox(n, session) for n in nodes):
                time.sleep(0.005)
            done = time.monotonic()
            mismatches = 0
            for node in nodes:
                for key in keys:
                    if session.get(node.base_url + _gradle(key), timeout=10).content != body:
                        mismatches += 1
            run = {"write_s": last_ack - started, "writes_per_s": writes / (last_ack - started),
                   "lag_s": done - last_ack, "mismatches": mismatches}
            _log(f"mesh: replication rep {rep}: {json.dumps(run)}")
            runs.append(run)
        return {"writes": writes, "body_bytes": len(body), "runs": runs,
                "lag_s_median": statistics.median(r["lag_s"] for r in runs),
                "mismatches": sum(r["mismatches"] for r in runs)}
    finally:
        for node in nodes:
            node.stop()


def _seed(data_dir: Path, node_url: str, count: int, total_bytes: int) -> int:
    """``count`` random artifacts of ``total_bytes`` in all, plus one artifact of
    ``total_bytes`` (the reference GET) and a 4 KiB one (the latency probe)."""
    from app.settings import Settings
    from app.storage.store import ArtifactStore

    store = ArtifactStore(Settings(data_dir=str(data_dir), node_url=node_url))
    size = total_bytes // count
    batch = max(1, (64 * 1024 * 1024) // size)
    chunk = os.urandom(size + batch)
    for start in range(0, count, batch):
        n = min(batch, count - start)
        store.put_many("gradle", "", [(f"seed-{start + i:06d}", chunk[i:i + size]) for i in range(n)])
    with store.stage(hashing=False) as staged:
        block = os.urandom(16 * 1024 * 1024)
        while staged.size < total_bytes:
            staged.write(block[:min(len(block), total_bytes - staged.size)])
        staged.finish()
        store.put_staged("gradle", "", "reference-blob", staged)
    store.put_bytes("gradle", "", "hot-4k", os.urandom(4096), inline=False)
    store.close()
    return size


def bootstrap_and_latency(workdir: Path, count: int, total_bytes: int, wrk_s: float) -> dict[str, Any]:
    source, fresh = _mesh(workdir, ["source", "fresh"])
    _log(f"mesh: seeding {count} artifacts, {total_bytes / GIB:.2f} GiB")
    started = time.monotonic()
    size = _seed(source.data_dir, f"http://127.0.0.1:{source.internal_port}", count, total_bytes)
    _log(f"mesh: seeded in {time.monotonic() - started:.1f} s")
    source.start()
    result: dict[str, Any] = {"artifacts": count, "artifact_bytes": size, "total_bytes": count * size}
    try:
        # Reference: one GET of the same number of bytes from the same node.
        spec = BulkSpec(host="127.0.0.1", port=source.http_port, method="GET",
                        path=_gradle("reference-blob"), concurrency=1, duration_s=60,
                        max_requests_per_connection=1)
        gets = [run_bulk(spec) for _ in range(2)]
        result["reference_get_s"] = min(g.wall_s for g in gets)
        hot = f"{source.base_url}{_gradle('hot-4k')}"
        idle = wrk_load.run_wrk(hot, 8, wrk_s) if wrk_load.available() else None
        fresh.start()
        busy_holder: dict[str, Any] = {}

        def load_while_bootstrapping() -> None:
            # Starts when the pass moves bytes (after the fresh node's start-up and digest).
            deadline = time.monotonic() + 120
            session = requests.Session()
            while time.monotonic() < deadline:
                try:
                    doc = session.get(f"{fresh.base_url}/ready", timeout=5).json()
                except (requests.RequestException, ValueError):
                    time.sleep(0.1)
                    continue
                progress = doc.get("bootstrap_progress") or [{}]
                if progress[0].get("bytes", 0) > 0 or doc.get("ready"):
                    break
                time.sleep(0.05)
            if wrk_load.available():
                busy_holder["wrk"] = wrk_load.run_wrk(hot, 8, wrk_s)

        loader = threading.Thread(target=load_while_bootstrapping)
        loader.start()
        _wait_ready([fresh], timeout_s=900)
        loader.join()
        doc = requests.get(f"{fresh.base_url}/ready", timeout=10).json()
        progress = doc["bootstrap_progress"][0]
        result["bootstrap_pass_s"] = progress["elapsed_ms"] / 1000
        result["bootstrap_transfer_s"] = progress["transfer_ms"] / 1000
        result["bootstrap_bytes"] = progress["bytes"]
        result["bootstrap_applied"] = progress["artifacts_applied"]
        result["bootstrap_mib_per_s"] = progress["bytes"] / (1024 ** 2) / result["bootstrap_transfer_s"]
        result["reference_mib_per_s"] = total_bytes / (1024 ** 2) / result["reference_get_s"]
        result["bootstrap_vs_reference"] = result["bootstrap_mib_per_s"] / result["reference_mib_per_s"]
        busy = busy_holder.get("wrk")
        if idle is not None and busy is not None:
            result["get_4k_idle"] = {"p50_ms": idle.p50_s * 1e3, "p99_ms": idle.p99_s * 1e3,
                                     "requests_per_s": idle.requests_per_s}
            result["get_4k_during_bootstrap"] = {"p50_ms": busy.p50_s * 1e3, "p99_ms": busy.p99_s * 1e3,
                                                 "requests_per_s": busy.requests_per_s}
            result["p99_ratio"] = busy.p99_s / idle.p99_s if idle.p99_s else None
        return result
    finally:
        fresh.stop()
        source.stop()


def backlog_drain(workdir: Path, rows: int) -> dict[str, Any]:
    """A peer is down while ``rows`` writes pile up in the outbox (REAPI batches of 1,000
    blobs); then it comes back. Measures the drain time and the replicator's memory."""
    from bench import proctree
    from tests.reapi.reapi_client import Reapi, digest_of
    from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

    extra = {"KURA_PEER_LOSS_TIMEOUT_MS": str(3600 * 1000), "KURA_OUTBOX_MAX_DEPTH": str(rows + 10)}
    source, peer = _mesh(workdir, ["source", "peer"], extra)
    source.start()
    peer.start()
    try:
        _wait_ready([source, peer])
        peer.stop()
        reapi = Reapi.connect(source.grpc_port)
        for start in range(0, rows, 1000):
            blobs = [f"backlog-{i}".encode() for i in range(start, min(rows, start + 1000))]
            reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
                instance_name="backlog", requests=[re_pb2.BatchUpdateBlobsRequest.Request(
                    digest=digest_of(b), data=b) for b in blobs]))
        reapi.channel.close()
        session = requests.Session()
        depth = _outbox(source, session)
        replicator = next(pid for pid in proctree.descendants(source.pid)
                          if "app.replication" in proctree.cmdline(pid))
        sampler = proctree.RssSampler([replicator])
        sampler.start()
        started = time.monotonic()
        peer.start()
        while _outbox(source, session):
            time.sleep(0.05)
        drained = time.monotonic() - started
        sampler.stop()
        result = {"rows": depth, "drain_s": drained, "rows_per_s": depth / drained,
                  "replicator_rss_baseline_mib": sampler.baseline[replicator] / 2 ** 20,
                  "replicator_rss_growth_mib": sampler.growth()[replicator] / 2 ** 20}
        _log(f"mesh: backlog {json.dumps(result)}")
        return result
    finally:
        peer.stop()
        source.stop()


def _replicator_pid(node: KuraNode) -> int:
    from bench import proctree

    return next(pid for pid in proctree.descendants(node.pid)
                if "app.replication" in proctree.cmdline(pid))


def ship(workdir: Path, total_bytes: int, extra: dict[str, str], wrk_s: float,
         tls: bool = False) -> dict[str, Any]:
    """A node ships ``total_bytes`` of outbox backlog (16 MiB artifacts) to its peer: the
    peer's replicator is stopped (SIGSTOP) while the writes pile up, then continued.
    Measures the drain from its first acknowledged batch to the last and, with wrk, public
    4 KiB GETs on the shipping node meanwhile."""
    import signal

    extra = {"KURA_PEER_LOSS_TIMEOUT_MS": str(3600 * 1000), **extra}
    source, peer = _mesh(workdir, ["source", "peer"], extra)
    if tls:
        from tests.certs import PeerCa

        ca = PeerCa(workdir / "pki")
        for node in (source, peer):
            issued = ca.issue(node.workdir.name, into=workdir / "pki" / node.workdir.name)
            node.extra_env.update({"KURA_INTERNAL_TLS_CA_CERT_PATH": str(ca.path),
                                   "KURA_INTERNAL_TLS_CERT_PATH": str(issued.cert),
                                   "KURA_INTERNAL_TLS_KEY_PATH": str(issued.key),
                                   "KURA_NODE_URL": f"https://127.0.0.1:{node.internal_port}"})
        for node in (source, peer):
            other = peer if node is source else source
            node.extra_env["KURA_PEERS"] = f"https://127.0.0.1:{other.internal_port}"
    source.start()
    peer.start()
    session = requests.Session()
    stopped = None
    try:
        _wait_ready([source, peer])
        session.put(source.base_url + _gradle("hot-4k"), data=os.urandom(4096), timeout=30)
        while _outbox(source, session):
            time.sleep(0.05)
        stopped = _replicator_pid(peer)
        os.kill(stopped, signal.SIGSTOP)
        body = os.urandom(16 * 1024 * 1024)
        for i in range(total_bytes // len(body)):
            r = session.put(source.base_url + _gradle(f"ship-{i}"), data=body, timeout=120)
            if r.status_code != 201:
                raise RuntimeError(f"PUT ship-{i}: {r.status_code}")
        rows = _outbox(source, session)
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        while _outbox(source, session) == rows:
            time.sleep(0.01)
        started = time.monotonic()
        first = rows - _outbox(source, session)
        busy = None
        if wrk_s and wrk_load.available():
            busy = wrk_load.run_wrk(f"{source.base_url}{_gradle('hot-4k')}", 8, wrk_s)
        while _outbox(source, session):
            time.sleep(0.02)
        drained = time.monotonic() - started
        counted = total_bytes * (rows - first) / rows
        result: dict[str, Any] = {"bytes": counted, "drain_s": drained,
                                  "mib_per_s": counted / 2 ** 20 / drained}
        if busy is not None:
            result["get_4k"] = {"p50_ms": busy.p50_s * 1e3, "p99_ms": busy.p99_s * 1e3,
                                "requests_per_s": busy.requests_per_s}
        return result
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        peer.stop()
        source.stop()


def pacing_and_tls(workdir: Path, total_bytes: int, wrk_s: float) -> dict[str, Any]:
    """Issue 10's figures: GET latency while shipping with pacing on / off / no replication,
    and replication throughput over TLS against plain HTTP (pacing off for both)."""
    result: dict[str, Any] = {}
    idle_node = KuraNode(workdir / "idle", data_dir=workdir / "idle" / "data",
                         extra_env={"KURA_HTTP_WORKERS": "1"})
    (workdir / "idle").mkdir(parents=True, exist_ok=True)
    idle_node.start()
    try:
        requests.put(idle_node.base_url + _gradle("hot-4k"), data=os.urandom(4096), timeout=30)
        if wrk_load.available():
            idle = wrk_load.run_wrk(f"{idle_node.base_url}{_gradle('hot-4k')}", 8, wrk_s)
            result["get_4k_no_replication"] = {"p50_ms": idle.p50_s * 1e3, "p99_ms": idle.p99_s * 1e3,
                                               "requests_per_s": idle.requests_per_s}
    finally:
        idle_node.stop()
    result["paced_default"] = ship(workdir / "paced", total_bytes, {}, wrk_s)
    _log(f"mesh: shipped with pacing on {json.dumps(result['paced_default'])}")
    unpaced = {"KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND": "0"}
    result["unpaced"] = ship(workdir / "unpaced", total_bytes, unpaced, wrk_s)
    _log(f"mesh: shipped with pacing off {json.dumps(result['unpaced'])}")
    # The same default limit with a public latency target this machine's GETs exceed, so the
    # latency divisor (not only the in-flight one) is what slows replication down.
    tight = {"KURA_REPLICATION_PUBLIC_LATENCY_TARGET_MS": "2"}
    result["paced_latency_target_2ms"] = ship(workdir / "tight", total_bytes, tight, wrk_s)
    _log(f"mesh: shipped with a 2 ms latency target {json.dumps(result['paced_latency_target_2ms'])}")
    result["plain_throughput"] = ship(workdir / "plain", total_bytes, unpaced, 0)
    result["tls_throughput"] = ship(workdir / "tls", total_bytes, unpaced, 0, tls=True)
    result["tls_vs_plain"] = (result["tls_throughput"]["mib_per_s"]
                              / result["plain_throughput"]["mib_per_s"])
    _log(f"mesh: throughput plain {result['plain_throughput']['mib_per_s']:.0f} MiB/s, "
         f"tls {result['tls_throughput']['mib_per_s']:.0f} MiB/s")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mesh_bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="256 MiB bootstrap, 1 replication rep")
    p.add_argument("--out", default="bench/results/mesh-latest.json")
    p.add_argument("--sections", default="replication,bootstrap,backlog,pacing",
                   help="comma-separated subset of replication,bootstrap,backlog,pacing")
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    total = (256 * 1024 ** 2) if args.quick else GIB
    count = 2_500 if args.quick else 10_000
    with tempfile.TemporaryDirectory(prefix="kura-bench-mesh-") as tmp:
        work = Path(tmp)
        doc = {"machine": machine_description(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        if "replication" in sections:
            doc["replication"] = replication_lag(work / "lag", 2000, 1 if args.quick else 3)
        if "bootstrap" in sections:
            doc["bootstrap"] = bootstrap_and_latency(work / "boot", count, total,
                                                     3.0 if args.quick else 5.0)
        if "backlog" in sections:
            doc["backlog"] = backlog_drain(work / "backlog", 20_000 if args.quick else 100_000)
        if "pacing" in sections:
            doc["pacing"] = pacing_and_tls(work / "pacing", total, 3.0 if args.quick else 5.0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    summary: dict[str, Any] = {}
    if "replication" in doc:
        summary.update(replication_lag_s=doc["replication"]["lag_s_median"],
                       mismatches=doc["replication"]["mismatches"])
    if "bootstrap" in doc:
        summary.update({k: doc["bootstrap"].get(k) for k in (
            "reference_get_s", "reference_mib_per_s", "bootstrap_pass_s", "bootstrap_transfer_s",
            "bootstrap_mib_per_s", "bootstrap_vs_reference", "get_4k_idle",
            "get_4k_during_bootstrap", "p99_ratio")})
    for name in ("backlog", "pacing"):
        if name in doc:
            summary[name] = doc[name]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
