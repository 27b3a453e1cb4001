"""Lua hooks on the REAPI server built by ``build_server`` (real grpcio, real Lua)."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from app.settings import Settings
from tests.reapi.reapi_client import digest_of, read_resource, upload_resource, write_requests

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def reapi_settings(tmp_path: Path) -> Settings:
    script = str(REPO / "examples/hooks/static_tokens.lua")
    env = {"KURA_EXTENSION_SCRIPT_PATH": script, "KURA_EXTENSION_STATIC_READ_TOKENS": "ro-token",
           "KURA_EXTENSION_STATIC_WRITE_TOKENS": "rw-token"}
    return Settings(data_dir=str(tmp_path / "data"), tenant_id="acme", bind_host="127.0.0.1",
                    grpc_port=0, node_url="http://self:7443", extension_script_path=script,
                    kura_env=env)


RO = (("authorization", "Bearer ro-token"),)
RW = (("authorization", "Bearer rw-token"),)


def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_read_only_token_gets_permission_denied_on_every_write(reapi) -> None:
    c = reapi.client
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


def test_missing_token_is_unauthenticated(reapi) -> None:
    request = re_pb2.GetActionResultRequest(instance_name="proj", action_digest=digest_of(b"a"))
    assert code_of(lambda: reapi.client.ac.GetActionResult(request)) == grpc.StatusCode.UNAUTHENTICATED
