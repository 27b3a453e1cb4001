"""ContentAddressableStorage service: FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, GetTree.

Batches are bounded by the advertised ``max_batch_total_size_bytes`` (blob
bytes) and ``MAX_BATCH_ENTRIES`` (framing), so every response fits the message
limits. Per-blob failures inside a batch carry their own status, produced by
the same ``status_for`` mapping as whole-call failures.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import grpc
from google.protobuf.message import DecodeError

from app.errors import BadRequest, DigestMismatch, KuraError, NotFound, TooLarge
from app.reapi.cache import ReapiCache
from app.reapi.capabilities import (MAX_BATCH_ENTRIES, MAX_BATCH_TOTAL_SIZE_BYTES,
                                    MAX_STATUS_MESSAGE_BYTES)
from app.reapi.compression import (IDENTITY, ZSTD, compress, compressor_from_enum,
                                   decompress_bounded, to_enum)
from app.reapi.digests import (BlobDigest, digest_function_for, namespace_for, parse_digest,
                               parse_digests)
from app.reapi.errors import status_for
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from app.reapi.gen.google.rpc import status_pb2
from app.storage.content_digests import hexdigest
from app.storage.keys import parse_decimal

DEFAULT_TREE_PAGE_SIZE = 1000
MAX_TREE_PAGE_SIZE = 10000
MAX_PAGE_TOKEN = 10**12 - 1  # a position in the walk
# Decompressed bytes of one BatchUpdateBlobs (the announced sizes of its compressed entries
# count): bounds the memory a batch of small zstd payloads can expand to.
MAX_BATCH_DECOMPRESSED_BYTES = 16 * MAX_BATCH_TOTAL_SIZE_BYTES


_OK = status_pb2.Status(code=grpc.StatusCode.OK.value[0])


def _status(exc: BaseException | None = None) -> status_pb2.Status:
    """A batch entry's status; its message is bounded (the send limit counts on it)."""
    if exc is None:
        return _OK
    code, message = status_for(exc)
    message = message.encode()[:MAX_STATUS_MESSAGE_BYTES].decode(errors="ignore")
    return status_pb2.Status(code=code.value[0], message=message)


def _check_entries(count: int) -> None:
    if count > MAX_BATCH_ENTRIES:
        raise BadRequest(f"Too many blobs in one batch: {count} > {MAX_BATCH_ENTRIES}")


