"""Bytes that are not a request message, sent to every served method over a real grpcio
channel (identity serializers): INVALID_ARGUMENT, never INTERNAL."""
from __future__ import annotations

import random
from typing import Any, Callable

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from app.reapi.server import CACHE_SERVICES
from app.settings import Settings
from tests.reapi.conftest import RunningReapi

ALL_DESCRIPTORS = [re_pb2.DESCRIPTOR, bs_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR]
SERVED = (*CACHE_SERVICES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
METHODS = [method for descriptor in ALL_DESCRIPTORS for service in descriptor.services_by_name.values()
           if service.full_name in SERVED for method in service.methods]
LONG_LIVED = {"/grpc.health.v1.Health/Watch"}  # a request that decodes streams until cancelled


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def undecodable(method: MethodDescriptor) -> dict[str, bytes]:
    """Payloads that are not a message of the method's request type."""
    payloads = {"truncated tag": b"\xff", "length past the end": b"\x0a\x05ab"}
    strings = [f for f in method.input_type.fields if f.type == FieldDescriptor.TYPE_STRING]
    if strings:  # the first string field, holding bytes that are not UTF-8
        assert strings[0].number < 16
        payloads["invalid UTF-8"] = bytes([strings[0].number << 3 | 2, 2]) + b"\xc3\x28"
    return payloads


def call(channel: grpc.Channel, method: MethodDescriptor, payload: bytes, timeout: float) -> grpc.StatusCode:
    """Send ``payload`` as the request (the only message of a request stream); the status."""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    stub: Callable[..., Any] = kind[method.client_streaming, method.server_streaming](path(method))
    request = iter([payload]) if method.client_streaming else payload
    try:
        answer = stub(request, timeout=timeout)
        if method.server_streaming:
            list(answer)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture(params=["plain", "hooked"])
def server(request: Any, reapi_settings: Settings, start_reapi: Any, tmp_path: Any) -> RunningReapi:
    if request.param == "plain":
        return start_reapi(reapi_settings)
    script = tmp_path / "hooks.lua"
    script.write_text("function authenticate(ctx) return {anonymous = true} end\n")
    return start_reapi(reapi_settings.with_overrides(
        extension_script_path=str(script), kura_env={"KURA_EXTENSION_SCRIPT_PATH": str(script)}))


def test_undecodable_requests_are_invalid_argument(server: RunningReapi) -> None:
    channel = server.client.channel
    got = {}
    for method in METHODS:
        for name, payload in undecodable(method).items():
            got[path(method), name] = call(channel, method, payload, timeout=3)
    assert got == {key: grpc.StatusCode.INVALID_ARGUMENT for key in got}


def test_random_bytes_never_get_internal(server: RunningReapi) -> None:
    rng = random.Random(11)
    channel = server.client.channel
    seen: dict[str, set[grpc.StatusCode]] = {}
    for method in METHODS:
        if path(method) in LONG_LIVED:
            continue
        for _ in range(40):
            payload = rng.randbytes(rng.randrange(1, 64))
            seen.setdefault(path(method), set()).add(call(channel, method, payload, timeout=10))
    assert not {code for codes in seen.values() for code in codes} & {
        grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}, seen
