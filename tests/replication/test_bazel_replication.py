"""Bazel HTTP cache writes replicate like every other protocol's: two real nodes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.mesh import make_mesh, quiescent, start, wait_until


def test_bazel_writes_reach_the_peer(tmp_path: Path) -> None:
    a, b = make_mesh(tmp_path, ["a", "b"])
    start([a, b])
    big = os.urandom(9 * 1024 * 1024)  # a segment of its own
    digest = hashlib.sha256(big).hexdigest()
    action = hashlib.sha256(b"action").hexdigest()
    assert a.put(f"/cas/{digest}", big).status_code == 200
    assert b.put(f"/proj/ac/{action}", b"action-result").status_code == 200
    wait_until(lambda: quiescent([a, b]), 60, "outboxes drained")
    assert b.get(f"/cas/{digest}").content == big
    assert a.get(f"/proj/ac/{action}").content == b"action-result"
    r = b.get(f"/cas/{digest}", headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == big[-5:]
    assert a.metric("kura_replication_apply_results_total", outcome="applied") >= 1
    assert b.metric("kura_replication_apply_results_total", outcome="applied") >= 1
