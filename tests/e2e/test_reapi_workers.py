"""Several REAPI processes (KURA_GRPC_WORKERS) in one real node: they share the gRPC port,
each is supervised and drained like the single one was, /ready waits for all of them, and
no process outside the node can share the port with them."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from typing import Iterator

import grpc
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.node_state import KIND_REAPI, NodeState, state_path
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from app.run_dir import prometheus_dir
from tests.e2e.test_node_reapi import wait_serving
from tests.nodes import Node
from tests.reapi.reapi_client import Reapi, digest_of, upload_resource

# Connections the kernel spreads over the REAPI processes (SO_REUSEPORT hashes each one):
# with 2 processes, the chance that all of them land on the same one is 2 ** -23.
CONNECTIONS = 24
FIND_MISSING = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"


def reapi_pids(node: Node) -> list[int]:
    return sorted(node.children()["reapi"])


def serving_reapi(node: Node, count: int, timeout: float = 30.0) -> list[int]:
    """Wait until ``count`` REAPI processes are children of the master and the node is ready."""
    deadline = time.monotonic() + timeout
    while len(reapi_pids(node)) != count:
        assert time.monotonic() < deadline, f"{reapi_pids(node)}\n{node.log()}"
        time.sleep(0.05)
    node.wait_ready(max(1.0, deadline - time.monotonic()))
    return reapi_pids(node)


def calls_served(node: Node, pid: int, method: str) -> float:
    """``kura_grpc_requests_total{method}`` as process ``pid`` recorded it (its own file)."""
    from prometheus_client.mmap_dict import MmapedDict

    path = os.path.join(prometheus_dir(node.run_dir), f"counter_{pid}.db")
    if not os.path.exists(path):
        return 0.0
    total = 0.0
    for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(path):
        name, sample, labels, _help = json.loads(key)
        if sample == "kura_grpc_requests_total" and labels.get("method") == method:
            total += value
    return total


def test_calls_spread_over_every_reapi_process(node_factory) -> None:
    node = node_factory("spread", KURA_GRPC_WORKERS="2")
    pids = serving_reapi(node, 2)
    port = int(node.env["KURA_GRPC_PORT"])
    clients = [Reapi.connect(port, own_connection=True) for _ in range(CONNECTIONS)]
    try:
        for client in clients:
            assert client.missing([digest_of(b"nothing here")]) == [digest_of(b"nothing here")]
    finally:
        for client in clients:
            client.close()
    served = {pid: calls_served(node, pid, FIND_MISSING) for pid in pids}
    assert sum(served.values()) == CONNECTIONS and all(served.values()), served
    # And /metrics adds the processes up.
    text = requests.get(node.url + "/metrics", timeout=5).text
    samples = [sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "kura_grpc_requests_total"
               and sample.labels == {"method": FIND_MISSING, "code": "OK"}]
    assert samples == [CONNECTIONS], text


def test_killed_reapi_process_is_replaced_and_node_ready_again(node_factory) -> None:
    node = node_factory("replace", KURA_GRPC_WORKERS="2")
    pids = serving_reapi(node, 2)
    port = int(node.env["KURA_GRPC_PORT"])
    client = wait_serving(port)
    data = os.urandom(100_000)
    digest = client.upload(data, instance="p")
    client.close()

    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        now = reapi_pids(node)
        if len(now) == 2 and pids[0] not in now and pids[1] in now:
            break
        assert time.monotonic() < deadline, f"not replaced: {pids} -> {now}\n{node.log()}"
        time.sleep(0.05)
    node.wait_ready(30)
    clients = [Reapi.connect(port, own_connection=True) for _ in range(CONNECTIONS)]
    try:
        for one in clients:
            assert one.download(digest, instance="p") == data
    finally:
        for one in clients:
            one.close()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_every_reapi_process_dies_with_a_killed_master(node_factory) -> None:
    node = node_factory("orphans", KURA_GRPC_WORKERS="2")
    pids = serving_reapi(node, 2)
    node.process.kill()  # SIGKILL: the master runs no hook at all
    node.process.wait(10)
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, [pid for pid in pids if not _gone(pid)]
        time.sleep(0.05)


def test_port_shared_from_outside_holds_the_node_unready(node_factory) -> None:
    """The kernel lets any process of the same user join the port with SO_REUSEPORT: a REAPI
    process started while such a socket listens refuses to serve (it would split the
    traffic with it), and /ready says so, until the socket is gone."""
    node = node_factory("guard", KURA_GRPC_WORKERS="2")
    pids = serving_reapi(node, 2)
    port = int(node.env["KURA_GRPC_PORT"])
    intruder = socket.socket()
    intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    intruder.bind(("127.0.0.1", port))
    intruder.listen()
    try:
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "the gRPC port is also listened on by a process outside this node" not in node.log():
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.05)
        ready = requests.get(node.url + "/ready", timeout=5)
        assert ready.status_code == 503, ready.text
        assert ready.json()["reasons"] == ["REAPI processes serving: 1 of 2"]
    finally:
        intruder.close()
    # Restarted with backoff (0.5, 1, 2, ... s) until it binds alone with its sibling.
    serving_reapi(node, 2, timeout=60)


def test_second_node_on_the_same_grpc_port_fails_to_start(node_factory) -> None:
    first = node_factory("first", KURA_GRPC_WORKERS="2")
    pids = serving_reapi(first, 2)
    second = node_factory("second", start=False, KURA_GRPC_WORKERS="2",
                          KURA_GRPC_PORT=first.env["KURA_GRPC_PORT"])
    second.start(wait=False)
    assert second.process.wait(30) == 1, second.log()
    assert f"KURA_GRPC_PORT {first.env['KURA_GRPC_PORT']} is already in use" in second.log()
    assert reapi_pids(first) == pids
    client = wait_serving(int(first.env["KURA_GRPC_PORT"]))
    client.close()


def test_nodes_on_other_addresses_may_use_the_same_grpc_port(node_factory) -> None:
    """As pods of a StatefulSet on one host's loopback addresses: the guard looks only at
    sockets whose address overlaps the node's own."""
    first = node_factory("a", start=False, KURA_GRPC_WORKERS="2", KURA_BIND_HOST="127.0.0.2")
    second = node_factory("b", start=False, KURA_GRPC_WORKERS="2", KURA_BIND_HOST="127.0.0.3",
                          KURA_GRPC_PORT=first.env["KURA_GRPC_PORT"])
    for node in (first, second):
        node.start()
        serving_reapi(node, 2)
    for node in (first, second):
        channel = grpc.insecure_channel(node.grpc_target)
        try:
            stub = Reapi(channel, int(node.env["KURA_GRPC_PORT"]))
            assert stub.missing([digest_of(node.host.encode())]) == [digest_of(node.host.encode())]
        finally:
            channel.close()


