"""Resumable ByteStream writes across processes: a client killed mid-stream, a second REAPI
process of the same node resuming what the first one received."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from tests.reapi.reapi_client import Reapi, digest_of
from tests.reapi.reapi_process import REPO

MIB = 1024 * 1024


def committed(client: Reapi, resource: str) -> bs_pb2.QueryWriteStatusResponse:
    return client.bytestream.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=resource),
                                              timeout=30)


def start_stalled_writer(port: int, resource: str, data_path: Path, stop_at: int,
                         log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "tests.reapi.stalled_writer", str(port), resource,
                                 str(data_path), str(stop_at)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_committed(client: Reapi, resource: str, expected: int, writer: subprocess.Popen[bytes],
                   timeout: float = 60.0) -> None:
    """Until the server holds ``expected`` bytes of the stalled writer's upload."""
    deadline = time.monotonic() + timeout
    while True:
        assert writer.poll() is None, "the writer exited before it was killed"
        try:
            if committed(client, resource).committed_size == expected:
                return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        assert time.monotonic() < deadline, "the server never received the writer's bytes"
        time.sleep(0.1)


def resume(client: Reapi, resource: str, data: bytes, offset: int, chunk: int = MIB) -> int:
    requests = [bs_pb2.WriteRequest(resource_name=resource if start == offset else "", write_offset=start,
                                    data=data[start:start + chunk], finish_write=start + chunk >= len(data))
                for start in range(offset, len(data), chunk)]
    return client.bytestream.Write(iter(requests), timeout=120).committed_size


def kill_resume_and_check(writer_port: int, resume_client: Reapi, status_client: Reapi,
                          tmp_path: Path, instance: str) -> dict[str, int]:
    """SIGKILL a writer mid-upload; a new client asks the status and resumes at it."""
    data = os.urandom(12 * MIB + 12345)  # above the size adopted as a segment of its own
    d = digest_of(data)
    data_path = tmp_path / "blob.bin"
    data_path.write_bytes(data)
    resource = f"{instance}/uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"
    stop_at = 5 * MIB
    writer = start_stalled_writer(writer_port, resource, data_path, stop_at, tmp_path / "writer.log")
    try:
        wait_committed(status_client, resource, stop_at, writer)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    status = committed(resume_client, resource)
    assert (status.committed_size, status.complete) == (stop_at, False)
    assert resume_client.missing([d], instance) == [d]
    assert resume(resume_client, resource, data, status.committed_size) == len(data)
    assert resume_client.download(d, instance) == data
    assert status_client.download(d, instance) == data
    done = committed(status_client, resource)
    assert (done.committed_size, done.complete) == (len(data), True)
    return {"killed_at": stop_at, "resumed_from": status.committed_size, "size": len(data)}


def test_a_killed_clients_upload_is_resumed_through_another_reapi_process(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two REAPI processes on one data dir, as a node with several REAPI workers: the upload
    received by one is resumed through the other."""
    first = spawn()
    second = spawn()
    a, b = first.wait_listening(60), second.wait_listening(60)
    kill_resume_and_check(first.port, resume_client=b, status_client=a, tmp_path=tmp_path, instance="ci")
    assert os.listdir(tmp_path / "data" / "tmp" / "uploads") == []


def test_restart_at_zero_replaces_the_kept_bytes(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc = spawn()
    client = proc.wait_listening(60)
    data = os.urandom(3 * MIB)
    d = digest_of(data)
    resource = f"uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"
    junk = bs_pb2.WriteRequest(resource_name=resource, data=os.urandom(MIB))
    with pytest.raises(grpc.RpcError) as broken:
        client.bytestream.Write(iter([junk]), timeout=30)
    assert broken.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert committed(client, resource).committed_size == MIB
    assert resume(client, resource, data, 0) == len(data)
    assert client.download(d) == data
    missing = client.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=[d]), timeout=30)
    assert list(missing.missing_blob_digests) == []
