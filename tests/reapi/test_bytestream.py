from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client import REGISTRY

from app.node_state import KIND_REAPI
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from tests.reapi.conftest import RunningReapi
from tests.reapi.reapi_client import digest_of, read_resource, upload_resource, write_requests


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def expect_code(code: grpc.StatusCode, fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    assert err.value.code() == code, err.value.details()
    return err.value.details()


def test_write_then_read_multi_chunk(reapi: RunningReapi) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)  # several 1 MiB read chunks, many write chunks
    writes = sample("kura_artifact_writes_total", producer="reapi", result="ok")
    ok_writes = sample("kura_grpc_requests_total", method="/google.bytestream.ByteStream/Write", code="OK")
    d = reapi.client.upload(data, instance="ci", chunk=200_000)
    assert reapi.client.missing([d], instance="ci") == []
    responses = list(reapi.client.bytestream.Read(bs_pb2.ReadRequest(
        resource_name=read_resource(d, "ci")), timeout=30))
    assert len(responses) == 4 and max(len(r.data) for r in responses) == 1024 * 1024
    assert b"".join(r.data for r in responses) == data
    assert reapi.client.download(d, "ci", offset=1000, limit=5000) == data[1000:6000]
    assert reapi.client.download(d, "ci", offset=len(data) - 10, limit=1000) == data[-10:]
    assert reapi.client.download(d, "ci", offset=len(data)) == b""
    assert sample("kura_artifact_writes_total", producer="reapi", result="ok") == writes + 1
    assert sample("kura_grpc_requests_total", method="/google.bytestream.ByteStream/Write",
                  code="OK") == ok_writes + 1


def test_read_errors(reapi: RunningReapi) -> None:
    data = b"0123456789"
    d = reapi.client.upload(data)
    bs = reapi.client.bytestream
    misses = sample("kura_artifact_reads_total", producer="reapi", result="not_found")
    expect_code(grpc.StatusCode.NOT_FOUND, bs.Read,
                bs_pb2.ReadRequest(resource_name=read_resource(digest_of(b"nope"))), timeout=10)
    assert sample("kura_artifact_reads_total", producer="reapi", result="not_found") == misses + 1
    expect_code(grpc.StatusCode.NOT_FOUND, bs.Read,
                bs_pb2.ReadRequest(resource_name=read_resource(d, "elsewhere")), timeout=10)
    expect_code(grpc.StatusCode.OUT_OF_RANGE, bs.Read,
                bs_pb2.ReadRequest(resource_name=read_resource(d), read_offset=11), timeout=10)
    for bad in (bs_pb2.ReadRequest(resource_name=read_resource(d), read_offset=-1),
                bs_pb2.ReadRequest(resource_name=read_resource(d), read_limit=-1),
                bs_pb2.ReadRequest(resource_name=f"blobs/{d.hash}"),
                bs_pb2.ReadRequest(resource_name="../../etc/passwd")):
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, bs.Read, bad, timeout=10)


def test_empty_blob_always_present(reapi: RunningReapi) -> None:
    empty = digest_of(b"")
    assert reapi.client.download(empty) == b""
    assert reapi.client.missing([empty]) == []
    assert reapi.client.upload(b"") == empty
    status = reapi.client.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=upload_resource(empty)), timeout=10)
    assert (status.committed_size, status.complete) == (0, True)


def test_bad_writes_are_rejected_and_invisible(reapi: RunningReapi) -> None:
    bs = reapi.client.bytestream
    data = os.urandom(300_000)
    d = digest_of(data)
    wrong_hash = re_pb2.Digest(hash=hashlib.sha256(b"x").hexdigest(), size_bytes=len(data))
    short = re_pb2.Digest(hash=d.hash, size_bytes=len(data) - 1)
    long = re_pb2.Digest(hash=d.hash, size_bytes=len(data) + 1)
    for target in (wrong_hash, short, long):
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, bs.Write,
                    write_requests(data, upload_resource(target)), timeout=30)
    # gap in offsets
    gap = list(write_requests(data, upload_resource(d), chunk=100_000))
    gap[1].write_offset += 1
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, bs.Write, iter(gap), timeout=30)
    # resource changes mid-stream
    switch = list(write_requests(data, upload_resource(d), chunk=100_000))
    switch[1].resource_name = upload_resource(d)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, bs.Write, iter(switch), timeout=30)
    # stream ends without finish_write
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, bs.Write,
                write_requests(data, upload_resource(d), finish=False), timeout=30)
    # resuming at a non-zero offset is not supported
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, bs.Write,
                iter([bs_pb2.WriteRequest(resource_name=upload_resource(d), write_offset=5,
                                          data=b"x", finish_write=True)]), timeout=30)
    for bad_name in ("blobs/%s/%d" % (d.hash, len(data)), "uploads/x/blobs/zz/1", ""):
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, bs.Write,
                    iter([bs_pb2.WriteRequest(resource_name=bad_name, data=b"x", finish_write=True)]),
                    timeout=30)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, bs.Write, iter([]), timeout=30)
    assert reapi.client.missing([d, wrong_hash, short, long]) == [d, wrong_hash, short, long]
    expect_code(grpc.StatusCode.NOT_FOUND, reapi.client.download, d)
    # nothing left staged: the tmp budget is back to zero
    assert reapi.node_state.tmp_bytes() == 0
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, bs.QueryWriteStatus,
                bs_pb2.QueryWriteStatusRequest(resource_name="nonsense"), timeout=10)