def _held_write(port: int, release: threading.Event, outcomes: list) -> None:
    blob = os.urandom(150_000)
    client = Reapi.connect(port, own_connection=True)

    def messages() -> Iterator[bs_pb2.WriteRequest]:
        yield bs_pb2.WriteRequest(resource_name=upload_resource(digest_of(blob)),
                                  data=blob[:50_000])
        release.wait(60)
        yield bs_pb2.WriteRequest(write_offset=50_000, data=blob[50_000:], finish_write=True)

    try:
        outcomes.append(client.bytestream.Write(messages(), timeout=60).committed_size)
    except grpc.RpcError as exc:
        outcomes.append(repr(exc))
    finally:
        client.close()


def test_sigterm_drains_inflight_calls_in_every_reapi_process(node_factory) -> None:
    node = node_factory("drain", KURA_GRPC_WORKERS="2", KURA_DRAIN_COMPLETION_TIMEOUT_MS="20000")
    pids = serving_reapi(node, 2)
    port = int(node.env["KURA_GRPC_PORT"])
    release = threading.Event()
    outcomes: list = []
    threads = [threading.Thread(target=_held_write, args=(port, release, outcomes), daemon=True)
               for _ in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    state = NodeState(state_path(node.run_dir))
    try:
        deadline = time.monotonic() + 30
        while state.inflight(KIND_REAPI) != CONNECTIONS:
            assert time.monotonic() < deadline, (state.inflight(KIND_REAPI), node.log())
            time.sleep(0.05)
        held = {pid: state.inflight_of(pid) for pid in pids}
        assert all(held.values()), held
    finally:
        state.close()
    before = node.known_pids()
    signalled_at = time.monotonic()
    node.signal(signal.SIGTERM)
    node.wait_for(node.url + "/ready", status=503)
    release.set()
    for thread in threads:
        thread.join(60)
    assert outcomes == [150_000] * CONNECTIONS, outcomes
    node.expect_clean_stop(signalled_at, before)
