"""google.bytestream.ByteStream: Read, Write, QueryWriteStatus for CAS blobs.

Reads stream from the segment in ``READ_CHUNK_BYTES`` chunks and honour
``read_offset`` / ``read_limit``; a ``compressed-blobs/zstd/...`` read streams the
zstd form of the stored bytes from ``read_offset`` (uncompressed, as REAPI says;
``read_limit`` must be 0).

Writes are resumable. The bytes an upload has received are kept (uncompressed) in
the node's partial-upload area (``app.storage.partial_uploads``), keyed by the upload
name, so a write cut short by a dead client or a dead process is continued by the
next call for the same resource, in any REAPI process of the node:
QueryWriteStatus reports the kept bytes, and a Write whose first ``write_offset``
equals them appends the rest (0 starts over). For a compressed upload the first
offset is in uncompressed bytes and later ones add the compressed bytes sent, as
REAPI specifies. Size and hash are verified over the whole blob before it becomes
visible; every received byte is in the staged file (``pwrite``, no buffer) before
``put_staged`` copies it into a segment and fdatasyncs it, then commits. A write whose
blob is already stored ends at once (``committed_size`` = size, or -1 when compressed).
"""
from __future__ import annotations

from typing import Iterator

import grpc

from app.errors import BadRequest, NotFound, TruncatedBody
from app.reapi.cache import ReapiCache
from app.reapi.capabilities import READ_CHUNK_BYTES
from app.reapi.compression import IDENTITY, Decompressing, compress_chunks
from app.reapi.digests import WriteResource, parse_read_resource, parse_write_resource
from app.reapi.errors import OutOfRange
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2_grpc as bs_grpc
from app.storage.partial_uploads import PartialUpload

# A compressed upload whose blob turned out to be stored already (REAPI).
COMPRESSED_EXISTING_COMMITTED_SIZE = -1


class StreamBrokenOff(TruncatedBody):
    """A Write stream that ended without ``finish_write``: its bytes are kept."""


class OutOfSequence(BadRequest):
    """A write request that does not continue the upload: refused, the upload is kept."""


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
        compressed = resource.compressor != IDENTITY
        if compressed and request.read_limit:
            raise BadRequest("read_limit must be 0 for a compressed-blobs read")
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
        if compressed:
            chunks = compress_chunks(chunks)
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
        compressed = resource.compressor != IDENTITY
        if first.write_offset < 0:
            raise BadRequest("write_offset must not be negative")
        if self.cache.contains(resource.namespace, digest):
            self.cache.note_existing_write()
            return bs_pb2.WriteResponse(
                committed_size=COMPRESSED_EXISTING_COMMITTED_SIZE if compressed else digest.size)
        self.cache.check_write_budget()
        with self.cache.resume_upload(resource) as upload:
            try:
                received = self._receive(first, request_iterator, resource, upload)
                self.cache.put_staged(resource.namespace, digest, upload.body)
            except (StreamBrokenOff, grpc.RpcError, OutOfSequence):
                raise  # the client went away or misplaced a request: keep what it sent
            except BaseException:
                upload.discard()  # refused, unusable or over budget: nothing worth keeping
                raise
            upload.discard()  # published
        return bs_pb2.WriteResponse(committed_size=received)

    @staticmethod
    def _receive(first: bs_pb2.WriteRequest, request_iterator: Iterator[bs_pb2.WriteRequest],
                 resource: WriteResource, upload: PartialUpload) -> int:
        """Append the stream to the upload until ``finish_write``; returns the offset after
        the last request (the committed size in the stream's own units). A stream that
        ends early raises ``StreamBrokenOff`` (a cancelled one ``grpc.RpcError``)."""
        body = upload.body
        if first.write_offset == 0:
            body.restart()
        elif first.write_offset == body.size:
            body.hash_existing()
        else:
            raise OutOfSequence(f"write_offset {first.write_offset} does not resume the upload: "
                             f"{body.size} bytes are committed")
        sink = body if resource.compressor == IDENTITY else Decompressing(body)
        offset = first.write_offset
        request = first
        while True:
            if request.resource_name and request.resource_name != first.resource_name:
                raise OutOfSequence("resource_name changed in the middle of a write")
            if request.write_offset != offset:
                raise OutOfSequence(f"write_offset {request.write_offset} is not contiguous: "
                                 f"expected {offset}")
            sink.write(request.data)
            offset += len(request.data)
            if request.finish_write:
                return offset
            request = next(request_iterator, None)
            if request is None:
                raise StreamBrokenOff(f"Write stream ended without finish_write after "
                                      f"{body.size} of {resource.digest.size} bytes (kept: "
                                      f"resume at write_offset {body.size})")

    def QueryWriteStatus(self, request: bs_pb2.QueryWriteStatusRequest,
                         context: grpc.ServicerContext) -> bs_pb2.QueryWriteStatusResponse:
        """Complete when the blob is stored; the kept bytes of an unfinished upload (in
        uncompressed bytes, whatever the compressor); NOT_FOUND when neither exists."""
        resource = parse_write_resource(request.resource_name)
        if self.cache.contains(resource.namespace, resource.digest):
            return bs_pb2.QueryWriteStatusResponse(committed_size=resource.digest.size, complete=True)
        committed = self.cache.committed_upload_bytes(resource)
        if committed is None:
            raise NotFound(f"No upload in progress and no stored blob for {resource.digest}")
        return bs_pb2.QueryWriteStatusResponse(committed_size=committed, complete=False)
