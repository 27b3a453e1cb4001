"""The REAPI process as part of the real node: supervised by the gunicorn master."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import grpc
import requests

from tests.reapi.reapi_client import Reapi


def reapi_pid(node) -> int:
    out = subprocess.run(["pgrep", "-P", str(node.process.pid), "-f", "app.reapi"],
                         capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def wait_serving(port: int, timeout: float = 20.0) -> Reapi:
    deadline = time.monotonic() + timeout
    while True:
        client = Reapi.connect(port)
        try:
            grpc.channel_ready_future(client.channel).result(timeout=1)
            client.missing([])
            return client
        except (grpc.FutureTimeoutError, grpc.RpcError):
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_blob_survives_reapi_process_killed_and_restarted_by_master(node) -> None:
    port = int(node.env["KURA_GRPC_PORT"])
    client = wait_serving(port)
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = client.upload(data, instance="proj")
    assert client.missing([digest], instance="proj") == []
    client.close()

    old_pid = reapi_pid(node)
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        try:
            new_pid = reapi_pid(node)
            if new_pid != old_pid:
                break
        except AssertionError:
            pass
        assert time.monotonic() < deadline, "master did not restart the REAPI process"
        time.sleep(0.1)

    client = wait_serving(port)
    assert client.download(digest, instance="proj") == data
    client.close()
    text = requests.get(node.url + "/metrics").text
    assert 'kura_artifact_writes_total{producer="reapi"' in text
    assert "kura_grpc_requests_total" in text
