"""Every request the server accepts gets its answer (a real grpcio server and client)."""
from __future__ import annotations

import hashlib
import os

import grpc

from app.reapi.capabilities import (MAX_BATCH_ENTRIES, MAX_BATCH_TOTAL_SIZE_BYTES,
                                    MAX_RECEIVE_MESSAGE_BYTES)
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from tests.reapi.conftest import RunningReapi
from tests.reapi.reapi_client import digest_of

OK = grpc.StatusCode.OK.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
GRPC_DEFAULT_RECEIVE = 4 * 1024 * 1024


def test_find_missing_blobs_with_100000_digests_is_answered(reapi: RunningReapi) -> None:
    digests = [re_pb2.Digest(hash=hashlib.sha256(b"%d" % i).hexdigest(), size_bytes=1000 + i)
               for i in range(100_000)]
    request = re_pb2.FindMissingBlobsRequest(blob_digests=digests)
    assert 4 * 1024 * 1024 < request.ByteSize() < MAX_RECEIVE_MESSAGE_BYTES
    response = reapi.client.cas.FindMissingBlobs(request, timeout=120)
    assert len(response.missing_blob_digests) == len(digests)
    assert {d.hash for d in response.missing_blob_digests} == {d.hash for d in digests}


def test_batch_answers_echoing_a_request_at_the_receive_limit_are_sent(reapi: RunningReapi) -> None:
    # Each entry's digest is echoed in the answer with a status: a request of junk digests
    # just under the receive limit is answered entry by entry.
    junk = [re_pb2.Digest(hash="z" * 2000, size_bytes=1) for _ in range(MAX_BATCH_ENTRIES)]
    read = re_pb2.BatchReadBlobsRequest(digests=junk)
    update = re_pb2.BatchUpdateBlobsRequest(
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=d) for d in junk])
    assert MAX_RECEIVE_MESSAGE_BYTES - 1024 * 1024 < read.ByteSize() < MAX_RECEIVE_MESSAGE_BYTES
    for response in (reapi.client.cas.BatchReadBlobs(read, timeout=60),
                     reapi.client.cas.BatchUpdateBlobs(update, timeout=60)):
        assert [r.status.code for r in response.responses] == [INVALID] * MAX_BATCH_ENTRIES
        assert response.responses[0].digest == junk[0]


def test_the_advertised_batch_size_fits_a_client_with_default_limits(reapi: RunningReapi) -> None:
    caps = reapi.client.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    size = caps.cache_capabilities.max_batch_total_size_bytes
    assert size == MAX_BATCH_TOTAL_SIZE_BYTES
    # The worst case for framing: as many entries as a batch may have, sharing the bytes.
    blobs = [os.urandom(size // MAX_BATCH_ENTRIES) for _ in range(MAX_BATCH_ENTRIES)]
    digests = [digest_of(b) for b in blobs]
    with grpc.insecure_channel(f"127.0.0.1:{reapi.client.port}") as channel:  # 4 MiB receive limit
        cas = re_grpc.ContentAddressableStorageStub(channel)
        update = cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b) for d, b in zip(digests, blobs)]),
            timeout=60)
        assert [r.status.code for r in update.responses] == [OK] * len(blobs)
        read = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests), timeout=60)
        assert read.ByteSize() < GRPC_DEFAULT_RECEIVE
        assert [r.data for r in read.responses] == blobs
