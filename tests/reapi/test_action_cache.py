from __future__ import annotations

import grpc
import pytest

from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from tests.reapi.conftest import RunningReapi
from tests.reapi.reapi_client import digest_of

ACTION = digest_of(b"action")


def get(reapi: RunningReapi, action: re_pb2.Digest = ACTION, instance: str = "") -> re_pb2.ActionResult:
    return reapi.client.ac.GetActionResult(
        re_pb2.GetActionResultRequest(instance_name=instance, action_digest=action), timeout=10)


def update(reapi: RunningReapi, result: re_pb2.ActionResult, action: re_pb2.Digest = ACTION,
           instance: str = "") -> re_pb2.ActionResult:
    return reapi.client.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        instance_name=instance, action_digest=action, action_result=result), timeout=10)


def expect_code(code: grpc.StatusCode, fn, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        fn(*args)
    assert err.value.code() == code, err.value.details()


def full_result(reapi: RunningReapi) -> tuple[re_pb2.ActionResult, dict[str, re_pb2.Digest]]:
    out = reapi.client.upload(b"output file")
    stdout = reapi.client.upload(b"stdout text")
    stderr = reapi.client.upload(b"stderr text")
    inner = reapi.client.upload(b"file inside an output directory")
    tree = re_pb2.Tree(root=re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=inner)]))
    tree_digest = reapi.client.upload(tree.SerializeToString())
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out/a", digest=out, is_executable=True)],
        output_directories=[re_pb2.OutputDirectory(path="out/d", tree_digest=tree_digest)],
        stdout_digest=stdout, stderr_digest=stderr, exit_code=0)
    return result, {"out": out, "stdout": stdout, "stderr": stderr, "inner": inner, "tree": tree_digest}


def test_update_then_get(reapi: RunningReapi) -> None:
    expect_code(grpc.StatusCode.NOT_FOUND, get, reapi)
    result, _ = full_result(reapi)
    assert update(reapi, result) == result
    assert get(reapi) == result
    expect_code(grpc.StatusCode.NOT_FOUND, get, reapi, ACTION, "other-instance")
    stored = reapi.store.lookup("reapi", "default", f"action_cache/{ACTION.hash}/{ACTION.size_bytes}")
    assert stored is not None and stored.inline_body == result.SerializeToString(deterministic=True)
    # overwrite wins
    result.exit_code = 3
    update(reapi, result)
    assert get(reapi).exit_code == 3


def test_empty_outputs_need_no_blobs(reapi: RunningReapi) -> None:
    empty = digest_of(b"")
    result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="e", digest=empty)],
                                 stdout_digest=empty)
    update(reapi, result)
    assert get(reapi) == result


@pytest.mark.parametrize("gone", ["out", "stdout", "stderr", "tree", "inner"])
def test_result_with_a_missing_blob_is_not_served(reapi: RunningReapi, gone: str) -> None:
    result, _ = full_result(reapi)
    action = digest_of(b"action-" + gone.encode())
    # the result references a blob that this namespace does not have
    replacement = digest_of(b"never uploaded " + gone.encode())
    if gone == "out":
        result.output_files[0].digest.CopyFrom(replacement)
    elif gone == "stdout":
        result.stdout_digest.CopyFrom(replacement)
    elif gone == "stderr":
        result.stderr_digest.CopyFrom(replacement)
    elif gone == "tree":
        result.output_directories[0].tree_digest.CopyFrom(replacement)
    else:
        tree = re_pb2.Tree(root=re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=replacement)]))
        result.output_directories[0].tree_digest.CopyFrom(reapi.client.upload(tree.SerializeToString()))
    update(reapi, result, action)
    expect_code(grpc.StatusCode.NOT_FOUND, get, reapi, action)


def test_invalid_arguments(reapi: RunningReapi) -> None:
    bad = re_pb2.Digest(hash="abc", size_bytes=1)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, get, reapi, bad)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, update, reapi, re_pb2.ActionResult(), bad)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, get, reapi, ACTION, "a/../b")
    malformed = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="x", digest=bad)])
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, update, reapi, malformed)
    expect_code(grpc.StatusCode.NOT_FOUND, get, reapi)  # nothing was stored
