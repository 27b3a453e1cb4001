"""Gradle, Nx and Metro routes."""
from __future__ import annotations

import io

T = "?tenant_id=acme"


def test_gradle_put_201_then_200_and_get(client) -> None:
    assert client.put("/api/cache/gradle/k1" + T, data=b"v1").status_code == 201
    assert client.put("/api/cache/gradle/k1" + T, data=b"v2").status_code == 200
    assert client.get("/api/cache/gradle/k1" + T).data == b"v2"
    assert client.get("/api/cache/gradle/k2" + T).status_code == 404


def test_stock_gradle_path_routes_share_the_namespace(client) -> None:
    assert client.put("/gradle/acme/_/k1", data=b"tenant-wide").status_code == 201
    assert client.get("/api/cache/gradle/k1" + T).data == b"tenant-wide"
    client.put("/gradle/acme/app/k1", data=b"project")
    assert client.get("/api/cache/gradle/k1?tenant_id=acme&namespace_id=app").data == b"project"
    assert client.get("/gradle/acme/app/k1/").data == b"project"  # Gradle's trailing slash base URL


# A hook for stock Gradle: Basic credentials per project, checked against the path's
# tenant and namespace (base64 of "ci:secret" and "other:secret").
GRADLE_BASIC = """
local USERS = { ["Basic Y2k6c2VjcmV0"] = "app", ["Basic b3RoZXI6c2VjcmV0"] = "other" }

function authenticate(ctx)
  local project = USERS[ctx.headers.authorization or ""]
  if project == nil then return { deny = { status = 401, message = "Bad credentials" } } end
  return { principal = { id = project, kind = "basic", attributes = {} } }
end

function authorize(ctx, principal)
  return { allow = ctx.tenant_id == "acme" and ctx.namespace_id == principal.id
                   and ctx.artifact_key == "k9" and ctx.producer == "gradle" }
end
"""


def test_stock_gradle_basic_credentials_reach_the_hook(hooked_app) -> None:
    client = hooked_app(GRADLE_BASIC).test_client()
    ci = {"Authorization": "Basic Y2k6c2VjcmV0"}
    other = {"Authorization": "Basic b3RoZXI6c2VjcmV0"}
    r = client.put("/gradle/acme/app/k9", data=b"x")
    assert r.status_code == 401 and r.json == {"message": "Bad credentials"}
    r = client.put("/gradle/acme/app/k9", data=b"x", headers={"Authorization": "Basic Y2k6d3Jvbmc="})
    assert r.status_code == 401 and r.json == {"message": "Bad credentials"}
    r = client.put("/gradle/acme/app/k9", data=b"x", headers=other)
    assert r.status_code == 403 and r.json == {"message": "Forbidden"}
    assert client.put("/gradle/acme/app/k9", data=b"x", headers=ci).status_code == 201
    assert client.get("/gradle/acme/app/k9/", headers=ci).data == b"x"
    assert client.get("/gradle/acme/app/k9/", headers=other).status_code == 403
    assert client.get("/gradle/other/app/k9/", headers=ci).status_code == 403


def test_nx_put_get_and_namespaces(client) -> None:
    assert client.put("/v1/cache/abc", data=b"nx-out").status_code == 200
    assert client.put("/v1/cache/abc", data=b"nx-out").status_code == 200
    assert client.get("/v1/cache/abc").data == b"nx-out"
    assert client.get("/v1/cache/zzz").status_code == 404
    client.put("/nx/proj/v1/cache/abc", data=b"proj-out")
    assert client.get("/nx/proj/v1/cache/abc").data == b"proj-out"
    assert client.get("/v1/cache/abc?namespace_id=proj").data == b"proj-out"


def test_metro_chunked_upload_without_content_length(client) -> None:
    body = io.BytesIO(b"gzipped-bytes" * 1000)
    r = client.put("/api/metro/cache/m1", input_stream=body,
                   headers={"Transfer-Encoding": "chunked"},
                   environ_overrides={"wsgi.input_terminated": True})
    assert r.status_code == 200
    assert client.get("/api/metro/cache/m1").data == b"gzipped-bytes" * 1000


def test_clean_namespace(client) -> None:
    client.post("/api/cache/cas/a?tenant_id=acme&namespace_id=p", data=b"1")
    client.put("/api/cache/gradle/g?tenant_id=acme&namespace_id=p", data=b"2")
    client.put("/api/cache/gradle/g?tenant_id=acme&namespace_id=q", data=b"3")
    assert client.delete("/api/cache/clean?tenant_id=acme&namespace_id=p").status_code == 204
    assert client.get("/api/cache/cas/a?tenant_id=acme&namespace_id=p").status_code == 404
    assert client.get("/api/cache/gradle/g?tenant_id=acme&namespace_id=p").status_code == 404
    assert client.get("/api/cache/gradle/g?tenant_id=acme&namespace_id=q").data == b"3"
    assert client.delete("/api/cache/clean").status_code == 400
