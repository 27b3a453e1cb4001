from __future__ import annotations

import json

T = "?tenant_id=acme"


def test_put_get_overwrite(client) -> None:
    r = client.put("/api/cache/keyvalue" + T, json={"cas_id": "c1", "entries": [{"value": "a"}]})
    assert r.status_code == 204
    r = client.get("/api/cache/keyvalue/c1" + T)
    assert r.status_code == 200 and json.loads(r.data) == {"entries": [{"value": "a"}]}
    client.put("/api/cache/keyvalue" + T, json={"cas_id": "c1", "entries": [{"value": "b"}, {"value": "c"}]})
    assert client.get("/api/cache/keyvalue/c1" + T).json == {"entries": [{"value": "b"}, {"value": "c"}]}


def test_missing_entry(client) -> None:
    r = client.get("/api/cache/keyvalue/none" + T)
    assert r.status_code == 404 and r.json == {"message": "Key-value entry not found"}


def test_invalid_payloads(client) -> None:
    for body in (b"{not json", b"[]", json.dumps({"entries": []}).encode(),
                 json.dumps({"cas_id": "x", "entries": [{"value": 1}]}).encode(),
                 json.dumps({"cas_id": "x", "entries": "no"}).encode()):
        r = client.put("/api/cache/keyvalue" + T, data=body, content_type="application/json")
        assert r.status_code == 400, body
        assert r.json["message"].startswith("Invalid key-value payload: ")


def test_payload_over_limit_is_413(client) -> None:
    big = json.dumps({"cas_id": "x", "entries": [{"value": "v" * (1024 * 1024)}]})
    r = client.put("/api/cache/keyvalue" + T, data=big, content_type="application/json")
    assert r.status_code == 413
