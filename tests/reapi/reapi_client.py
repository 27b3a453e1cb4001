"""A small REAPI test client: digests, stubs and ByteStream upload/download over a real channel."""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Iterator

import grpc

from app.reapi.capabilities import MAX_RECEIVE_MESSAGE_BYTES, MAX_SEND_MESSAGE_BYTES
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2_grpc as bs_grpc


def digest_of(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def upload_resource(digest: re_pb2.Digest, instance: str = "", blobs: str = "blobs") -> str:
    """A ByteStream write resource; ``blobs``: the segments before the digest, e.g.
    ``blobs/blake3`` or ``compressed-blobs/zstd``."""
    prefix = f"{instance}/" if instance else ""
    return f"{prefix}uploads/{uuid.uuid4()}/{blobs}/{digest.hash}/{digest.size_bytes}"


def read_resource(digest: re_pb2.Digest, instance: str = "", blobs: str = "blobs") -> str:
    """A ByteStream read resource (``blobs`` as for :func:`upload_resource`)."""
    prefix = f"{instance}/" if instance else ""
    return f"{prefix}{blobs}/{digest.hash}/{digest.size_bytes}"


def write_requests(data: bytes, resource: str, chunk: int = 64 * 1024,
                   finish: bool = True) -> Iterator[bs_pb2.WriteRequest]:
    if not data:
        yield bs_pb2.WriteRequest(resource_name=resource, finish_write=finish)
        return
    for offset in range(0, len(data), chunk):
        last = offset + chunk >= len(data)
        yield bs_pb2.WriteRequest(resource_name=resource if offset == 0 else "",
                                  write_offset=offset, data=data[offset:offset + chunk],
                                  finish_write=finish and last)


@dataclass
class Reapi:
    """Stubs over one channel to a running REAPI server."""

    channel: grpc.Channel
    port: int

    @classmethod
    def connect(cls, port: int, own_connection: bool = False) -> "Reapi":
        """``own_connection``: never share a connection with other channels to the port
        (grpcio does by default), so each client reaches a REAPI process of its own choosing."""
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}",
            # As large as the server may send and as large as it accepts.
            options=[("grpc.max_receive_message_length", MAX_SEND_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_RECEIVE_MESSAGE_BYTES),
                     ("grpc.use_local_subchannel_pool", int(own_connection))])
        return cls(channel, port)

    @property
    def cas(self) -> re_grpc.ContentAddressableStorageStub:
        return re_grpc.ContentAddressableStorageStub(self.channel)

    @property
    def ac(self) -> re_grpc.ActionCacheStub:
        return re_grpc.ActionCacheStub(self.channel)

    @property
    def capabilities(self) -> re_grpc.CapabilitiesStub:
        return re_grpc.CapabilitiesStub(self.channel)

    @property
    def bytestream(self) -> bs_grpc.ByteStreamStub:
        return bs_grpc.ByteStreamStub(self.channel)

    def upload(self, data: bytes, instance: str = "", chunk: int = 64 * 1024) -> re_pb2.Digest:
        digest = digest_of(data)
        response = self.bytestream.Write(write_requests(data, upload_resource(digest, instance), chunk),
                                         timeout=60)
        assert response.committed_size == len(data)
        return digest

    def download(self, digest: re_pb2.Digest, instance: str = "", offset: int = 0,
                 limit: int = 0) -> bytes:
        responses = self.bytestream.Read(bs_pb2.ReadRequest(
            resource_name=read_resource(digest, instance), read_offset=offset, read_limit=limit),
            timeout=60)
        return b"".join(r.data for r in responses)

    def missing(self, digests: list[re_pb2.Digest], instance: str = "") -> list[re_pb2.Digest]:
        response = self.cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(instance_name=instance, blob_digests=digests), timeout=30)
        return list(response.missing_blob_digests)

    def close(self) -> None:
        self.channel.close()
