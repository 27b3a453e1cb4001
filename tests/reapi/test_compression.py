"""zstd compressed-blobs over ByteStream and the CAS batch calls, against a real grpcio server."""
from __future__ import annotations

import hashlib
import os
from typing import Iterator

import grpc
import zstandard

from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from tests.reapi.conftest import RunningReapi
from tests.reapi.reapi_client import digest_of, read_resource, upload_resource
from tests.reapi.test_bytestream import expect_code

ZSTD = re_pb2.Compressor.ZSTD


def compressed_upload(digest: re_pb2.Digest, instance: str = "") -> str:
    return upload_resource(digest, instance, "compressed-blobs/zstd")


def compressed_read(digest: re_pb2.Digest, instance: str = "") -> str:
    return read_resource(digest, instance, "compressed-blobs/zstd")


def compressed_requests(wire: bytes, resource: str, first_offset: int = 0, chunk: int = 7_000,
                        finish: bool = True) -> list[bs_pb2.WriteRequest]:
    """REAPI: the first offset is uncompressed, later ones add the compressed bytes sent."""
    requests = []
    for start in range(0, len(wire), chunk):
        requests.append(bs_pb2.WriteRequest(
            resource_name=resource if start == 0 else "", write_offset=first_offset + start,
            data=wire[start:start + chunk], finish_write=finish and start + chunk >= len(wire)))
    return requests


def compressible(size: int) -> bytes:
    return (os.urandom(64) * (size // 64 + 1))[:size]


def test_zstd_write_is_stored_uncompressed_and_reads_both_ways(reapi: RunningReapi) -> None:
    data = compressible(1_500_000)
    d = digest_of(data)
    wire = zstandard.ZstdCompressor(level=3).compress(data)
    assert len(wire) < len(data) // 10
    response = reapi.client.bytestream.Write(iter(compressed_requests(wire, compressed_upload(d, "ci"))),
                                             timeout=30)
    assert response.committed_size == len(wire)
    # Stored as the digest names it: an identity read and the keyed size are the raw bytes.
    assert reapi.client.download(d, "ci") == data
    assert reapi.store.lookup("reapi", "ci", f"blob/{d.hash}/{d.size_bytes}").size == len(data)
    chunks = list(reapi.client.bytestream.Read(
        bs_pb2.ReadRequest(resource_name=compressed_read(d, "ci")), timeout=30))
    assert len(chunks) > 1  # streamed, not one message
    assert zstandard.ZstdDecompressor().decompressobj().decompress(b"".join(c.data for c in chunks)) == data
    # read_offset is in uncompressed bytes; a compressed read takes no read_limit.
    tail = b"".join(c.data for c in reapi.client.bytestream.Read(
        bs_pb2.ReadRequest(resource_name=compressed_read(d, "ci"), read_offset=1_000_000), timeout=30))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(tail) == data[1_000_000:]
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(reapi.client.bytestream.Read(
        bs_pb2.ReadRequest(resource_name=compressed_read(d, "ci"), read_limit=10), timeout=30)))


def test_zstd_write_of_several_frames_and_of_a_stored_blob(reapi: RunningReapi) -> None:
    data = os.urandom(300_000)
    d = digest_of(data)
    compressor = zstandard.ZstdCompressor()
    wire = compressor.compress(data[:100_000]) + compressor.compress(data[100_000:])
    assert reapi.client.bytestream.Write(iter(compressed_requests(wire, compressed_upload(d))),
                                         timeout=30).committed_size == len(wire)
    assert reapi.client.download(d) == data
    # REAPI: a compressed upload of a blob already stored ends at once with committed_size -1.
    again = reapi.client.bytestream.Write(iter(compressed_requests(wire, compressed_upload(d))), timeout=30)
    assert again.committed_size == -1


def test_corrupt_or_oversized_zstd_is_invalid_argument_and_stores_nothing(reapi: RunningReapi) -> None:
    data = compressible(200_000)
    d = digest_of(data)
    wire = zstandard.ZstdCompressor().compress(data)
    corrupt = wire[:20] + bytes(b ^ 0xFF for b in wire[20:60]) + wire[60:]
    cases = {
        "not zstd": os.urandom(5_000),
        "corrupt frame": corrupt,
        # Decompresses to more than the digest's size (a bomb is cut off at the size).
        "too large": zstandard.ZstdCompressor().compress(data + compressible(5_000_000)),
        "wrong content": zstandard.ZstdCompressor().compress(compressible(200_000)),
    }
    for case, payload in cases.items():
        resource = compressed_upload(d)
        details = expect_code(grpc.StatusCode.INVALID_ARGUMENT, reapi.client.bytestream.Write,
                              iter(compressed_requests(payload, resource, chunk=1_000)), timeout=30)
        assert details, case
        assert reapi.client.missing([d]) == [d], case
        # Unusable bytes are not kept for a resume either.
        expect_code(grpc.StatusCode.NOT_FOUND, reapi.client.bytestream.QueryWriteStatus,
                    bs_pb2.QueryWriteStatusRequest(resource_name=resource), timeout=10)
    assert reapi.store.stats()["artifacts"] == 0
    assert reapi.node_state.tmp_bytes() == 0


def test_compressed_write_resumes_at_the_uncompressed_offset(reapi: RunningReapi) -> None:
    """REAPI offsets: the status is in uncompressed bytes; the resumed stream compresses the rest
    and its first write_offset is that uncompressed size."""
    data = os.urandom(400_000)
    d = digest_of(data)
    resource = compressed_upload(d)
    first = zstandard.ZstdCompressor().compress(data[:150_000])
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, reapi.client.bytestream.Write,
                iter(compressed_requests(first, resource, finish=False)), timeout=30)
    status = reapi.client.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=resource), timeout=10)
    assert (status.committed_size, status.complete) == (150_000, False)
    rest = zstandard.ZstdCompressor().compress(data[150_000:])
    response = reapi.client.bytestream.Write(
        iter(compressed_requests(rest, resource, first_offset=150_000)), timeout=30)
    assert response.committed_size == 150_000 + len(rest)
    assert reapi.client.download(d) == data


