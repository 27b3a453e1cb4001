"""Small uploads (a declared length up to ``SMALL_UPLOAD_BYTES``) are received in memory and
copied straight into a segment: the same answers and checks as a staged upload, without a
staging file."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.http.bodies import SMALL_UPLOAD_BYTES
from app.settings import Settings

T = "?tenant_id=a"


def test_a_small_upload_needs_no_room_in_the_tmp_staging_budget(tmp_path: Path) -> None:
    """A staged body claims the budget a megabyte at a time: a 4 KiB upload used to get 429
    from a budget under 1 MiB, though it never needed that room."""
    from app.http import create_app

    app = create_app(Settings(data_dir=str(tmp_path / "d"), tmp_dir_max_bytes=512 * 1024))
    client = app.test_client()
    body = b"s" * 4096
    try:
        assert client.put("/api/cache/gradle/small" + T, data=body).status_code == 201
        assert client.get("/api/cache/gradle/small" + T).data == body
        # A body that is staged still counts against it.
        r = client.put("/api/cache/gradle/big" + T, data=b"b" * (SMALL_UPLOAD_BYTES + 1))
        assert r.status_code == 429 and "KURA_TMP_DIR_MAX_BYTES" in r.json["message"]
        # A full budget refuses staged bodies only.
        staging = app.extensions["kura"].store.staging
        staging.reserve(512 * 1024)
        try:
            r = client.put("/api/cache/gradle/big" + T, data=b"b" * (SMALL_UPLOAD_BYTES + 1))
            assert r.status_code == 429 and "KURA_TMP_DIR_MAX_BYTES" in r.json["message"]
            assert client.put("/api/cache/gradle/small2" + T, data=body).status_code == 201
        finally:
            staging.release(512 * 1024)
    finally:
        app.extensions["kura"].store.close()


@pytest.mark.parametrize("size", [0, 1, SMALL_UPLOAD_BYTES, SMALL_UPLOAD_BYTES + 1])
def test_bodies_on_both_sides_of_the_small_upload_limit_round_trip(client, size: int) -> None:
    body = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
    body = body[:size]
    assert client.put(f"/api/cache/gradle/k{size}" + T, data=body).status_code == 201
    r = client.get(f"/api/cache/gradle/k{size}" + T)
    assert r.status_code == 200 and r.data == body
    assert client.put(f"/api/cache/gradle/k{size}" + T, data=body[::-1]).status_code == 200
    assert client.get(f"/api/cache/gradle/k{size}" + T).data == body[::-1]


def test_a_real_node_takes_small_uploads_past_a_budget_too_small_to_stage_them(node_factory) -> None:
    """The same on a node (two HTTP workers, each with its own view of the budget): every
    worker stores small uploads from memory and still refuses a body it would have to stage."""
    import requests

    node = node_factory(KURA_TMP_DIR_MAX_BYTES=str(512 * 1024), KURA_HTTP_WORKERS="2")
    body = b"s" * 4096
    with requests.Session() as one, requests.Session() as other:  # two keep-alive connections
        for n in range(20):
            session = one if n % 2 else other
            assert session.put(f"{node.url}/api/cache/gradle/s{n}" + T, data=body).status_code == 201
            assert requests.get(f"{node.url}/api/cache/gradle/s{n}" + T).content == body
    r = requests.put(f"{node.url}/api/cache/gradle/big" + T, data=b"b" * (SMALL_UPLOAD_BYTES + 1))
    assert r.status_code == 429 and "KURA_TMP_DIR_MAX_BYTES" in r.json()["message"]
