"""Lua hooks on the REAPI server exactly as production builds it.

Every test starts ``build_server`` (observer + extensions interceptor, real
grpcio, real Lua, real LMDB). What the hooks saw is recorded by the hook itself
through ``kura.http_json`` to a local HTTP server, so a test can prove a hook
ran, or never ran, and with which ``ctx``.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from app.reapi.hook_targets import RULES
from app.reapi.server import CACHE_SERVICES
from app.settings import Settings
from tests.extensions.conftest import FakeAuthService
from tests.reapi.conftest import RunningReapi
from tests.reapi.reapi_client import Reapi, digest_of, read_resource, upload_resource, write_requests

REPO = Path(__file__).resolve().parents[2]

# Records every hook call (ttl_seconds = 0: no decision is cached) and allows
# only the namespace "default"; response_headers echoes what it was told.
RECORDING = """
local function record(hook, ctx)
  kura.http_json("audit", { method = "POST", path = "/" .. hook, body = {
    transport = ctx.transport, route = ctx.route, method = ctx.method, operation = ctx.operation,
    producer = ctx.producer, server_tenant_id = ctx.server_tenant_id, tenant_id = ctx.tenant_id,
    namespace_id = ctx.namespace_id, artifact_key = ctx.artifact_key, artifact_hash = ctx.artifact_hash,
    status_code = ctx.status_code } })
end
function authenticate(ctx)
  record("authenticate", ctx)
  return { anonymous = true, ttl_seconds = 0 }
end
function authorize(ctx, principal)
  record("authorize", ctx)
  return { allow = ctx.namespace_id == "default", ttl_seconds = 0 }
end
function response_headers(ctx, principal)
  record("response_headers", ctx)
  return { headers = {
    ["x-kura-route"] = ctx.route,
    ["x-kura-status"] = tostring(ctx.status_code),
    ["x-kura-key"] = ctx.artifact_key or "none",
    ["grpc-status"] = "0",
    ["x-control-char"] = "a\\tb",
  } }
