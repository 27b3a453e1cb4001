"""The REAPI process as the gunicorn master runs it: ``python -m app.reapi`` with KURA_* env."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Iterator

import grpc
import pytest

from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from tests.reapi.reapi_client import Reapi, digest_of, upload_resource


def test_blobs_survive_kill_9_and_restart(spawn) -> None:  # type: ignore[no-untyped-def]
    first = spawn()
    client = first.wait_listening()
    big = os.urandom(5 * 1024 * 1024 + 7)
    small = b"small blob"
    big_digest = client.upload(big, instance="main", chunk=256 * 1024)
    small_digest = client.upload(small, instance="main")
    result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="o", digest=small_digest)])
    client.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        instance_name="main", action_digest=digest_of(b"act"), action_result=result), timeout=10)
    time.sleep(1.5)  # past the main loop's poll interval: the process must still be serving
    assert first.process.poll() is None, first.log_path.read_text()
    assert client.missing([small_digest], instance="main") == []
    first.process.send_signal(signal.SIGKILL)
    assert first.process.wait(10) == -signal.SIGKILL
    first.client.close()
    first.client = None

    second = spawn(port=first.port)
    client = second.wait_listening()
    assert client.missing([big_digest, small_digest], instance="main") == []
    assert client.download(big_digest, "main") == big
    assert client.download(small_digest, "main") == small
    got = client.ac.GetActionResult(re_pb2.GetActionResultRequest(
        instance_name="main", action_digest=digest_of(b"act")), timeout=10)
    assert got == result


def test_sigterm_finishes_inflight_write_then_exits_0(spawn) -> None:  # type: ignore[no-untyped-def]
    proc = spawn(KURA_DRAIN_COMPLETION_TIMEOUT_MS="20000")
    client = proc.wait_listening()
    data = os.urandom(200_000)
    digest = digest_of(data)
    first_sent = threading.Event()
    release = threading.Event()

    def requests() -> Iterator[bs_pb2.WriteRequest]:
        yield bs_pb2.WriteRequest(resource_name=upload_resource(digest), data=data[:1000])
        first_sent.set()
        release.wait(20)
        yield bs_pb2.WriteRequest(write_offset=1000, data=data[1000:], finish_write=True)

    future = client.bytestream.Write.future(requests(), timeout=30)
    assert first_sent.wait(10)
    time.sleep(0.3)  # the server has the stream open
    proc.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while "event=reapi_draining" not in proc.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    # draining: new calls are refused ...
    refused = Reapi.connect(proc.port)
    with pytest.raises(grpc.RpcError) as info:
        refused.missing([digest], instance="")
    # Closed, or its failed connection (grpcio shares it across channels to the same
    # address) makes the restarted server's first client below fail too.
    refused.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # ... while the in-flight write completes
    release.set()
    assert future.result().committed_size == len(data)
    assert proc.process.wait(20) == 0
    log = proc.log_path.read_text()
    assert "event=reapi_draining signal=SIGTERM" in log and "event=reapi_stopped" in log

    again = spawn(port=proc.port)
    assert again.wait_listening().download(digest) == data


def test_bad_config_and_busy_port_exit_1(spawn) -> None:  # type: ignore[no-untyped-def]
    bad = spawn(KURA_SEGMENT_MAX_BYTES="12")
    assert bad.process.wait(30) == 1
    assert "KURA_SEGMENT_MAX_BYTES" in bad.log_path.read_text()
    running = spawn()
    running.wait_listening()
    clash = spawn(port=running.port)
    assert clash.process.wait(30) == 1
    assert "event=reapi_bind_failed" in clash.log_path.read_text()
