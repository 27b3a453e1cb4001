"""Probes, metrics, internal routes, backpressure and draining on the public app."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from app.replication.readiness import publish
from app.settings import Settings
from bench.proctree import free_port
from tests.reapi.reapi_process import ReapiProcess


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), node_url="http://self:7443", grpc_workers=1)


@pytest.fixture
def reapi_process(settings: Settings, tmp_path: Path) -> Iterator[ReapiProcess]:
    """The node's one REAPI process (``python -m app.reapi`` on the same data directory)."""
    proc = ReapiProcess(Path(settings.data_dir), free_port(), tmp_path / "reapi.log")
    proc.wait_listening()
    yield proc
    proc.stop()


def test_up_document_of_a_single_node(client, settings: Settings) -> None:
    doc = client.get("/up").json
    assert doc == {
        "status": "ok", "generation": 0, "tenant_id": "default", "region": "local",
        "node": "local", "node_url": "http://self:7443", "connected_nodes": [],
        "ring_members": 1, "members": ["http://self:7443"], "regions": ["local"],
        "nodes": ["http://self:7443"],
    }


def test_ready_follows_the_replicator_the_writer_lock_and_reapi(client, app, settings: Settings,
                                                                tmp_path: Path) -> None:
    node = app.extensions["kura"].node_state
    r = client.get("/ready")
    assert r.status_code == 503 and r.json["state"] == "joining" and r.json["status"] == "not_ready"
    assert r.json["reasons"] == ["writer lock not held", "REAPI processes serving: 0 of 1",
                                 "initial discovery incomplete"]
    reapi = ReapiProcess(Path(settings.data_dir), free_port(), tmp_path / "reapi.log")
    try:
        reapi.wait_listening()
        assert client.get("/ready").json["reasons"] == ["writer lock not held",
                                                        "initial discovery incomplete"]
        _ready_once_replicator_and_lock_agree(client, node, settings)
    finally:
        reapi.stop()
    r = client.get("/ready")
    assert r.status_code == 503 and r.json["reasons"] == ["REAPI processes serving: 0 of 1"]


def _ready_once_replicator_and_lock_agree(client, node, settings: Settings) -> None:
    node.set("writer_lock", 1)
    publish(settings.resolved_run_dir, {"generation": 1, "initial_discovery_completed": True,
                                "settle_until_ms": 0, "known_peers": ["http://b:1"],
                                "bootstrapped_peers": [], "bootstrap_inflight_peers": ["http://b:1"],
                                "bootstrap_progress": [{"peer": "http://b:1", "phase": "manifests"}]})
    r = client.get("/ready")
    assert r.status_code == 503
    assert r.json["reasons"] == ["bootstrap in progress", "bootstrap incomplete for http://b:1"]
    assert r.json["bootstrap_progress"] == [{"peer": "http://b:1", "phase": "manifests"}]
    node.set("ready", 1)
    node.set("generation", 1)
    r = client.get("/ready")
    assert r.status_code == 200
    assert (r.json["status"], r.json["state"], r.json["ready"], r.json["reasons"]) == \
        ("ok", "serving", True, [])
    assert r.json["writer_lock_owned"] is True and r.json["generation"] == 1
    doc = client.get("/status/rollout").json
    assert (doc["ready"], doc["state"], doc["ring_members"], doc["bootstrap_known_peers"],
            doc["bootstrap_completed_peers"], doc["bootstrap_inflight_peers"],
            doc["outbox_messages"], doc["http_inflight_requests"], doc["grpc_inflight_requests"]) == \
        (True, "serving", 2, 1, 0, 1, 0, 0, 0)


def test_draining_answers_503_except_probes(client, app, settings: Settings, reapi_process) -> None:
    node = app.extensions["kura"].node_state
    publish(settings.resolved_run_dir, {"generation": 1, "initial_discovery_completed": True})
    node.set("ready", 1)
    node.set("writer_lock", 1)
    assert client.get("/ready").status_code == 200
    node.set("draining", 1)
    r = client.get("/api/cache/cas/x?tenant_id=a")
    assert r.status_code == 503 and r.json == {"message": "server is draining"}
    assert r.headers["Connection"] == "close"
    assert client.get("/up").status_code == 200
    r = client.get("/ready")
    assert r.status_code == 503 and r.json["state"] == "draining" and r.json["reasons"] == ["draining"]
    assert client.get("/metrics").status_code == 200


def test_internal_routes_are_not_on_the_public_port(client) -> None:
    r = client.get("/_internal/status")
    assert r.status_code == 404 and "message" in r.json


def test_metrics_use_route_templates(client) -> None:
    client.put("/api/cache/gradle/some-key?tenant_id=a", data=b"x")
    client.get("/api/cache/gradle/some-key?tenant_id=a")
    text = client.get("/metrics").data.decode()
    assert 'kura_http_requests_total{route="/api/cache/gradle/{cache_key}",status="201"}' in text
    assert "some-key" not in text
    assert 'kura_artifact_writes_total{producer="gradle",result="ok"}' in text
    assert "kura_outbox_messages" in text


def test_tmp_budget_full_is_429_with_retry_after(tmp_path) -> None:
    from app.http import create_app

    app = create_app(Settings(data_dir=str(tmp_path / "d"), tmp_dir_max_bytes=1024 * 1024))
    client = app.test_client()
    r = client.put("/api/cache/gradle/big?tenant_id=a", data=b"x" * (2 * 1024 * 1024))
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) > 0
    assert "KURA_TMP_DIR_MAX_BYTES" in r.json["message"]
    assert client.get("/api/cache/gradle/big?tenant_id=a").status_code == 404
    assert client.put("/api/cache/gradle/small?tenant_id=a", data=b"x").status_code == 201
    app.extensions["kura"].store.close()


def test_outbox_full_is_429(tmp_path) -> None:
    from app.http import create_app

    from app.members import write_members

    write_members(str(tmp_path / "d" / "run"), ["http://peer:7443"])
    app = create_app(Settings(data_dir=str(tmp_path / "d"), node_url="http://self:7443",
                              outbox_max_depth=1))
    client = app.test_client()
    assert client.put("/api/cache/gradle/a?tenant_id=t", data=b"1").status_code == 201
    r = client.put("/api/cache/gradle/b?tenant_id=t", data=b"2")
    assert r.status_code == 429 and "KURA_OUTBOX_MAX_DEPTH" in r.json["message"]
    app.extensions["kura"].store.close()


def test_disk_full_is_429_and_leaves_nothing(client, app, monkeypatch) -> None:
    import errno

    from app.storage import segments

    def no_space(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # Every body copy into a segment: from a staging file, and from memory (small uploads).
    monkeypatch.setattr(segments, "_copy", no_space)
    monkeypatch.setattr(segments, "_pwrite_all", no_space)
    store = app.extensions["kura"].store
    for size in (10_000, 100_000):
        r = client.put("/api/cache/gradle/full?tenant_id=a", data=b"x" * size)
        assert r.status_code == 429
        assert "disk is full" in r.json["message"] and r.headers["Retry-After"]
        assert store.lookup("gradle", "", "full") is None
        assert store.staging.used_bytes() == 0
    monkeypatch.undo()
    assert client.put("/api/cache/gradle/full?tenant_id=a", data=b"x").status_code == 201
