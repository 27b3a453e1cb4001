"""Three real nodes: every protocol's writes converge, conflicts resolve the same way
everywhere, and a namespace clean wins over older writes, also after a bootstrap."""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time

import grpc

from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from tests.mesh import TENANT, MeshNode, gradle_path, make_mesh, quiescent, start, wait_until
from tests.reapi.reapi_client import Reapi, digest_of, read_resource

NS = "proj"


def q(extra: str = "") -> str:
    return f"?tenant_id={TENANT}&namespace_id={NS}{extra}"


def write_every_protocol(a: MeshNode, b: MeshNode, c: MeshNode) -> dict[str, tuple[str, bytes]]:
    """One artifact per protocol, each written on a different node. Returns
    ``name -> (read path, expected body)``."""
    blob = os.urandom(300_000)  # segment-stored, streamed by sendfile
    cas_id = hashlib.sha256(blob).hexdigest()
    assert a.session.post(a.url + f"/api/cache/cas/{cas_id}" + q(), data=blob).status_code == 204
    keyvalue = {"cas_id": "kv1", "entries": [{"value": "v1"}, {"value": "v2"}]}
    assert b.session.put(b.url + "/api/cache/keyvalue" + q(), json=keyvalue).status_code == 204
    module = os.urandom(70_000)
    start = c.session.post(c.url + "/api/cache/module/start" + q("&hash=h1&name=Mod.zip"))
    upload_id = start.json()["upload_id"]
    for n, part in enumerate((module[:40_000], module[40_000:]), start=1):
        r = c.session.post(c.url + f"/api/cache/module/part?upload_id={upload_id}&part_number={n}"
                           f"&tenant_id={TENANT}", data=part)
        assert r.status_code == 204
    r = c.session.post(c.url + f"/api/cache/module/complete?upload_id={upload_id}&tenant_id={TENANT}",
                       json={"parts": [1, 2]})
    assert r.status_code == 204
    gradle, nx, metro = os.urandom(5000), os.urandom(1_000_000), os.urandom(123)
    assert a.put(gradle_path("g1", NS), gradle).status_code == 201
    assert b.put(f"/v1/cache/nxhash{q()}", nx).status_code == 200
    assert c.put(f"/api/metro/cache/m1{q()}", metro).status_code == 200
    return {
        "xcode": (f"/api/cache/cas/{cas_id}" + q(), blob),
        "keyvalue": ("/api/cache/keyvalue/kv1" + q(), b'{"entries":[{"value":"v1"},{"value":"v2"}]}'),
        "module": ("/api/cache/module/x" + q("&hash=h1&name=Mod.zip"), module),
        "gradle": (gradle_path("g1", NS), gradle),
        "nx": (f"/v1/cache/nxhash{q()}", nx),
        "metro": (f"/api/metro/cache/m1{q()}", metro),
    }


def write_reapi(node: MeshNode) -> tuple[re_pb2.Digest, bytes, re_pb2.Digest]:
    reapi = Reapi.connect(int(node.node.env["KURA_GRPC_PORT"]))
    data = os.urandom(20_000)
    digest = digest_of(data)
    reapi.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name=NS, requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)]))
    action = digest_of(b"action-1")
    result = re_pb2.ActionResult(exit_code=0, output_files=[re_pb2.OutputFile(path="out", digest=digest)])
    reapi.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        instance_name=NS, action_digest=action, action_result=result))
    reapi.channel.close()
    return digest, data, action


def read_reapi(node: MeshNode, digest: re_pb2.Digest, action: re_pb2.Digest) -> tuple[bytes, int] | None:
    reapi = Reapi.connect(int(node.node.env["KURA_GRPC_PORT"]))
    try:
        chunks = reapi.bytestream.Read(bs_pb2.ReadRequest(resource_name=read_resource(digest, NS)))
        data = b"".join(c.data for c in chunks)
        result = reapi.ac.GetActionResult(re_pb2.GetActionResultRequest(instance_name=NS,
                                                                        action_digest=action))
        return data, len(result.output_files)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return None
    finally:
        reapi.channel.close()


