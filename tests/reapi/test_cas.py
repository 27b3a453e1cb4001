from __future__ import annotations

import hashlib
import os

import grpc
import pytest

from app.reapi.capabilities import MAX_BATCH_TOTAL_SIZE_BYTES
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.storage.keys import artifact_id
from tests.reapi.conftest import RunningReapi
from tests.reapi.reapi_client import digest_of

OK = grpc.StatusCode.OK.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
EMPTY = digest_of(b"")


def batch_update(reapi: RunningReapi, blobs: list[tuple[re_pb2.Digest, bytes]],
                 instance: str = "") -> list[int]:
    request = re_pb2.BatchUpdateBlobsRequest(instance_name=instance, requests=[
        re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=data) for d, data in blobs])
    return [r.status.code for r in reapi.client.cas.BatchUpdateBlobs(request, timeout=30).responses]


def test_find_missing_and_batch_update(reapi: RunningReapi) -> None:
    blobs = [os.urandom(100 + i) for i in range(5)]
    digests = [digest_of(b) for b in blobs]
    assert reapi.client.missing(digests + [EMPTY]) == digests  # empty blob is never missing
    assert batch_update(reapi, list(zip(digests[:3], blobs[:3]))) == [OK] * 3
    assert reapi.client.missing(digests) == digests[3:]
    assert reapi.client.missing(digests, instance="other") == digests  # instance = namespace
    # re-uploading an existing blob is fine
    assert batch_update(reapi, [(digests[0], blobs[0])]) == [OK]


def test_blob_is_the_spec_artifact(reapi: RunningReapi) -> None:
    data = b"shared artifact"
    d = digest_of(data)
    assert batch_update(reapi, [(d, data)], instance="ios/app") == [OK]
    located = reapi.store.lookup("reapi", "ios/app", f"blob/{d.hash}/{d.size_bytes}")
    assert located is not None and reapi.store.read_bytes(located) == data
    expected = hashlib.sha256(b"\0".join(
        [b"reapi", b"acme", b"ios/app", f"blob/{d.hash}/{d.size_bytes}".encode()])).digest()
    assert located.artifact_id == expected == artifact_id("reapi", "acme", "ios/app", located.manifest.key)
    # the empty instance name is the "default" namespace
    assert batch_update(reapi, [(d, data)]) == [OK]
    assert reapi.store.exists("reapi", "default", f"blob/{d.hash}/{d.size_bytes}")


def test_batch_update_rejects_wrong_digests_invisibly(reapi: RunningReapi) -> None:
    good = b"good"
    wrong_hash = re_pb2.Digest(hash=hashlib.sha256(b"other").hexdigest(), size_bytes=4)
    wrong_size = re_pb2.Digest(hash=hashlib.sha256(good).hexdigest(), size_bytes=5)
    malformed = re_pb2.Digest(hash="xyz", size_bytes=4)
    codes = batch_update(reapi, [(digest_of(good), good), (wrong_hash, good), (wrong_size, good),
                                 (malformed, good)])
    assert codes == [OK, INVALID, INVALID, INVALID]
    assert reapi.client.missing([wrong_hash, wrong_size]) == [wrong_hash, wrong_size]
    # a blob that exists is not "confirmed" by wrong data either
    assert batch_update(reapi, [(digest_of(good), b"bad!")]) == [INVALID]


