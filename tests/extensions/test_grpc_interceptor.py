"""The interceptor against a real in-process gRPC server on a free loopback port."""
from __future__ import annotations

from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest

from app.extensions.grpc_interceptor import ExtensionsInterceptor, current_principal

CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
WRITE = "/google.bytestream.ByteStream/Write"
HEALTH = "/grpc.health.v1.Health/Check"

SCRIPT = """
function authenticate(ctx)
  local token = ctx.headers.authorization
  if token == "Bearer rw" then return { principal = { id = "rw", kind = "t", attributes = { write = true } } } end
  if token == "Bearer ro" then return { principal = { id = "ro", kind = "t", attributes = { write = false } } } end
  if token == "Bearer busy" then return { deny = { status = 429, message = "busy" } } end
  if token == "Bearer down" then return { deny = { status = 503, message = "backend down" } } end
  return { deny = { status = 401, message = "who are you" } }
end
function authorize(ctx, principal)
  if ctx.namespace_id ~= "team-a" then return { deny = { status = 403, message = "namespace " .. tostring(ctx.namespace_id) } } end
  if ctx.tenant_id ~= nil and ctx.tenant_id ~= ctx.server_tenant_id then return { allow = false } end
  if ctx.operation == "artifact.write" and not principal.attributes.write then return { allow = false } end
  return { allow = true }
end"""


def _parse(data: bytes) -> SimpleNamespace:
    field, _, value = data.decode().partition("=")
    return SimpleNamespace(**{field: value})


@pytest.fixture
def channel(make_extensions):
    ext = make_extensions(SCRIPT, tenant_id="acme")

    def find_missing(request, context):
        return f"{current_principal().id}:{request.instance_name}".encode()

    def write(requests, context):
        names = [r.resource_name for r in requests]
        return f"{current_principal().id}:{len(names)}:{names[0]}".encode()

    handlers = {
        CAS: grpc.unary_unary_rpc_method_handler(find_missing, request_deserializer=_parse),
        WRITE: grpc.stream_unary_rpc_method_handler(write, request_deserializer=_parse),
        HEALTH: grpc.unary_unary_rpc_method_handler(lambda r, c: b"SERVING"),
    }

    class Generic(grpc.GenericRpcHandler):
        def service(self, details):
            return handlers.get(details.method)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=[ExtensionsInterceptor(ext, "acme", abort_on_deny=True)])
    server.add_generic_rpc_handlers((Generic(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    chan = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield chan
    chan.close()
    server.stop(0)


def _unary(channel, method, payload: bytes, token: str | None, extra=()):
    metadata = ([("authorization", token)] if token else []) + list(extra)
    return channel.unary_unary(method)(payload, metadata=metadata, timeout=10)


def test_unary_call_gets_namespace_from_instance_name(channel) -> None:
    assert _unary(channel, CAS, b"instance_name=team-a", "Bearer ro") == b"ro:team-a"
    with pytest.raises(grpc.RpcError) as info:
        _unary(channel, CAS, b"instance_name=team-b", "Bearer ro")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "team-b" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        _unary(channel, CAS, b"instance_name=", "Bearer ro")
    assert "default" in info.value.details()


@pytest.mark.parametrize("token,code", [
    (None, grpc.StatusCode.UNAUTHENTICATED), ("Bearer busy", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("Bearer down", grpc.StatusCode.UNAVAILABLE)])
def test_denials_map_to_grpc_codes(channel, token, code) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _unary(channel, CAS, b"instance_name=team-a", token)
    assert info.value.code() == code


def test_tenant_from_metadata(channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _unary(channel, CAS, b"instance_name=team-a", "Bearer ro", [("x-tuist-account-handle", "globex")])
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _unary(channel, CAS, b"instance_name=team-a", "Bearer ro", [("x-kura-tenant-id", "acme")]) == b"ro:team-a"


def test_stream_write_peeks_the_first_message(channel) -> None:
    call = channel.stream_unary(WRITE)
    chunks = [b"resource_name=team-a/uploads/u1/blobs/abc/3", b"resource_name=", b"resource_name="]
    assert call(iter(chunks), metadata=[("authorization", "Bearer rw")], timeout=10) == \
        b"rw:3:team-a/uploads/u1/blobs/abc/3"
    with pytest.raises(grpc.RpcError) as info:
        call(iter(chunks), metadata=[("authorization", "Bearer ro")], timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_health_is_not_hooked(channel) -> None:
    assert _unary(channel, HEALTH, b"", None) == b"SERVING"