def test_three_nodes_converge_on_every_protocol(tmp_path) -> None:
    a, b, c = mesh = make_mesh(tmp_path, ["a", "b", "c"])
    start(mesh)
    for member in mesh:
        doc = member.ready()
        assert doc["ready"] and sorted(doc["known_peers"]) == sorted(
            m.advertised for m in mesh if m is not member)
        assert doc["bootstrapped_peers"] == doc["known_peers"] and doc["generation"] >= 1
    expected = write_every_protocol(a, b, c)
    digest, data, action = write_reapi(a)

    def everywhere() -> bool:
        for member in mesh:
            for path, body in expected.values():
                r = member.get(path)
                if r.status_code != 200 or r.content != body:
                    return False
            if read_reapi(member, digest, action) != (data, 1):
                return False
        return True

    wait_until(everywhere, 20, "every protocol's artifact on every node")
    # Content types travel with the artifact.
    assert c.get(expected["keyvalue"][0]).headers["Content-Type"] == "application/json"
    wait_until(lambda: quiescent(mesh), 10, "empty outboxes")
    for member in mesh:
        assert member.metric("kura_replication_apply_results_total", source="replication",
                             outcome="applied") >= 1


def test_conflicts_and_namespace_clean_converge_also_after_a_bootstrap(tmp_path) -> None:
    a, b, c = mesh = make_mesh(tmp_path, ["a", "b", "c"])
    start(mesh)
    # The same mutable key written on two nodes at once converges to one value everywhere.
    barrier = threading.Barrier(2)

    def write(member: MeshNode, value: bytes) -> None:
        barrier.wait()
        assert member.put(gradle_path("mutable"), value).status_code in (200, 201)

    threads = [threading.Thread(target=write, args=(a, b"from-a")),
               threading.Thread(target=write, args=(b, b"from-b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_until(lambda: quiescent(mesh), 15, "conflict delivered")
    values = {m.get(gradle_path("mutable")).content for m in mesh}
    assert len(values) == 1 and values <= {b"from-a", b"from-b"}

    # A namespace clean on c while a and b keep writing into it.
    before = [f"before-{i}" for i in range(40)]
    for i, key in enumerate(before):
        assert (a if i % 2 else b).put(gradle_path(key, "churn"), key.encode()).status_code == 201
    stop = threading.Event()
    during: list[str] = []

    def churn() -> None:
        i = 0
        while not stop.is_set():
            key = f"during-{i}"
            (a if i % 2 else b).put(gradle_path(key, "churn"), key.encode())
            during.append(key)
            i += 1

    writer = threading.Thread(target=churn)
    writer.start()
    time.sleep(0.3)
    r = c.session.delete(c.url + f"/api/cache/clean?tenant_id={TENANT}&namespace_id=churn")
    assert r.status_code == 204
    time.sleep(0.3)
    stop.set()
    writer.join()
    time.sleep(0.01)
    after = [f"after-{i}" for i in range(20)]
    for i, key in enumerate(after):
        assert (a if i % 2 else b).put(gradle_path(key, "churn"), key.encode()).status_code == 201
    wait_until(lambda: quiescent(mesh), 20, "clean and writes delivered")

    def state(member: MeshNode) -> dict[str, bytes | None]:
        out = {}
        for key in before + during + after:
            r = member.get(gradle_path(key, "churn"))
            out[key] = r.content if r.status_code == 200 else None
        return out

    states = [state(m) for m in mesh]
    assert states[0] == states[1] == states[2]
    assert all(states[0][k] is None for k in before)  # older than the tombstone: gone
    assert all(states[0][k] == k.encode() for k in after)  # newer: kept
    # c loses its data and bootstraps it back: the same state, the tombstone included.
    c.node.stop()
    shutil.rmtree(c.node.data_dir)
    c.node.data_dir.mkdir()
    c.node.start()
    assert state(c) == states[0]
    doc = c.ready()
    assert doc["bootstrapped_peers"] == sorted([a.advertised, b.advertised])
    progress = {p["peer"]: p for p in doc["bootstrap_progress"]}
    assert progress[a.advertised]["phase"] == "done"
    assert sum(p["tombstones_applied"] for p in progress.values()) >= 1
    assert c.get(gradle_path("mutable")).content in values