class CasService(re_grpc.ContentAddressableStorageServicer):
    """build.bazel.remote.execution.v2.ContentAddressableStorage."""

    def __init__(self, cache: ReapiCache) -> None:
        self.cache = cache

    def FindMissingBlobs(self, request: re_pb2.FindMissingBlobsRequest,
                         context: grpc.ServicerContext) -> re_pb2.FindMissingBlobsResponse:
        namespace = namespace_for(request.instance_name)
        digests = parse_digests(request.blob_digests, "blob digest",
                                digest_function_for(request.digest_function))
        missing = self.cache.missing(namespace, digests)
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=[d.to_proto() for d in missing])

    def BatchUpdateBlobs(self, request: re_pb2.BatchUpdateBlobsRequest,
                         context: grpc.ServicerContext) -> re_pb2.BatchUpdateBlobsResponse:
        namespace = namespace_for(request.instance_name)
        function = digest_function_for(request.digest_function)
        # Each entry's wrapper and bytes are taken once: every access copies them.
        entries = list(request.requests)
        _check_entries(len(entries))
        sent = [entry.data for entry in entries]
        total = sum(map(len, sent))
        if total > MAX_BATCH_TOTAL_SIZE_BYTES:
            raise BadRequest(f"Batch of {total} bytes exceeds max_batch_total_size_bytes "
                             f"({MAX_BATCH_TOTAL_SIZE_BYTES})")
        expanded = sum(max(0, e.digest.size_bytes) for e in entries
                       if e.compressor != re_pb2.Compressor.IDENTITY)
        if expanded > MAX_BATCH_DECOMPRESSED_BYTES:
            raise BadRequest(f"Compressed blobs of {expanded} bytes in one batch exceed "
                             f"{MAX_BATCH_DECOMPRESSED_BYTES} bytes")
        self.cache.check_write_budget()
        parsed: list[BlobDigest | BaseException] = []
        datas: list[bytes] = []
        for entry, data in zip(entries, sent):
            try:
                digest = parse_digest(entry.digest, "blob digest", function)
                datas.append(_decoded(entry.compressor, data, digest))
                parsed.append(digest)
            except BadRequest as exc:
                datas.append(b"")
                parsed.append(exc)
        present = {d for d in parsed if isinstance(d, BlobDigest)}
        present -= set(self.cache.missing(namespace, present))
        response = re_pb2.BatchUpdateBlobsResponse()
        add = response.responses.add
        to_store: list[tuple[BlobDigest, bytes]] = []
        stored_items = []
        existing = 0
        for entry, digest, data in zip(entries, parsed, datas):
            item = add(digest=entry.digest)
            if isinstance(digest, BaseException):
                item.status.CopyFrom(_status(digest))
            elif not _matches(data, digest):
                item.status.CopyFrom(_status(DigestMismatch(f"Blob data does not match digest {digest}")))
            elif digest in present:
                existing += 1
                item.status.SetInParent()  # OK: code 0, present on the wire as before
            else:
                to_store.append((digest, data))
                present.add(digest)
                stored_items.append(item)
        self.cache.note_existing_write(existing)
        if to_store:
            # One durable write for the whole batch: every blob in it succeeds or fails together.
            try:
                self.cache.put_many(namespace, to_store)
            except KuraError as exc:
                outcome = _status(exc)
                for item in stored_items:
                    item.status.CopyFrom(outcome)
            else:
                for item in stored_items:
                    item.status.SetInParent()
        return response

    def BatchReadBlobs(self, request: re_pb2.BatchReadBlobsRequest,
                       context: grpc.ServicerContext) -> re_pb2.BatchReadBlobsResponse:
        namespace = namespace_for(request.instance_name)
        function = digest_function_for(request.digest_function)
        requested = list(request.digests)
        _check_entries(len(requested))
        total = sum(max(0, d.size_bytes) for d in requested)
        if total > MAX_BATCH_TOTAL_SIZE_BYTES:
            raise BadRequest(f"Batch read of {total} bytes exceeds max_batch_total_size_bytes "
                             f"({MAX_BATCH_TOTAL_SIZE_BYTES})")
        # Compressors the client does not name, or this cache does not serve, are not used.
        zstd = to_enum(ZSTD) in request.acceptable_compressors
        parsed: list[BlobDigest | BadRequest] = []
        for digest in requested:
            try:
                parsed.append(parse_digest(digest, "blob digest", function))
            except BadRequest as exc:
                parsed.append(exc)
        bodies = iter(self.cache.read_many(namespace,
                                           [d for d in parsed if isinstance(d, BlobDigest)]))
        response = re_pb2.BatchReadBlobsResponse()
        add = response.responses.add
        for digest, outcome in zip(requested, parsed):
            if not isinstance(outcome, BadRequest):
                outcome = next(bodies)
            if isinstance(outcome, bytes):
                if zstd:
                    item = add(digest=digest, data=compress(outcome), compressor=to_enum(ZSTD))
                else:
                    item = add(digest=digest, data=outcome)
                item.status.SetInParent()  # OK: code 0, present on the wire as before
            else:
                add(digest=digest).status.CopyFrom(_status(outcome))
        return response

    def GetTree(self, request: re_pb2.GetTreeRequest,
                context: grpc.ServicerContext) -> Iterator[re_pb2.GetTreeResponse]:
        """Breadth-first, de-duplicated walk from the root, streamed in bounded pages.

        ``next_page_token`` is the position of the next directory in that walk,
        so a client may also resume a broken stream from any page. Directories
        missing below the root are omitted, as REAPI allows.
        """
        namespace = namespace_for(request.instance_name)
        root = parse_digest(request.root_digest, "root_digest",
                            digest_function_for(request.digest_function))
        if request.page_size < 0:
            raise BadRequest("page_size must not be negative")
        page_size = min(request.page_size or DEFAULT_TREE_PAGE_SIZE, MAX_TREE_PAGE_SIZE)
        start = _parse_page_token(request.page_token)
        page: list[re_pb2.Directory] = []
        page_bytes = 0
        position = 0
        for data, directory in self._walk(namespace, root):
            if position >= start:
                if page and (len(page) >= page_size or page_bytes + len(data) > MAX_BATCH_TOTAL_SIZE_BYTES):
                    yield re_pb2.GetTreeResponse(directories=page, next_page_token=str(position))
                    page, page_bytes = [], 0
                page.append(directory)
                page_bytes += len(data)
            position += 1
        if start > position:
            raise BadRequest("page_token is past the end of the tree")
        yield re_pb2.GetTreeResponse(directories=page)

    def _walk(self, namespace: str, root: BlobDigest) -> Iterator[tuple[bytes, re_pb2.Directory]]:
        queue = deque([root])
        seen = {root}
        while queue:
            digest = queue.popleft()
            if digest.size > MAX_BATCH_TOTAL_SIZE_BYTES:
                raise BadRequest(f"Directory {digest} is larger than a response page")
            try:
                data = self.cache.read_small(namespace, digest)
            except NotFound:
                if digest == root:
                    raise
                continue
            directory = re_pb2.Directory()
            try:
                directory.ParseFromString(data)
            except DecodeError:
                raise BadRequest(f"Blob {digest} is not a Directory message") from None
            for child in directory.directories:
                child_digest = parse_digest(child.digest, "child directory digest", root.function)
                if child_digest not in seen:
                    seen.add(child_digest)
                    queue.append(child_digest)
            yield data, directory


def _decoded(compressor: int, data: bytes, digest: BlobDigest) -> bytes:
    """An entry's blob bytes (``data`` as sent with ``compressor``), decompressed when it
    names a compressor (at most its digest's size: more is a mismatch)."""
    if compressor_from_enum(compressor) == IDENTITY:
        return data
    try:
        return decompress_bounded(data, digest.size)
    except TooLarge:
        raise DigestMismatch(f"Blob data does not match digest {digest}") from None


def _matches(data: bytes, digest: BlobDigest) -> bool:
    if len(data) != digest.size:
        return False
    return hexdigest(digest.function, data) == digest.hash


def _parse_page_token(token: str) -> int:
    if not token:
        return 0
    return parse_decimal(token, "page_token", maximum=MAX_PAGE_TOKEN)
