from __future__ import annotations

import pytest

T = "?tenant_id=acme"


def test_upload_then_download_keeps_content_type(client) -> None:
    r = client.post("/api/cache/cas/abc123" + T, data=b"payload", content_type="application/x-thing")
    assert r.status_code == 204 and r.data == b""
    r = client.get("/api/cache/cas/abc123" + T)
    assert r.status_code == 200
    assert r.data == b"payload"
    assert r.headers["Content-Type"] == "application/x-thing"
    assert r.headers["Content-Length"] == "7"


def test_existing_blob_answers_204_without_reading_body(client) -> None:
    client.post("/api/cache/cas/same" + T, data=b"first")
    # A body that would fail verification proves it was never read.
    r = client.post("/api/cache/cas/same" + T, data=b"x", environ_overrides={"CONTENT_LENGTH": "999"})
    assert r.status_code == 204
    assert client.get("/api/cache/cas/same" + T).data == b"first"


def test_missing_blob_is_404_json(client) -> None:
    r = client.get("/api/cache/cas/nope" + T)
    assert r.status_code == 404
    assert r.json == {"message": "Artifact not found"}
    assert r.headers["Content-Type"] == "application/json"


def test_tenant_is_required(client) -> None:
    r = client.get("/api/cache/cas/abc")
    assert r.status_code == 400 and r.json == {"message": "Missing tenant_id"}


def test_account_handle_and_project_handle_aliases(client) -> None:
    client.post("/api/cache/cas/al?account_handle=acme&project_handle=p1", data=b"v")
    assert client.get("/api/cache/cas/al?tenant_id=acme&namespace_id=p1").data == b"v"
    assert client.get("/api/cache/cas/al?tenant_id=acme").status_code == 404


def test_body_over_256_mib_is_413(client) -> None:
    r = client.post("/api/cache/cas/big" + T, data=b"x",
                    environ_overrides={"CONTENT_LENGTH": str(256 * 1024 * 1024 + 1)})
    assert r.status_code == 413 and "message" in r.json


def test_truncated_upload_is_rejected_and_invisible(client) -> None:
    r = client.post("/api/cache/cas/short" + T, data=b"abc", environ_overrides={"CONTENT_LENGTH": "10"})
    assert r.status_code == 400
    assert "Incomplete body" in r.json["message"]
    assert client.get("/api/cache/cas/short" + T).status_code == 404


@pytest.mark.parametrize("cas_id,message", [
    ("..", "Invalid CAS id: path traversal is not allowed"),
    ("%2E", "Invalid CAS id: path traversal is not allowed"),
    ("a%00b", "Invalid CAS id: control characters are not allowed"),
    ("a%0Ab", "Invalid CAS id: control characters are not allowed"),
    ("x" * 1025, "Invalid CAS id: longer than 1024 bytes"),
    ("a%5Cb", "Invalid CAS id: slashes are not allowed"),
])
def test_bad_ids_are_rejected(client, cas_id: str, message: str) -> None:
    for method in ("GET", "POST"):
        r = client.open(f"/api/cache/cas/{cas_id}" + T, method=method, data=b"x")
        assert r.status_code == 400 and r.json == {"message": message}


def test_encoded_slash_traversal_is_refused(client) -> None:
    r = client.get("/api/cache/cas/..%2F..%2Fetc%2Fpasswd" + T)
    assert r.status_code == 400 and r.json == {"message": "Invalid CAS id: slashes are not allowed"}


def test_wrong_method_has_allow_header(client) -> None:
    r = client.delete("/api/cache/cas/abc" + T)
    assert r.status_code == 405
    assert set(r.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert r.json == {"message": "Method not allowed"}