def test_query_write_status_reports_kept_bytes_and_a_resumed_write_completes(reapi: RunningReapi) -> None:
    """Beyond Kura: an unfinished upload keeps its bytes; QueryWriteStatus reports them and
    a Write from that offset completes the blob. Unknown uploads stay NOT_FOUND."""
    bs = reapi.client.bytestream
    data = os.urandom(100_000)
    d = digest_of(data)
    never_sent = upload_resource(d)
    expect_code(grpc.StatusCode.NOT_FOUND, bs.QueryWriteStatus,
                bs_pb2.QueryWriteStatusRequest(resource_name=never_sent), timeout=10)
    broken_off = upload_resource(d)
    first_part = list(write_requests(data, broken_off, chunk=10_000, finish=False))[:4]
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, bs.Write, iter(first_part), timeout=30)
    status = bs.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=broken_off), timeout=10)
    assert (status.committed_size, status.complete) == (40_000, False)
    assert reapi.client.missing([d]) == [d]
    # Resuming anywhere but at the committed size is refused, and keeps the bytes.
    wrong = bs_pb2.WriteRequest(resource_name=broken_off, write_offset=30_000, data=data[30_000:])
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, bs.Write, iter([wrong]), timeout=30)
    rest = [bs_pb2.WriteRequest(resource_name=broken_off, write_offset=40_000, data=data[40_000:70_000]),
            bs_pb2.WriteRequest(write_offset=70_000, data=data[70_000:], finish_write=True)]
    assert bs.Write(iter(rest), timeout=30).committed_size == len(data)
    assert reapi.client.download(d) == data
    status = bs.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=broken_off), timeout=10)
    assert (status.committed_size, status.complete) == (len(data), True)
    assert reapi.store.stats()["artifacts"] == 1


def test_existing_blob_finishes_early(reapi: RunningReapi) -> None:
    data = os.urandom(500_000)
    d = reapi.client.upload(data)
    response = reapi.client.bytestream.Write(
        write_requests(data, upload_resource(d), chunk=50_000), timeout=30)
    assert response.committed_size == len(data)
    status = reapi.client.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=upload_resource(d)), timeout=10)
    assert (status.committed_size, status.complete) == (len(data), True)


def test_forty_concurrent_multi_chunk_writes(reapi: RunningReapi) -> None:
    """One Bazel action's worth of uploads at once: byte-exact and present immediately."""
    blobs = [os.urandom(150_000 + 997 * i) for i in range(40)]
    # a few identical blobs race with each other too
    blobs[39] = blobs[38]

    def upload_and_check(data: bytes) -> re_pb2.Digest:
        d = reapi.client.upload(data, instance="bazel", chunk=16 * 1024)
        assert reapi.client.missing([d], instance="bazel") == []  # visible on acknowledgement
        return d

    with ThreadPoolExecutor(max_workers=40) as pool:
        digests = list(pool.map(upload_and_check, blobs))
    assert reapi.client.missing(digests, instance="bazel") == []
    for data, d in zip(blobs, digests):
        assert reapi.client.download(d, "bazel") == data
    assert reapi.node_state.inflight(KIND_REAPI) == 0
    assert reapi.node_state.tmp_bytes() == 0


