from __future__ import annotations

Q = "tenant_id=acme&hash=h1&name=Mod.framework"
PART = "/api/cache/module/part?tenant_id=acme&upload_id="
COMPLETE = "/api/cache/module/complete?tenant_id=acme&upload_id="


def _upload(client, parts: list[bytes]) -> str:
    upload_id = client.post(f"/api/cache/module/start?{Q}").json["upload_id"]
    for i, part in enumerate(parts, 1):
        r = client.post(f"{PART}{upload_id}&part_number={i}", data=part)
        assert r.status_code == 204
    return upload_id


def test_multipart_round_trip(client) -> None:
    upload_id = _upload(client, [b"a" * 100, b"b" * 50])
    r = client.post(f"{COMPLETE}{upload_id}", json={"parts": [1, 2]})
    assert r.status_code == 204
    assert client.head(f"/api/cache/module/anything?{Q}").status_code == 204
    r = client.get(f"/api/cache/module/ignored?{Q}")
    assert r.status_code == 200 and r.data == b"a" * 100 + b"b" * 50
    assert client.get(f"/api/cache/module/x?{Q}&cache_category=selective_tests").status_code == 404


def test_start_when_present_depends_on_cli_version(client) -> None:
    upload_id = _upload(client, [b"z"])
    client.post(f"{COMPLETE}{upload_id}", json={"parts": [1]})
    assert client.post(f"/api/cache/module/start?{Q}").json == {"upload_id": None}
    old = client.post(f"/api/cache/module/start?{Q}", headers={"x-tuist-cli-version": "4.201.9"})
    assert old.status_code == 200 and old.json == {"upload_id": None}
    new = client.post(f"/api/cache/module/start?{Q}", headers={"x-tuist-cli-version": "4.202.0-rc.3"})
    assert new.status_code == 204


def test_resent_part_replaces_previous(client) -> None:
    upload_id = _upload(client, [b"first"])
    client.post(f"{PART}{upload_id}&part_number=1", data=b"second")
    client.post(f"{COMPLETE}{upload_id}", json={"parts": [1]})
    assert client.get(f"/api/cache/module/x?{Q}").data == b"second"


def test_part_errors(client) -> None:
    upload_id = _upload(client, [])
    r = client.post(f"{PART}{upload_id}&part_number=zero", data=b"x")
    assert r.status_code == 400 and r.json == {"message": "Invalid part_number"}
    r = client.post(f"{PART}nope&part_number=1", data=b"x")
    assert r.status_code == 404 and r.json == {"message": "Upload not found"}
    r = client.post(f"{PART}{upload_id}&part_number=1",
                    data=b"x" * (10 * 1024 * 1024 + 1))
    assert r.status_code == 413 and r.json == {"message": "Part exceeds 10MB limit"}


def test_complete_errors(client) -> None:
    upload_id = _upload(client, [b"1", b"2"])
    for parts in ([1], [2, 1], [1, 2, 3], "x", [True, 2]):
        r = client.post(f"{COMPLETE}{upload_id}", json={"parts": parts})
        assert r.status_code == 400 and r.json == {"message": "Parts mismatch or missing parts"}
    r = client.post(f"{COMPLETE}{upload_id}", data=b"{bad")
    assert r.status_code == 400
    assert client.post(f"{COMPLETE}gone", json={"parts": [1]}).status_code == 404
    assert client.get(f"/api/cache/module/x?{Q}").status_code == 404


def test_total_over_2_gib_is_422(client, app) -> None:
    from app.storage import multipart

    upload_id = _upload(client, [b"a" * 10])
    original = multipart.MAX_UPLOAD_BYTES
    multipart.MAX_UPLOAD_BYTES = 15
    try:
        r = client.post(f"{PART}{upload_id}&part_number=2", data=b"b" * 10)
    finally:
        multipart.MAX_UPLOAD_BYTES = original
    assert r.status_code == 422 and "message" in r.json


def test_part_and_complete_name_their_tenant(client) -> None:
    upload_id = _upload(client, [b"1"])
    r = client.post(f"/api/cache/module/part?upload_id={upload_id}&part_number=2", data=b"2")
    assert r.status_code == 400 and r.json == {"message": "Missing tenant_id"}
    r = client.post(f"/api/cache/module/complete?upload_id={upload_id}&tenant_id=", json={"parts": [1]})
    assert r.status_code == 400 and r.json == {"message": "Missing tenant_id"}
    r = client.post(f"/api/cache/module/complete?upload_id={upload_id}&account_handle=acme",
                    json={"parts": [1]})
    assert r.status_code == 204
    assert client.get(f"/api/cache/module/x?{Q}").data == b"1"
