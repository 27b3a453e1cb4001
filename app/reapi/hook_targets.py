"""What each REAPI call asks for, as the extension hooks see it.

One ``RpcRule`` per served REAPI method: the hook ``route`` and ``operation``
(Kura's names, from ``kura/src/reapi``), and how the namespace, artifact key
and artifact hash are read from the call's (first) request message. They are
read with the very parsers the servicers use (``app.reapi.digests``), so the
hooks authorise exactly the namespace and blob the servicer then reads or
writes; a request those parsers reject raises ``BadRequest`` here, before any
hook runs.

Kura's choices kept here: every call carries the producer ``reapi`` and a
namespace (``instance_name``, empty → ``default``; for ByteStream the
resource's instance); ByteStream Read and QueryWriteStatus and the
ActionCache calls carry the artifact key and hash; ByteStream Write is
authorised per namespace (no key), though its ``response_headers`` call sees
the key; batch calls and FindMissingBlobs carry none (they name many blobs).

Probes (health, reflection: ``app.reapi.observer.PROBE_PREFIXES``) are never hooked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from app.extensions.context import CAPABILITIES_READ, INSPECT, READ, WRITE
from app.reapi.digests import (BlobDigest, namespace_for, parse_action, parse_read_resource,
                               parse_write_resource)
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2



@dataclass(frozen=True)
class Target:
    """The namespace and (for single-blob calls) the artifact a request names."""

    namespace: str
    artifact_key: str | None = None
    artifact_hash: str | None = None


@dataclass(frozen=True)
class RpcRule:
    """How the hooks see one REAPI method."""

    route: str
    operation: str
    target: Callable[[Any], Target]
    # False: ``authorize`` decides per namespace; the key reaches ``response_headers`` only.
    key_in_authorize: bool = True


def _instance(request: Any) -> Target:
    return Target(namespace_for(request.instance_name))


def _action(request: Any) -> Target:
    namespace, action = parse_action(request.instance_name, request.action_digest,
                                     request.digest_function)
    return Target(namespace, action.ac_key, action.hash)


def _blob(namespace: str, digest: BlobDigest) -> Target:
    return Target(namespace, digest.cas_key, digest.hash)


def _read_resource(request: bs_pb2.ReadRequest) -> Target:
    resource = parse_read_resource(request.resource_name)
    return _blob(resource.namespace, resource.digest)


def _write_resource(request: bs_pb2.WriteRequest | bs_pb2.QueryWriteStatusRequest) -> Target:
    resource = parse_write_resource(request.resource_name)
    return _blob(resource.namespace, resource.digest)


def _full_name(service: str, method: str) -> str:
    descriptor = (bs_pb2 if service == "ByteStream" else re_pb2).DESCRIPTOR.services_by_name[service]
    return f"/{descriptor.full_name}/{descriptor.methods_by_name[method].name}"


RULES: dict[str, RpcRule] = {
    _full_name("Capabilities", "GetCapabilities"): RpcRule("reapi.capabilities.get", CAPABILITIES_READ, _instance),
    _full_name("ActionCache", "GetActionResult"): RpcRule("reapi.action_cache.get", READ, _action),
    _full_name("ActionCache", "UpdateActionResult"): RpcRule("reapi.action_cache.update", WRITE, _action),
    _full_name("ContentAddressableStorage", "FindMissingBlobs"):
        RpcRule("reapi.cas.find_missing", INSPECT, _instance),
    _full_name("ContentAddressableStorage", "BatchUpdateBlobs"):
        RpcRule("reapi.cas.batch_update", WRITE, _instance),
    _full_name("ContentAddressableStorage", "BatchReadBlobs"): RpcRule("reapi.cas.batch_read", READ, _instance),
    # Kura does not serve GetTree; it reads directories of one namespace.
    _full_name("ContentAddressableStorage", "GetTree"): RpcRule("reapi.cas.get_tree", READ, _instance),
    _full_name("ByteStream", "Read"): RpcRule("reapi.bytestream.read", READ, _read_resource),
    _full_name("ByteStream", "Write"): RpcRule("reapi.bytestream.write", WRITE, _write_resource,
                                               key_in_authorize=False),
    _full_name("ByteStream", "QueryWriteStatus"):
        RpcRule("reapi.bytestream.query_write_status", INSPECT, _write_resource),
}
