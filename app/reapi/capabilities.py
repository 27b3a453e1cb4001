"""Capabilities service, and the limits the server advertises and enforces (SPEC §4).

The batch limit is sized so that a full BatchReadBlobs response (blob bytes plus
per-entry framing) still fits the 4 MiB default receive limit of gRPC clients.

Every request the server accepts must be answerable, so the send limit is derived from
the receive limit: a FindMissingBlobs answer lists at most the digests it was asked
about (100,000 digests are a 7 MB request and up to a 7 MB answer), and a batch answer
echoes its request's digests, adds at most a batch of blob bytes and one bounded status
per entry. GetTree pages hold at most a batch of directory bytes.
"""
from __future__ import annotations

import grpc

from app.reapi.compression import ADVERTISED as ADVERTISED_COMPRESSORS
from app.reapi.digests import DIGEST_FUNCTIONS, namespace_for
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from app.reapi.gen.build.bazel.semver import semver_pb2

MIB = 1024 * 1024
# Blob bytes of one BatchUpdateBlobs / BatchReadBlobs (advertised as max_batch_total_size_bytes).
MAX_BATCH_TOTAL_SIZE_BYTES = 3 * MIB
# Digests in one batch request: bounds the framing (~100 bytes per entry) of a batch response.
MAX_BATCH_ENTRIES = 8192
# A per-entry status message in a batch answer is cut to this many bytes.
MAX_STATUS_MESSAGE_BYTES = 200
# gRPC message limits. Receives: a full batch plus framing, FindMissingBlobs requests of
# very large actions (~75 bytes per digest) and UpdateActionResult documents. Sends: the
# largest answer to a request that was received (see the module docstring).
MAX_RECEIVE_MESSAGE_BYTES = MAX_BATCH_TOTAL_SIZE_BYTES + 13 * MIB
MAX_SEND_MESSAGE_BYTES = (MAX_RECEIVE_MESSAGE_BYTES + MAX_BATCH_TOTAL_SIZE_BYTES
                          + MAX_BATCH_ENTRIES * (MAX_STATUS_MESSAGE_BYTES + 56))
# ByteStream.Read chunk size: well under any client's receive limit.
READ_CHUNK_BYTES = 1 * MIB

LOW_API_VERSION = semver_pb2.SemVer(major=2, minor=0)
HIGH_API_VERSION = semver_pb2.SemVer(major=2, minor=3)


def server_capabilities() -> re_pb2.ServerCapabilities:
    """What this cache supports: SHA256 and BLAKE3 digests, zstd compressed blobs (ByteStream
    and batches), AC updates, no execution."""
    return re_pb2.ServerCapabilities(
        cache_capabilities=re_pb2.CacheCapabilities(
            digest_functions=DIGEST_FUNCTIONS,
            supported_compressors=ADVERTISED_COMPRESSORS,
            supported_batch_update_compressors=ADVERTISED_COMPRESSORS,
            action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(update_enabled=True),
            cache_priority_capabilities=re_pb2.PriorityCapabilities(
                priorities=[re_pb2.PriorityCapabilities.PriorityRange(min_priority=0, max_priority=0)]),
            max_batch_total_size_bytes=MAX_BATCH_TOTAL_SIZE_BYTES,
            symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED,
        ),
        low_api_version=LOW_API_VERSION,
        high_api_version=HIGH_API_VERSION,
    )


class CapabilitiesService(re_grpc.CapabilitiesServicer):
    """build.bazel.remote.execution.v2.Capabilities."""

    def GetCapabilities(self, request: re_pb2.GetCapabilitiesRequest,
                        context: grpc.ServicerContext) -> re_pb2.ServerCapabilities:
        namespace_for(request.instance_name)  # reject malformed instance names like other calls
        return server_capabilities()
