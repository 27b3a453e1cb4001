"""End to end with a real Bazel client over gRPC (``tests/bazel_client.py``).

The workspace is built against ``--remote_cache=grpc://...`` served by ``python -m app.reapi``;
after ``bazel clean`` every action must be a remote cache hit and every output byte-identical.
"""
from __future__ import annotations

from pathlib import Path

from tests.bazel_client import build_clean_rebuild, requires_bazel

pytestmark = requires_bazel


def test_bazel_build_is_fully_cached_after_clean(tmp_path: Path, spawn) -> None:  # type: ignore[no-untyped-def]
    reapi = spawn()
    reapi.wait_listening(timeout=60)
    run = build_clean_rebuild(tmp_path, [f"--remote_cache=grpc://127.0.0.1:{reapi.port}",
                                         "--remote_instance_name=e2e/main"])
    print(run)