end
"""


class Audit:
    """The hook calls a recording script made, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.service = FakeAuthService(self._record)

    def _record(self, method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        self.calls.append((path.strip("/"), body))
        return 200, {}

    def hooks(self) -> list[str]:
        return [hook for hook, _ in self.calls]

    def seen(self, hook: str) -> dict[str, Any]:
        """The one ctx ``hook`` was called with since the last ``clear``."""
        matching = [ctx for name, ctx in self.calls if name == hook]
        assert len(matching) == 1, self.calls
        return matching[0]

    def clear(self) -> None:
        self.calls.clear()


@pytest.fixture
def audit() -> Iterator[Audit]:
    recorder = Audit()
    yield recorder
    recorder.service.close()


def hooked_settings(tmp_path: Path, script: str | Path, **env: str) -> Settings:
    if isinstance(script, str):
        path = tmp_path / "hooks.lua"
        path.write_text(script)
        script = path
    kura_env = {"KURA_EXTENSION_SCRIPT_PATH": str(script), **env}
    return Settings(data_dir=str(tmp_path / "data"), tenant_id="acme", bind_host="127.0.0.1",
                    grpc_port=0, node_url="http://self:7443", extension_script_path=str(script),
                    kura_env=kura_env)


@pytest.fixture
def recorded(tmp_path: Path, audit: Audit, start_reapi: Callable[[Settings], RunningReapi]) -> RunningReapi:
    """A REAPI server whose hooks record every call and allow only the namespace ``default``."""
    return start_reapi(hooked_settings(tmp_path, RECORDING,
                                       KURA_EXTENSION_HTTP_CLIENT_AUDIT_BASE_URL=audit.service.url))


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return info.value.code()


def compressed_read(digest: re_pb2.Digest, instance: str = "") -> str:
    return read_resource(digest, instance, "compressed-blobs/identity")


def compressed_upload(digest: re_pb2.Digest, instance: str = "") -> str:
    return upload_resource(digest, instance, "compressed-blobs/identity")


# -- the reproducer of issue 8 ------------------------------------------------------------

def test_namespace_policy_covers_compressed_blobs_resources(recorded: RunningReapi) -> None:
    """A policy that grants only ``default`` denies ``beta`` whatever the resource form."""
    bs = recorded.client.bytestream
    data = b"a blob for beta"
    digest = digest_of(data)
    key = f"blob/{digest.hash}/{digest.size_bytes}"

    assert code_of(lambda: bs.Write(write_requests(data, compressed_upload(digest, "beta")),
                                    timeout=30)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: bs.Write(write_requests(data, upload_resource(digest, "beta")),
                                    timeout=30)) == grpc.StatusCode.PERMISSION_DENIED
    assert not recorded.store.exists("reapi", "beta", key)

    # Stored in beta behind the hooks' back: still not readable through them.
    recorded.store.put_bytes("reapi", "beta", key, data, "application/octet-stream", inline=True)
    for resource in (compressed_read(digest, "beta"), read_resource(digest, "beta")):
        assert code_of(lambda: bs.Read(bs_pb2.ReadRequest(resource_name=resource), timeout=30)) \
            == grpc.StatusCode.PERMISSION_DENIED

    # The granted namespace works in both forms.
    assert bs.Write(write_requests(data, compressed_upload(digest)), timeout=30).committed_size \
        == len(data)
    got = bs.Read(bs_pb2.ReadRequest(resource_name=compressed_read(digest)), timeout=30)
    assert b"".join(r.data for r in got) == data
    assert recorded.store.exists("reapi", "default", key)


# -- what the hooks are told ------------------------------------------------------------

H = "ab" * 32
DIGEST = re_pb2.Digest(hash=H, size_bytes=5)
ACTION_KEY = f"action_cache/{H}/5"
BLOB_KEY = f"blob/{H}/5"
OK = grpc.StatusCode.OK

# method → (call, its outcome, route, operation, artifact_key, artifact_hash) as Kura tells its hooks
CALLS: dict[str, tuple[Callable[[Reapi], Any], grpc.StatusCode, str, str, str | None, str | None]] = {
    "GetCapabilities": (lambda c: c.capabilities.GetCapabilities(
        re_pb2.GetCapabilitiesRequest(instance_name="default"), timeout=10),
        OK, "reapi.capabilities.get", "capabilities.read", None, None),
    "GetActionResult": (lambda c: c.ac.GetActionResult(re_pb2.GetActionResultRequest(
        instance_name="", action_digest=DIGEST), timeout=10),
        grpc.StatusCode.NOT_FOUND, "reapi.action_cache.get", "artifact.read", ACTION_KEY, H),
    "UpdateActionResult": (lambda c: c.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        instance_name="", action_digest=DIGEST, action_result=re_pb2.ActionResult()), timeout=10),
        OK, "reapi.action_cache.update", "artifact.write", ACTION_KEY, H),
    "FindMissingBlobs": (lambda c: c.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        instance_name="", blob_digests=[DIGEST]), timeout=10),
        OK, "reapi.cas.find_missing", "artifact.inspect", None, None),
    "BatchUpdateBlobs": (lambda c: c.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name=""), timeout=10),
        OK, "reapi.cas.batch_update", "artifact.write", None, None),
    "BatchReadBlobs": (lambda c: c.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        instance_name="", digests=[DIGEST]), timeout=10),
        OK, "reapi.cas.batch_read", "artifact.read", None, None),
    "GetTree": (lambda c: list(c.cas.GetTree(re_pb2.GetTreeRequest(
        instance_name="", root_digest=digest_of(b"")), timeout=10)),
        OK, "reapi.cas.get_tree", "artifact.read", None, None),
    "Read": (lambda c: list(c.bytestream.Read(bs_pb2.ReadRequest(
        resource_name=f"default/compressed-blobs/identity/{H}/5"), timeout=10)),
        grpc.StatusCode.NOT_FOUND, "reapi.bytestream.read", "artifact.read", BLOB_KEY, H),
    # Authorised per namespace, as Kura (the key reaches response_headers only); the body
    # does not match the digest.
    "Write": (lambda c: c.bytestream.Write(iter([bs_pb2.WriteRequest(
        resource_name=f"uploads/{uuid.uuid4()}/compressed-blobs/identity/{H}/5", data=b"wrong",
        finish_write=True)]), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT, "reapi.bytestream.write", "artifact.write", None, None),
    "QueryWriteStatus": (lambda c: c.bytestream.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(
        resource_name=f"uploads/{uuid.uuid4()}/blobs/{H}/5"), timeout=10),
        grpc.StatusCode.NOT_FOUND, "reapi.bytestream.query_write_status", "artifact.inspect", BLOB_KEY, H),
}


