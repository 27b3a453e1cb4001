"""ActionCache service: GetActionResult / UpdateActionResult.

Results are stored serialized under ``action_cache/{hash}/{size}``. A stored
result is only served while every blob it references is still in the CAS
(outputs, stdout/stderr, output directory trees and the files inside them):
the cache must never promise blobs it no longer has (SPEC §4).
"""
from __future__ import annotations

import logging

import grpc
from google.protobuf.message import DecodeError

from app.errors import BadRequest, NotFound
from app.reapi.cache import ReapiCache
from app.reapi.digests import BlobDigest, parse_action, parse_digest
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from app.storage.content_digests import SHA256

log = logging.getLogger("kura.reapi")

# Output-directory Tree blobs up to this size are opened to check the files inside them.
MAX_TREE_CHECK_BYTES = 16 * 1024 * 1024


def referenced_digests(result: re_pb2.ActionResult, function: str = SHA256) -> list[BlobDigest]:
    """Every blob an ActionResult points at directly, hashed with the action's digest
    ``function`` (raises BadRequest on a malformed one)."""
    refs = [parse_digest(f.digest, "output file digest", function) for f in result.output_files]
    refs += [parse_digest(d.tree_digest, "output directory tree digest", function)
             for d in result.output_directories]
    if result.HasField("stdout_digest"):
        refs.append(parse_digest(result.stdout_digest, "stdout digest", function))
    if result.HasField("stderr_digest"):
        refs.append(parse_digest(result.stderr_digest, "stderr digest", function))
    return refs


def tree_file_digests(tree: re_pb2.Tree, function: str = SHA256) -> list[BlobDigest]:
    """The file digests of every directory in an output directory Tree."""
    return [parse_digest(f.digest, "tree file digest", function)
            for directory in (tree.root, *tree.children) for f in directory.files]


class ActionCacheService(re_grpc.ActionCacheServicer):
    """build.bazel.remote.execution.v2.ActionCache."""

    def __init__(self, cache: ReapiCache) -> None:
        self.cache = cache

    def GetActionResult(self, request: re_pb2.GetActionResultRequest,
                        context: grpc.ServicerContext) -> re_pb2.ActionResult:
        namespace, action = parse_action(request.instance_name, request.action_digest,
                                         request.digest_function)
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(self.cache.get_action_result(namespace, action))
            refs = referenced_digests(result, action.function)
        except (DecodeError, BadRequest):
            log.warning("event=reapi_action_result_corrupt namespace=%s action=%s", namespace, action)
            self.cache.note_stale_action_result()
            raise NotFound(f"Action result for {action} not found") from None
        if self.cache.missing(namespace, refs) or self._tree_files_missing(namespace, result, action.function):
            self.cache.note_stale_action_result()
            raise NotFound(f"Action result for {action} references blobs that are no longer cached")
        return result

    def _tree_files_missing(self, namespace: str, result: re_pb2.ActionResult, function: str) -> bool:
        files: list[BlobDigest] = []
        for directory in result.output_directories:
            digest = parse_digest(directory.tree_digest, function=function)
            if digest.size > MAX_TREE_CHECK_BYTES:
                continue
            tree = re_pb2.Tree()
            try:
                tree.ParseFromString(self.cache.read_small(namespace, digest))
                files += tree_file_digests(tree, function)
            except (DecodeError, BadRequest, NotFound):
                return True
        return bool(files) and bool(self.cache.missing(namespace, files))

    def UpdateActionResult(self, request: re_pb2.UpdateActionResultRequest,
                           context: grpc.ServicerContext) -> re_pb2.ActionResult:
        namespace, action = parse_action(request.instance_name, request.action_digest,
                                         request.digest_function)
        referenced_digests(request.action_result, action.function)  # reject malformed digests before storing
        serialized = request.action_result.SerializeToString(deterministic=True)
        self.cache.put_action_result(namespace, action, serialized)
        return request.action_result
