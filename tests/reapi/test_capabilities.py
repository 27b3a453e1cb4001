from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from app.reapi.capabilities import MAX_BATCH_TOTAL_SIZE_BYTES, MAX_SEND_MESSAGE_BYTES
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from tests.reapi.conftest import RunningReapi


def test_capabilities(reapi: RunningReapi) -> None:
    caps = reapi.client.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="x"))
    cache = caps.cache_capabilities
    assert list(cache.digest_functions) == [re_pb2.DigestFunction.SHA256, re_pb2.DigestFunction.BLAKE3]
    assert list(cache.supported_compressors) == [re_pb2.Compressor.ZSTD]
    assert list(cache.supported_batch_update_compressors) == [re_pb2.Compressor.ZSTD]
    assert cache.action_cache_update_capabilities.update_enabled
    assert 0 < cache.max_batch_total_size_bytes == MAX_BATCH_TOTAL_SIZE_BYTES < MAX_SEND_MESSAGE_BYTES
    assert cache.symlink_absolute_path_strategy == re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED
    assert (caps.low_api_version.major, caps.low_api_version.minor) == (2, 0)
    assert (caps.high_api_version.major, caps.high_api_version.minor) == (2, 3)


def test_capabilities_bad_instance(reapi: RunningReapi) -> None:
    with pytest.raises(grpc.RpcError) as err:
        reapi.client.capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="../x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(reapi: RunningReapi) -> None:
    health = health_pb2_grpc.HealthStub(reapi.client.channel)
    for service in ("", "build.bazel.remote.execution.v2.ContentAddressableStorage",
                    "google.bytestream.ByteStream"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(reapi.client.channel)
    responses = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"build.bazel.remote.execution.v2.ActionCache", "build.bazel.remote.execution.v2.Capabilities",
            "google.bytestream.ByteStream", "grpc.health.v1.Health"} <= names
    files = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="build.bazel.remote.execution.v2.ContentAddressableStorage")]), timeout=10))
    assert files[0].file_descriptor_response.file_descriptor_proto


def test_unimplemented_execution_service(reapi: RunningReapi) -> None:
    call = reapi.client.channel.unary_unary(
        "/build.bazel.remote.execution.v2.Execution/WaitExecution",
        request_serializer=lambda m: b"", response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        call(object(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_tenant_metadata(reapi: RunningReapi) -> None:
    """The node serves one tenant: ids use KURA_TENANT_ID; the header is validated, not trusted."""
    request = re_pb2.FindMissingBlobsRequest(blob_digests=[re_pb2.Digest(hash="a" * 64, size_bytes=1)])
    for header in ("x-kura-tenant-id", "x-tuist-account-handle"):
        reapi.client.cas.FindMissingBlobs(request, metadata=[(header, "acme")], timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            reapi.client.cas.FindMissingBlobs(request, metadata=[(header, "a/../b")], timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_draining_node_refuses_new_calls_but_answers_probes(reapi: RunningReapi) -> None:
    request = re_pb2.FindMissingBlobsRequest(blob_digests=[re_pb2.Digest(hash="a" * 64, size_bytes=1)])
    health = health_pb2_grpc.HealthStub(reapi.client.channel)
    reapi.node_state.set("draining", 1)
    try:
        reapi.server.follow_drain(True)
        with pytest.raises(grpc.RpcError) as err:
            reapi.client.cas.FindMissingBlobs(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        reapi.node_state.set("draining", 0)
        reapi.server.follow_drain(False)
    assert len(reapi.client.cas.FindMissingBlobs(request, timeout=10).missing_blob_digests) == 1