def test_batch_update_and_read_with_zstd(reapi: RunningReapi) -> None:
    blobs = [compressible(50_000), os.urandom(3_000), b"x"]
    digests = [digest_of(b) for b in blobs]
    entries = [re_pb2.BatchUpdateBlobsRequest.Request(
        digest=d, data=zstandard.ZstdCompressor().compress(b), compressor=ZSTD)
        for d, b in zip(digests, blobs)]
    bad = digest_of(b"bad entry")
    entries.append(re_pb2.BatchUpdateBlobsRequest.Request(digest=bad, data=b"not zstd", compressor=ZSTD))
    entries.append(re_pb2.BatchUpdateBlobsRequest.Request(
        digest=digest_of(b"brotli"), data=b"brotli", compressor=re_pb2.Compressor.BROTLI))
    response = reapi.client.cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(instance_name="ci", requests=entries), timeout=30)
    codes = [r.status.code for r in response.responses]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert codes == [0, 0, 0, invalid, invalid]
    assert reapi.client.missing([*digests, bad], "ci") == [bad]
    read = reapi.client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        instance_name="ci", digests=digests, acceptable_compressors=[ZSTD]), timeout=30)
    for item, blob in zip(read.responses, blobs):
        assert item.status.code == 0 and item.compressor == ZSTD
        assert zstandard.ZstdDecompressor().decompressobj().decompress(item.data) == blob
    plain = reapi.client.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        instance_name="ci", digests=digests), timeout=30)
    assert [(r.compressor, r.data) for r in plain.responses] == [(re_pb2.Compressor.IDENTITY, b) for b in blobs]
    assert reapi.client.download(digests[0], "ci") == blobs[0]


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_large_zstd_blob_is_streamed_not_held_in_memory(spawn) -> None:  # type: ignore[no-untyped-def]
    """96 MiB that compress to almost nothing, written and read compressed through the REAPI
    process: its peak RSS grows by far less than the blob."""
    proc = spawn()
    client = proc.wait_listening(60)
    size = 96 * 1024 * 1024
    block = os.urandom(4096)
    hasher = hashlib.sha256()
    for _ in range(size // len(block)):
        hasher.update(block)
    d = re_pb2.Digest(hash=hasher.hexdigest(), size_bytes=size)
    client.missing([d])  # warm the process up before the baseline
    baseline = peak_rss_bytes(proc.process.pid)

    def wire() -> Iterator[bs_pb2.WriteRequest]:
        compressor = zstandard.ZstdCompressor(level=1).compressobj()
        resource, offset = compressed_upload(d), 0
        for _ in range(size // len(block)):
            out = compressor.compress(block)
            if out:
                yield bs_pb2.WriteRequest(resource_name=resource if offset == 0 else "",
                                          write_offset=offset, data=out)
                offset += len(out)
        yield bs_pb2.WriteRequest(resource_name=resource if offset == 0 else "", write_offset=offset,
                                  data=compressor.flush(), finish_write=True)

    assert client.bytestream.Write(wire(), timeout=120).committed_size > 0
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    check = hashlib.sha256()
    for response in client.bytestream.Read(bs_pb2.ReadRequest(resource_name=compressed_read(d)), timeout=120):
        check.update(decompressor.decompress(response.data))
    assert check.hexdigest() == d.hash
    assert peak_rss_bytes(proc.process.pid) - baseline < size // 3