@pytest.mark.parametrize("method", sorted(CALLS))
def test_hooks_are_told_what_the_servicer_serves(recorded: RunningReapi, audit: Audit, method: str) -> None:
    call, outcome, route, operation, key, artifact_hash = CALLS[method]
    if outcome is OK:
        call(recorded.client)
    else:
        assert code_of(lambda: call(recorded.client)) == outcome
    for hook in ("authenticate", "authorize"):
        assert audit.seen(hook) == {
            "transport": "grpc", "route": route, "method": "RPC", "operation": operation,
            "producer": "reapi", "server_tenant_id": "acme", "namespace_id": "default",
            **({"artifact_key": key, "artifact_hash": artifact_hash} if key else {})}


def test_every_served_reapi_method_has_a_rule() -> None:
    served = set()
    for module in (re_pb2, bs_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            if service.full_name in CACHE_SERVICES:
                served |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    assert served == set(RULES)
    assert sorted(method.rsplit("/", 1)[1] for method in served) == sorted(CALLS)  # all tested above


# -- requests that do not parse never reach a hook -----------------------------------------

GOOD = digest_of(b"x")
BAD_INSTANCE = "a/../b"
BAD_REQUESTS: dict[str, Callable[[Reapi], Any]] = {
    "read: unknown compressor": lambda c: list(c.bytestream.Read(bs_pb2.ReadRequest(
        resource_name=f"beta/compressed-blobs/brotli/{GOOD.hash}/1"), timeout=10)),
    "read: digest cut short": lambda c: list(c.bytestream.Read(bs_pb2.ReadRequest(
        resource_name=f"beta/compressed-blobs/identity/{GOOD.hash}"), timeout=10)),
    "read: no blobs segment": lambda c: list(c.bytestream.Read(bs_pb2.ReadRequest(
        resource_name="beta/things"), timeout=10)),
    "read: traversal": lambda c: list(c.bytestream.Read(bs_pb2.ReadRequest(
        resource_name=f"../blobs/{GOOD.hash}/1"), timeout=10)),
    "read: empty": lambda c: list(c.bytestream.Read(bs_pb2.ReadRequest(), timeout=10)),
    "write: not an upload": lambda c: c.bytestream.Write(iter([bs_pb2.WriteRequest(
        resource_name=f"beta/blobs/{GOOD.hash}/1", data=b"x", finish_write=True)]), timeout=10),
    "write: bad hash": lambda c: c.bytestream.Write(iter([bs_pb2.WriteRequest(
        resource_name="beta/uploads/u1/compressed-blobs/identity/zz/1", data=b"x",
        finish_write=True)]), timeout=10),
    "write: empty stream": lambda c: c.bytestream.Write(iter([]), timeout=10),
    "query write status: nonsense": lambda c: c.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name="nonsense"), timeout=10),
    "capabilities: bad instance": lambda c: c.capabilities.GetCapabilities(
        re_pb2.GetCapabilitiesRequest(instance_name=BAD_INSTANCE), timeout=10),
    "find missing: bad instance": lambda c: c.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        instance_name=BAD_INSTANCE), timeout=10),
    "batch update: reserved segment": lambda c: c.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name="x/blobs"), timeout=10),
    "batch read: bad instance": lambda c: c.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        instance_name=BAD_INSTANCE), timeout=10),
    "get tree: bad instance": lambda c: list(c.cas.GetTree(re_pb2.GetTreeRequest(
        instance_name=BAD_INSTANCE, root_digest=GOOD), timeout=10)),
    "get action result: bad digest": lambda c: c.ac.GetActionResult(re_pb2.GetActionResultRequest(
        action_digest=re_pb2.Digest(hash="abc", size_bytes=1)), timeout=10),
    "update action result: no digest": lambda c: c.ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_result=re_pb2.ActionResult()), timeout=10),
    "update action result: bad instance": lambda c: c.ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(instance_name=BAD_INSTANCE, action_digest=GOOD,
                                         action_result=re_pb2.ActionResult()), timeout=10),
    "tenant metadata: traversal": lambda c: c.cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(), metadata=[("x-kura-tenant-id", "a/../b")], timeout=10),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_unparseable_request_is_invalid_argument_before_any_hook(recorded: RunningReapi, audit: Audit,
                                                                 case: str) -> None:
    assert code_of(lambda: BAD_REQUESTS[case](recorded.client)) == grpc.StatusCode.INVALID_ARGUMENT
    assert audit.calls == []


