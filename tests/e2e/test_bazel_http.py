"""End to end with a real Bazel client over Bazel's HTTP cache protocol (``/ac``, ``/cas``)
against a real node (``tests/bazel_client.py``): after ``bazel clean`` every action is a
remote cache hit and every output byte-identical, and the entries live under the
instance prefix's namespace with producer ``bazel``."""
from __future__ import annotations

import hashlib
from pathlib import Path

import requests

from tests.bazel_client import BIG_OUTPUT, build_clean_rebuild, requires_bazel
from tests.mesh import MeshNode

pytestmark = requires_bazel


def test_bazel_over_http_is_fully_cached_after_clean(tmp_path: Path, node) -> None:  # type: ignore[no-untyped-def]
    run = build_clean_rebuild(tmp_path, [f"--remote_cache={node.url}/e2e"])
    print(run)
    big = run.outputs[BIG_OUTPUT]
    digest = hashlib.sha256(big).hexdigest()
    assert requests.get(f"{node.url}/e2e/cas/{digest}", timeout=30).content == big
    assert requests.get(f"{node.url}/cas/{digest}", timeout=30).status_code == 404  # another namespace
    view = MeshNode("node", node)
    assert view.metric("kura_artifact_writes_total", producer="bazel", result="ok") >= 2 * run.remote_hits
    assert view.metric("kura_artifact_reads_total", producer="bazel", result="ok") >= 2 * run.remote_hits
    assert view.metric("kura_http_requests_total", route="/{namespace_id}/ac/{hash}", status="200") > 0