def test_batch_limits(reapi: RunningReapi) -> None:
    big = b"x" * (MAX_BATCH_TOTAL_SIZE_BYTES // 2 + 1)
    with pytest.raises(grpc.RpcError) as err:
        batch_update(reapi, [(digest_of(big), big), (digest_of(big + b"y"), big + b"y")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = re_pb2.BatchReadBlobsRequest(digests=[
        re_pb2.Digest(hash="a" * 64, size_bytes=MAX_BATCH_TOTAL_SIZE_BYTES), digest_of(b"1")])
    with pytest.raises(grpc.RpcError) as err:
        reapi.client.cas.BatchReadBlobs(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        reapi.client.missing([re_pb2.Digest(hash="a" * 64, size_bytes=-1)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_full_batch_round_trip(reapi: RunningReapi) -> None:
    blobs = [os.urandom(MAX_BATCH_TOTAL_SIZE_BYTES // 4) for _ in range(4)]
    digests = [digest_of(b) for b in blobs]
    assert batch_update(reapi, list(zip(digests, blobs))) == [OK] * 4
    response = reapi.client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests), timeout=30)
    assert [r.data for r in response.responses] == blobs


def test_batch_read(reapi: RunningReapi) -> None:
    data = b"payload"
    d = digest_of(data)
    assert batch_update(reapi, [(d, data)]) == [OK]
    absent = digest_of(b"absent")
    response = reapi.client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[d, absent, EMPTY, re_pb2.Digest(hash="nothex", size_bytes=1)]), timeout=30)
    got = [(r.status.code, r.data) for r in response.responses]
    assert got == [(OK, data), (NOT_FOUND, b""), (OK, b""), (INVALID, b"")]
    assert [r.digest for r in response.responses][:2] == [d, absent]


def test_digest_hash_with_a_trailing_newline_is_invalid(reapi: RunningReapi) -> None:
    digest = digest_of(b"payload")
    with pytest.raises(grpc.RpcError) as err:
        reapi.client.missing([re_pb2.Digest(hash=digest.hash + "\n", size_bytes=digest.size_bytes)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_batch_read_in_any_order_of_blobs_written_together(reapi: RunningReapi) -> None:
    blobs = [os.urandom(50 + i) for i in range(8)]
    digests = [digest_of(b) for b in blobs]
    assert batch_update(reapi, list(zip(digests[:6], blobs[:6]))) == [OK] * 6
    assert batch_update(reapi, list(zip(digests[6:], blobs[6:]))) == [OK] * 2
    order = [7, 2, 0, 1, 2, 6, 5, 4, 3]
    response = reapi.client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[digests[i] for i in order]), timeout=30)
    assert [(r.status.code, r.digest, r.data) for r in response.responses] == [
        (OK, digests[i], blobs[i]) for i in order]
    assert all(r.HasField("status") for r in response.responses)


def _directory(files: dict[str, bytes], dirs: dict[str, re_pb2.Digest]) -> re_pb2.Directory:
    return re_pb2.Directory(
        files=[re_pb2.FileNode(name=n, digest=digest_of(b)) for n, b in sorted(files.items())],
        directories=[re_pb2.DirectoryNode(name=n, digest=d) for n, d in sorted(dirs.items())])


def test_get_tree_pages(reapi: RunningReapi) -> None:
    leaves = [_directory({f"f{i}": b"%d" % i}, {}) for i in range(5)]
    leaf_blobs = [leaf.SerializeToString(deterministic=True) for leaf in leaves]
    mid = _directory({}, {f"d{i}": digest_of(b) for i, b in enumerate(leaf_blobs)})
    mid_blob = mid.SerializeToString(deterministic=True)
    # the same subtree twice: returned once
    root = _directory({"r": b"r"}, {"a": digest_of(mid_blob), "b": digest_of(mid_blob)})
    root_blob = root.SerializeToString(deterministic=True)
    all_blobs = [root_blob, mid_blob, *leaf_blobs]
    assert batch_update(reapi, [(digest_of(b), b) for b in all_blobs]) == [OK] * 7

    pages = list(reapi.client.cas.GetTree(re_pb2.GetTreeRequest(
        root_digest=digest_of(root_blob), page_size=3), timeout=30))
    assert [len(p.directories) for p in pages] == [3, 3, 1]
    assert [p.next_page_token for p in pages][-1] == ""
    got = [d.SerializeToString(deterministic=True) for p in pages for d in p.directories]
    assert got == all_blobs
    # resume from a page token
    resumed = list(reapi.client.cas.GetTree(re_pb2.GetTreeRequest(
        root_digest=digest_of(root_blob), page_size=3, page_token=pages[0].next_page_token), timeout=30))
    assert [d for p in resumed for d in p.directories] == [d for p in pages[1:] for d in p.directories]


def test_get_tree_missing_parts(reapi: RunningReapi) -> None:
    child = _directory({"x": b"x"}, {}).SerializeToString()
    root = _directory({}, {"gone": digest_of(child)}).SerializeToString()
    assert batch_update(reapi, [(digest_of(root), root)]) == [OK]
    pages = list(reapi.client.cas.GetTree(re_pb2.GetTreeRequest(root_digest=digest_of(root)), timeout=30))
    assert [d.SerializeToString() for p in pages for d in p.directories] == [root]
    with pytest.raises(grpc.RpcError) as err:
        list(reapi.client.cas.GetTree(re_pb2.GetTreeRequest(root_digest=digest_of(child)), timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for bad in (re_pb2.GetTreeRequest(root_digest=digest_of(root), page_token="zz"),
                re_pb2.GetTreeRequest(root_digest=digest_of(root), page_token="99"),
                re_pb2.GetTreeRequest(root_digest=re_pb2.Digest(hash="1", size_bytes=1))):
        with pytest.raises(grpc.RpcError) as err:
            list(reapi.client.cas.GetTree(bad, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    not_a_directory = b"\xff\xff\xff"
    assert batch_update(reapi, [(digest_of(not_a_directory), not_a_directory)]) == [OK]
    with pytest.raises(grpc.RpcError) as err:
        list(reapi.client.cas.GetTree(re_pb2.GetTreeRequest(root_digest=digest_of(not_a_directory)),
                                      timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