def test_the_recording_hooks_do_run(recorded: RunningReapi, audit: Audit) -> None:
    """The control for the test above: a request that parses reaches both hooks."""
    recorded.client.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(), timeout=10)
    assert audit.hooks() == ["authenticate", "authorize", "response_headers"]


# -- repeated tenant metadata --------------------------------------------------------------

@pytest.mark.parametrize("metadata,tenant", [
    ([("x-kura-tenant-id", "acme"), ("x-kura-tenant-id", "globex")], "acme"),
    ([("x-kura-tenant-id", "acme"), ("x-kura-tenant-id", "a/../b")], "acme"),
    ([("x-tuist-account-handle", "globex"), ("x-kura-tenant-id", "acme")], "acme"),
    ([("x-kura-tenant-id", " "), ("x-tuist-account-handle", "globex")], "globex"),
    ([("x-tuist-account-handle", "globex"), ("x-tuist-account-handle", "acme")], "globex"),
])
def test_repeated_tenant_keys_first_value_counts(recorded: RunningReapi, audit: Audit,
                                                 metadata: list[tuple[str, str]], tenant: str) -> None:
    recorded.client.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(), metadata=metadata, timeout=10)
    assert audit.seen("authorize")["tenant_id"] == tenant


def test_invalid_first_tenant_value_is_refused_before_hooks(recorded: RunningReapi, audit: Audit) -> None:
    metadata = [("x-kura-tenant-id", "a/../b"), ("x-kura-tenant-id", "acme")]
    assert code_of(lambda: recorded.client.cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(), metadata=metadata, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    assert audit.calls == []


# -- response_headers as metadata ----------------------------------------------------------

def test_response_headers_arrive_as_initial_metadata(recorded: RunningReapi, audit: Audit) -> None:
    c = recorded.client
    data = b"header test blob"
    digest = digest_of(data)

    key = f"blob/{digest.hash}/{digest.size_bytes}"

    _, call = c.bytestream.Write.with_call(write_requests(data, upload_resource(digest)), timeout=30)
    # Names gRPC cannot carry (grpc-status, a value with a tab) are dropped; the call succeeds.
    assert dict(call.initial_metadata()) == {
        "x-kura-route": "reapi.bytestream.write", "x-kura-status": "200", "x-kura-key": key}
    assert audit.seen("response_headers")["artifact_key"] == key
    assert "artifact_key" not in audit.seen("authorize")  # Write is authorised per namespace

    audit.clear()
    stream = c.bytestream.Read(bs_pb2.ReadRequest(resource_name=read_resource(digest)), timeout=30)
    assert dict(stream.initial_metadata()) == {
        "x-kura-route": "reapi.bytestream.read", "x-kura-status": "200", "x-kura-key": key}
    assert b"".join(r.data for r in stream) == data

    _, call = c.cas.FindMissingBlobs.with_call(re_pb2.FindMissingBlobsRequest(), timeout=10)
    assert dict(call.initial_metadata()) == {
        "x-kura-route": "reapi.cas.find_missing", "x-kura-status": "200", "x-kura-key": "none"}


def test_failed_call_gets_no_response_headers(recorded: RunningReapi, audit: Audit) -> None:
    stream = recorded.client.bytestream.Read(
        bs_pb2.ReadRequest(resource_name=read_resource(digest_of(b"absent"))), timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "x-kura-route" not in dict(info.value.initial_metadata())
    assert audit.hooks() == ["authenticate", "authorize"]


# -- denials through the production chain ----------------------------------------------------

DENYING = """
function authenticate(ctx)
  local status = tonumber(string.match(ctx.headers.authorization or "", "^Bearer deny(%d+)$"))
  if status then return { deny = { status = status, message = "denied " .. status } } end
  return { anonymous = true }
end"""


@pytest.mark.parametrize("status,code", [
    (400, grpc.StatusCode.INVALID_ARGUMENT), (401, grpc.StatusCode.UNAUTHENTICATED),
    (402, grpc.StatusCode.PERMISSION_DENIED), (403, grpc.StatusCode.PERMISSION_DENIED),
    (404, grpc.StatusCode.NOT_FOUND), (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (500, grpc.StatusCode.INTERNAL), (503, grpc.StatusCode.UNAVAILABLE)])
def test_denials_map_to_grpc_codes(tmp_path: Path, start_reapi: Callable[[Settings], RunningReapi],
                                   status: int, code: grpc.StatusCode) -> None:
    reapi = start_reapi(hooked_settings(tmp_path, DENYING))
    with pytest.raises(grpc.RpcError) as info:
        reapi.client.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(),
                                          metadata=[("authorization", f"Bearer deny{status}")], timeout=10)
    assert (info.value.code(), info.value.details()) == (code, f"denied {status}")


def test_health_is_not_hooked(tmp_path: Path, start_reapi: Callable[[Settings], RunningReapi]) -> None:
    reapi = start_reapi(hooked_settings(tmp_path, "function authenticate(ctx) "
                                                  "return { deny = { status = 401, message = 'no' } } end"))
    health = health_pb2_grpc.HealthStub(reapi.client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert code_of(lambda: reapi.client.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(), timeout=10)) \
        == grpc.StatusCode.UNAUTHENTICATED


# -- the static tokens example ----------------------------------------------------------------

@pytest.fixture
def static_tokens(tmp_path: Path, start_reapi: Callable[[Settings], RunningReapi]) -> RunningReapi:
    return start_reapi(hooked_settings(tmp_path, REPO / "examples/hooks/static_tokens.lua",
                                       KURA_EXTENSION_STATIC_READ_TOKENS="ro-token",
                                       KURA_EXTENSION_STATIC_WRITE_TOKENS="rw-token"))


RO = (("authorization", "Bearer ro-token"),)
RW = (("authorization", "Bearer rw-token"),)


def test_read_only_token_gets_permission_denied_on_every_write(static_tokens: RunningReapi) -> None:
    c = static_tokens.client
    data = b"artifact bytes"
    digest = digest_of(data)
    batch = re_pb2.BatchUpdateBlobsRequest(
        instance_name="proj", requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)])
    assert code_of(lambda: c.cas.BatchUpdateBlobs(batch, metadata=RO)) == grpc.StatusCode.PERMISSION_DENIED
    update = re_pb2.UpdateActionResultRequest(instance_name="proj", action_digest=digest,
                                              action_result=re_pb2.ActionResult(exit_code=0))
    assert code_of(lambda: c.ac.UpdateActionResult(update, metadata=RO)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: c.bytestream.Write(write_requests(data, upload_resource(digest, "proj")),
                                              metadata=RO)) == grpc.StatusCode.PERMISSION_DENIED
    # Nothing was stored; the read-write token can then write and the read-only one read.
    missing = c.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(instance_name="proj",
                                                                    blob_digests=[digest]), metadata=RO)
    assert list(missing.missing_blob_digests) == [digest]
    c.cas.BatchUpdateBlobs(batch, metadata=RW)
    reads = c.bytestream.Read(bs_pb2.ReadRequest(resource_name=read_resource(digest, "proj")),
                              metadata=RO)
    assert b"".join(r.data for r in reads) == data


def test_missing_token_is_unauthenticated(static_tokens: RunningReapi) -> None:
    request = re_pb2.GetActionResultRequest(instance_name="proj", action_digest=digest_of(b"a"))
    assert code_of(lambda: static_tokens.client.ac.GetActionResult(request)) == grpc.StatusCode.UNAUTHENTICATED
