"""Two real nodes: a Turborepo artifact reaches the other node with its kept headers,
whether it arrives by bootstrap (written while the peer was down) or by the outbox."""
from __future__ import annotations

import os

from tests.mesh import make_mesh, quiescent, wait_until


def test_turbo_artifacts_replicate_with_duration_and_tag(tmp_path) -> None:
    a, b = mesh = make_mesh(tmp_path, ["a", "b"])
    early = os.urandom(200_000)
    early_kept = {"x-artifact-duration": "1500", "x-artifact-tag": "ZWFybHk="}
    a.node.start(wait=False)
    a.node.wait_for(a.url + "/up")
    assert a.put("/v8/artifacts/early?teamId=team_web", early, headers=early_kept).status_code == 202
    b.node.start(wait=False)
    for member in mesh:  # both ready: b has bootstrapped from a
        member.node.wait_ready(60)
    late_kept = {"x-artifact-duration": "7", "x-artifact-tag": "bGF0ZQ=="}
    assert b.put("/v8/artifacts/late?slug=web", b"late", headers=late_kept).status_code == 202
    wait_until(lambda: quiescent(mesh), 60, "the outboxes to drain")
    for node, hash_, team, body, kept in ((b, "early", "teamId=team_web", early, early_kept),
                                          (a, "late", "slug=web", b"late", late_kept)):
        got = node.get(f"/v8/artifacts/{hash_}?{team}")
        assert got.status_code == 200 and got.content == body, node.name
        assert {name: got.headers[name] for name in kept} == kept, node.name
        known = node.session.post(f"{node.url}/v8/artifacts?{team}", json={"hashes": [hash_]}, timeout=10)
        assert known.json() == {hash_: {"size": len(body), "tag": kept["x-artifact-tag"],
                                        "taskDurationMs": int(kept["x-artifact-duration"])}}
    # Each write was made once and applied once on the other node.
    assert a.metric("kura_artifact_writes_total", producer="turbo") == 1
    assert b.metric("kura_artifact_writes_total", producer="turbo") == 1
