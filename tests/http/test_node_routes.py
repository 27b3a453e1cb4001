"""Probes, metrics, internal routes, backpressure and draining on the public app."""
from __future__ import annotations

from app.settings import Settings


def test_up_document(client) -> None:
    doc = client.get("/up").json
    assert doc["status"] == "ok"
    for field in ("tenant_id", "region", "node_url", "generation", "members"):
        assert field in doc


def test_ready_and_rollout_follow_node_state(client, app) -> None:
    node = app.extensions["kura"].node_state
    r = client.get("/ready")
    assert r.status_code == 503 and r.json["state"] == "joining"
    node.set("ready", 1)
    r = client.get("/ready")
    assert r.status_code == 200 and r.json["state"] == "serving"
    doc = client.get("/status/rollout").json
    for field in ("generation", "ready", "state", "ring_members", "outbox_messages",
                  "bootstrap_known_peers", "bootstrap_completed_peers", "bootstrap_inflight_peers",
                  "http_inflight_requests", "grpc_inflight_requests"):
        assert field in doc


def test_draining_answers_503_except_probes(client, app) -> None:
    node = app.extensions["kura"].node_state
    node.set("ready", 1)
    node.set("draining", 1)
    r = client.get("/api/cache/cas/x?tenant_id=a")
    assert r.status_code == 503 and r.json == {"message": "server is draining"}
    assert r.headers["Connection"] == "close"
    assert client.get("/up").status_code == 200
    assert client.get("/ready").status_code == 503
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
    assert 'kura_artifact_writes_total{producer="gradle",result="created"}' in text
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

    app = create_app(Settings(data_dir=str(tmp_path / "d"), peers=("http://peer:7443",),
                              node_url="http://self:7443", outbox_max_depth=1))
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

    monkeypatch.setattr(segments, "_copy_and_sync", no_space)
    r = client.put("/api/cache/gradle/full?tenant_id=a", data=b"x" * 10_000)
    assert r.status_code == 429
    assert "disk is full" in r.json["message"] and r.headers["Retry-After"]
    store = app.extensions["kura"].store
    assert store.lookup("gradle", "", "full") is None
    assert store.staging.used_bytes() == 0
    monkeypatch.undo()
    assert client.put("/api/cache/gradle/full?tenant_id=a", data=b"x").status_code == 201
