"""BLAKE3 digests alongside SHA256, against a real grpcio server."""
from __future__ import annotations

import os
import uuid

import blake3
import grpc
import pytest
import zstandard

from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from tests.reapi.conftest import RunningReapi
from tests.reapi.reapi_client import digest_of, read_resource, upload_resource, write_requests
from tests.reapi.test_bytestream import expect_code

BLAKE3 = re_pb2.DigestFunction.BLAKE3


def b3(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=blake3.blake3(data).hexdigest(), size_bytes=len(data))


def b3_upload(digest: re_pb2.Digest, instance: str = "") -> str:
    return upload_resource(digest, instance, "blobs/blake3")


def b3_read(digest: re_pb2.Digest, instance: str = "") -> str:
    return read_resource(digest, instance, "blobs/blake3")


def read_all(reapi: RunningReapi, resource: str) -> bytes:
    return b"".join(r.data for r in reapi.client.bytestream.Read(
        bs_pb2.ReadRequest(resource_name=resource), timeout=30))


def find_missing(reapi: RunningReapi, digests: list[re_pb2.Digest], function: int,
                 instance: str = "") -> list[re_pb2.Digest]:
    return list(reapi.client.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        instance_name=instance, blob_digests=digests, digest_function=function),
        timeout=30).missing_blob_digests)


def test_bytestream_blake3_blob_is_its_own_artifact(reapi: RunningReapi) -> None:
    data = os.urandom(700_000)
    d = b3(data)
    response = reapi.client.bytestream.Write(write_requests(data, b3_upload(d, "ci")), timeout=30)
    assert response.committed_size == len(data)
    assert read_all(reapi, b3_read(d, "ci")) == data
    assert find_missing(reapi, [d], BLAKE3, "ci") == []
    # The same bytes under SHA256 are another artifact, still missing.
    assert reapi.client.missing([digest_of(data)], "ci") == [digest_of(data)]
    # A BLAKE3 hash read as SHA256 (no function segment) names nothing stored.
    expect_code(grpc.StatusCode.NOT_FOUND, lambda: read_all(reapi, f"ci/blobs/{d.hash}/{d.size_bytes}"))
    # Compressed reads and writes combine with the function segment.
    compressed = f"ci/compressed-blobs/zstd/blake3/{d.hash}/{d.size_bytes}"
    assert zstandard.ZstdDecompressor().decompressobj().decompress(read_all(reapi, compressed)) == data
    other = os.urandom(1000)
    od = b3(other)
    assert reapi.client.bytestream.Write(iter([bs_pb2.WriteRequest(
        resource_name=f"ci/uploads/{uuid.uuid4()}/compressed-blobs/zstd/blake3/{od.hash}/{od.size_bytes}",
        data=zstandard.ZstdCompressor().compress(other), finish_write=True)]), timeout=30).committed_size > 0
    assert read_all(reapi, b3_read(od, "ci")) == other
    assert reapi.store.stats()["artifacts"] == 2


def test_blake3_write_is_verified_with_blake3(reapi: RunningReapi) -> None:
    data = os.urandom(10_000)
    sha_as_b3 = re_pb2.Digest(hash=digest_of(data).hash, size_bytes=len(data))
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, reapi.client.bytestream.Write,
                write_requests(data, b3_upload(sha_as_b3)), timeout=30)
    assert find_missing(reapi, [sha_as_b3], BLAKE3) == [sha_as_b3]
    # The empty blob is present under each function.
    empty = b3(b"")
    assert find_missing(reapi, [empty], BLAKE3) == []
    assert read_all(reapi, b3_read(empty)) == b""


def test_batches_and_action_cache_with_blake3(reapi: RunningReapi) -> None:
    blobs = [os.urandom(100), os.urandom(2000)]
    digests = [b3(b) for b in blobs]
    response = reapi.client.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        digest_function=BLAKE3,
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b) for d, b in zip(digests, blobs)]),
        timeout=30)
    assert [r.status.code for r in response.responses] == [0, 0]
    # The same request hashed as SHA256 does not match.
    wrong = reapi.client.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digests[0], data=blobs[0])]), timeout=30)
    assert wrong.responses[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    read = reapi.client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digest_function=BLAKE3, digests=digests), timeout=30)
    assert [r.data for r in read.responses] == blobs
    assert find_missing(reapi, digests, re_pb2.DigestFunction.SHA256) == digests

    action = b3(b"action")
    result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="out", digest=digests[1])])
    reapi.client.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=action, action_result=result, digest_function=BLAKE3), timeout=30)
    got = reapi.client.ac.GetActionResult(re_pb2.GetActionResultRequest(
        action_digest=action, digest_function=BLAKE3), timeout=30)
    assert got.output_files[0].digest == digests[1]
    expect_code(grpc.StatusCode.NOT_FOUND, reapi.client.ac.GetActionResult,
                re_pb2.GetActionResultRequest(action_digest=action), timeout=30)


@pytest.mark.parametrize("function", [re_pb2.DigestFunction.SHA1, re_pb2.DigestFunction.MD5,
                                      re_pb2.DigestFunction.SHA256TREE, 4242])
def test_unknown_digest_functions_are_invalid_argument(reapi: RunningReapi, function: int) -> None:
    d = b3(b"x")
    calls = [
        lambda: reapi.client.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            blob_digests=[d], digest_function=function), timeout=10),
        lambda: reapi.client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
            digests=[d], digest_function=function), timeout=10),
        lambda: reapi.client.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b"x")],
            digest_function=function), timeout=10),
        lambda: reapi.client.ac.GetActionResult(re_pb2.GetActionResultRequest(
            action_digest=d, digest_function=function), timeout=10),
        lambda: list(reapi.client.cas.GetTree(re_pb2.GetTreeRequest(
            root_digest=d, digest_function=function), timeout=10)),
    ]
    for call in calls:
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, call)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: read_all(reapi, f"blobs/md5/{d.hash}/1"))