def test_256_concurrent_streams_are_served(reapi: RunningReapi) -> None:
    """Every one of 256 open write streams gets a server thread: none is refused or queued."""
    release = threading.Event()
    blobs = [b"stream-%d-" % i + os.urandom(64) for i in range(256)]

    def held_open(data: bytes):  # type: ignore[no-untyped-def]
        resource = upload_resource(digest_of(data))
        yield bs_pb2.WriteRequest(resource_name=resource, data=data[:10])
        release.wait(60)
        yield bs_pb2.WriteRequest(write_offset=10, data=data[10:], finish_write=True)

    futures = [reapi.client.bytestream.Write.future(held_open(b), timeout=90) for b in blobs]
    deadline = time.monotonic() + 60
    peak = 0
    while time.monotonic() < deadline:
        peak = max(peak, reapi.node_state.inflight(KIND_REAPI))
        if peak >= 256:
            break
        time.sleep(0.05)
    release.set()
    results = [f.result() for f in futures]
    assert peak >= 256
    assert [r.committed_size for r in results] == [len(b) for b in blobs]
    assert reapi.client.missing([digest_of(b) for b in blobs]) == []
    assert reapi.node_state.inflight(KIND_REAPI) == 0


def test_large_blob_streams_in_bounded_memory(reapi: RunningReapi) -> None:
    """64 MiB through Write and Read without the server holding it whole."""
    import resource

    chunk = os.urandom(1024 * 1024)
    total_chunks = 64
    digest_hash = hashlib.sha256()
    for _ in range(total_chunks):
        digest_hash.update(chunk)
    d = re_pb2.Digest(hash=digest_hash.hexdigest(), size_bytes=total_chunks * len(chunk))
    resource_name = upload_resource(d)

    def requests():  # type: ignore[no-untyped-def]
        for i in range(total_chunks):
            yield bs_pb2.WriteRequest(resource_name=resource_name if i == 0 else "",
                                      write_offset=i * len(chunk), data=chunk,
                                      finish_write=i == total_chunks - 1)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert reapi.client.bytestream.Write(requests(), timeout=60).committed_size == d.size_bytes
    seen = 0
    for response in reapi.client.bytestream.Read(
            bs_pb2.ReadRequest(resource_name=read_resource(d)), timeout=60):
        assert response.data == chunk
        seen += len(response.data)
    assert seen == d.size_bytes
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 48 * 1024, f"peak RSS grew by {grown_kib} KiB for a 64 MiB blob"


def test_tmp_budget_exhausted_is_resource_exhausted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app.node_state import NodeState, state_path
    from app.reapi.server import build_server
    from app.settings import Settings
    from app.storage.store import ArtifactStore
    from tests.reapi.reapi_client import Reapi

    settings = Settings(data_dir=str(tmp_path / "data"), tmp_dir_max_bytes=1024 * 1024,
                        node_url="http://self:7443")
    node_state = NodeState(state_path(settings.resolved_run_dir))
    store = ArtifactStore(settings, node_state=node_state)
    server = build_server(settings, store, node_state, host="127.0.0.1", port=0)
    client = Reapi.connect(server.port)
    try:
        data = os.urandom(3 * 1024 * 1024)
        d = digest_of(data)
        details = expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, client.bytestream.Write,
                              write_requests(data, upload_resource(d)), timeout=30)
        assert "KURA_TMP_DIR_MAX_BYTES" in details
        assert client.missing([d]) == [d]
        assert node_state.tmp_bytes() == 0
        assert client.upload(b"small still fits") == digest_of(b"small still fits")
    finally:
        client.close()
        server.stop(0)
        node_state.close()


def test_cancelled_write_leaves_nothing_behind(reapi: RunningReapi) -> None:
    data = os.urandom(2 * 1024 * 1024)
    d = digest_of(data)
    cancelled = sample("kura_grpc_requests_total", method="/google.bytestream.ByteStream/Write",
                       code="CANCELLED")
    first_sent = threading.Event()
    never = threading.Event()

    def requests():  # type: ignore[no-untyped-def]
        yield bs_pb2.WriteRequest(resource_name=upload_resource(d), data=data[:1024 * 1024])
        first_sent.set()
        never.wait(10)

    future = reapi.client.bytestream.Write.future(requests(), timeout=30)
    assert first_sent.wait(10)
    deadline = time.monotonic() + 10
    while reapi.node_state.tmp_bytes() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    future.cancel()
    never.set()
    deadline = time.monotonic() + 10
    while (reapi.node_state.inflight(KIND_REAPI) or reapi.node_state.tmp_bytes()) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reapi.node_state.inflight(KIND_REAPI) == 0
    assert reapi.node_state.tmp_bytes() == 0
    assert reapi.client.missing([d]) == [d]
    assert sample("kura_grpc_requests_total", method="/google.bytestream.ByteStream/Write",
                  code="CANCELLED") == cancelled + 1
