"""google.bytestream.ByteStream: Read, Write, QueryWriteStatus for CAS blobs.

Reads stream from the segment in ``READ_CHUNK_BYTES`` chunks and honour
``read_offset`` / ``read_limit``. Writes stream into a staging file while
hashing; offsets must be contiguous, and the size and sha256 are verified
before the blob becomes visible (``StagedBody.finish`` flushes the staged file,
then ``put_staged`` copies it into a segment and fdatasyncs before the LMDB
commit). A write whose blob is already stored ends early with
``committed_size = size``.
"""
from __future__ import annotations

from typing import Iterator

import grpc

from app.errors import BadRequest, NotFound, TruncatedBody
from app.reapi.cache import ReapiCache
from app.reapi.capabilities import READ_CHUNK_BYTES
from app.reapi.digests import parse_read_resource, parse_write_resource
from app.reapi.errors import OutOfRange
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2_grpc as bs_grpc


class ByteStreamService(bs_grpc.ByteStreamServicer):
    """google.bytestream.ByteStream over the REAPI CAS."""

    def __init__(self, cache: ReapiCache, chunk_size: int = READ_CHUNK_BYTES) -> None:
        self.cache = cache
        self.chunk_size = chunk_size

    def Read(self, request: bs_pb2.ReadRequest,
             context: grpc.ServicerContext) -> Iterator[bs_pb2.ReadResponse]:
        resource = parse_read_resource(request.resource_name)
        if request.read_offset < 0:
            raise BadRequest("read_offset must not be negative")
        if request.read_limit < 0:
            raise BadRequest("read_limit must not be negative")
        size = resource.digest.size
        if request.read_offset > size:
            # A missing blob is NOT_FOUND whatever the offset.
            self.cache.locate(resource.namespace, resource.digest)
            raise OutOfRange(f"read_offset {request.read_offset} is past the end of the "
                             f"{size}-byte blob")
        remaining = size - request.read_offset
        limit = remaining if request.read_limit == 0 else min(request.read_limit, remaining)
        sent = False
        chunks = self.cache.read_chunks(resource.namespace, resource.digest, request.read_offset,
                                        limit, self.chunk_size)
        for chunk in chunks:
            sent = True
            yield bs_pb2.ReadResponse(data=chunk)
        if not sent:
            yield bs_pb2.ReadResponse()

    def Write(self, request_iterator: Iterator[bs_pb2.WriteRequest],
              context: grpc.ServicerContext) -> bs_pb2.WriteResponse:
        first = next(request_iterator, None)
        if first is None:
            raise BadRequest("Write stream carried no request")
        resource = parse_write_resource(first.resource_name)
        digest = resource.digest
        if first.write_offset != 0:
            raise BadRequest("write_offset of a new upload must be 0 (uploads are not resumable)")
        if self.cache.contains(resource.namespace, digest):
            self.cache.note_existing_write()
            return bs_pb2.WriteResponse(committed_size=digest.size)
        self.cache.check_write_budget()
        with self.cache.stage(digest) as staged:
            request = first
            while True:
                if request.resource_name and request.resource_name != first.resource_name:
                    raise BadRequest("resource_name changed in the middle of a write")
                if request.write_offset != staged.size:
                    raise BadRequest(f"write_offset {request.write_offset} is not contiguous: "
                                     f"{staged.size} bytes received so far")
                staged.write(request.data)
                if request.finish_write:
                    break
                request = next(request_iterator, None)
                if request is None:
                    raise TruncatedBody(f"Write stream ended without finish_write after "
                                        f"{staged.size} of {digest.size} bytes")
            self.cache.put_staged(resource.namespace, digest, staged)
        return bs_pb2.WriteResponse(committed_size=digest.size)

    def QueryWriteStatus(self, request: bs_pb2.QueryWriteStatusRequest,
                         context: grpc.ServicerContext) -> bs_pb2.QueryWriteStatusResponse:
        """Complete when the blob is stored; otherwise NOT_FOUND, as Kura answers.

        Partial uploads are never kept once their stream ends (writes are not
        resumable), so an upload that did not finish is unknown here and the
        client restarts it from offset 0.
        """
        resource = parse_write_resource(request.resource_name)
        if not self.cache.contains(resource.namespace, resource.digest):
            raise NotFound(f"No finished upload or stored blob for {resource.digest}")
        return bs_pb2.QueryWriteStatusResponse(committed_size=resource.digest.size, complete=True)
