"""Route declarations (``app.http.routes``): one per rule, what the hooks see, no redirects."""
from __future__ import annotations

import json
import pytest

HOOKS_SEE_CTX = """
function authenticate(ctx)
  local who = string.match(ctx.headers.authorization or "", "^Bearer (.+)$")
  if who == nil then return { anonymous = true, ttl_seconds = 0 } end
  return { principal = { id = who, kind = "token", attributes = {} }, ttl_seconds = 0 }
end

-- A token named after a namespace may write only there; everyone may read.
function authorize(ctx, principal)
  if ctx.operation ~= "artifact.write" or principal == nil then return { allow = true, ttl_seconds = 0 } end
  return { allow = (ctx.namespace_id or "") == principal.id, ttl_seconds = 0 }
end

function response_headers(ctx, principal)
  local h = {}
  for _, name in ipairs({ "route", "operation", "tenant_id", "namespace_id", "producer",
                          "artifact_key", "artifact_hash" }) do
    h["x-ctx-" .. string.gsub(name, "_", "-")] = ctx[name] or "nil"
  end
  return { headers = h }
end
"""


@pytest.fixture
def ctx_client(hooked_app):  # type: ignore[no-untyped-def]
    return hooked_app(HOOKS_SEE_CTX, tenant="acme").test_client()


def seen(response) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {name[len("x-ctx-"):].replace("-", "_"): value
            for name, value in response.headers.items() if name.lower().startswith("x-ctx-")}


def test_every_rule_has_its_route_declaration(app) -> None:
    from app.http.probes import PROBE_ENDPOINTS
    from app.http.routes import SPECS, spec_for

    undeclared = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PROBE_ENDPOINTS:
            continue
        spec = spec_for(rule.endpoint)
        if spec is None:
            undeclared.append(rule.rule)
            continue
        assert rule.rule == spec.flask_rule
        assert set(rule.methods or ()) - {"HEAD"} == set(spec.methods) - {"HEAD"}
    assert undeclared == []
    # ... and every declaration is a rule of the app (none registered on a stray blueprint).
    assert set(SPECS) == {r.endpoint for r in app.url_map.iter_rules()} - PROBE_ENDPOINTS


def test_an_undeclared_endpoint_is_refused_when_hooks_are_enabled(hooked_app) -> None:
    app = hooked_app("function authorize(ctx, p) return { allow = true } end")
    app.add_url_rule("/api/cache/extra/<key>", "extra", lambda key: "served " + key)
    client = app.test_client()
    r = client.get("/api/cache/extra/k")
    assert r.status_code == 403 and r.json == {"message": "Forbidden"}
    assert client.get("/up").status_code == 200  # probes stay open


CTX_CASES = [
    ("GET", "/api/cache/cas/c1?tenant_id=acme&namespace_id=p", 404, None,
     dict(route="/api/cache/cas/{id}", operation="artifact.read", tenant_id="acme", namespace_id="p",
          producer="xcode", artifact_key="blob/c1", artifact_hash="c1")),
    ("POST", "/api/cache/cas/c1?account_handle=acme", 204, b"x",
     dict(route="/api/cache/cas/{id}", operation="artifact.write", tenant_id="acme", namespace_id="nil",
          producer="xcode", artifact_key="blob/c1", artifact_hash="c1")),
    ("PUT", "/api/cache/keyvalue?tenant_id=acme&project_handle=p", 204, b'{"cas_id":"kv1","entries":[]}',
     dict(route="/api/cache/keyvalue", operation="artifact.write", tenant_id="acme", namespace_id="p",
          producer="xcode", artifact_key="action_cache/kv1", artifact_hash="nil")),
    ("GET", "/api/cache/keyvalue/kv1?tenant_id=acme", 404, None,
     dict(route="/api/cache/keyvalue/{cas_id}", operation="artifact.read", tenant_id="acme",
          namespace_id="nil", producer="xcode", artifact_key="action_cache/kv1", artifact_hash="nil")),
    ("HEAD", "/api/cache/module/ignored?tenant_id=acme&hash=h1&name=M&cache_category=tests", 404, None,
     dict(route="/api/cache/module/{id}", operation="artifact.inspect", tenant_id="acme",
          namespace_id="nil", producer="module", artifact_key="tests/h1/M", artifact_hash="h1")),
    ("POST", "/api/cache/module/start?tenant_id=acme&hash=h1&name=M", 200, None,
     dict(route="/api/cache/module/start", operation="artifact.write", tenant_id="acme",
          namespace_id="nil", producer="module", artifact_key="builds/h1/M", artifact_hash="h1")),
    ("GET", "/gradle/acme/app/k1/", 404, None,
     dict(route="/gradle/{tenant_id}/{namespace_id}/{cache_key}", operation="artifact.read",
          tenant_id="acme", namespace_id="app", producer="gradle", artifact_key="k1", artifact_hash="k1")),
    ("PUT", "/api/cache/gradle/k1?tenant_id=acme", 201, b"g",
     dict(route="/api/cache/gradle/{cache_key}", operation="artifact.write", tenant_id="acme",
          namespace_id="nil", producer="gradle", artifact_key="k1", artifact_hash="k1")),
    ("GET", "/v1/cache/n1", 404, None,
     dict(route="/v1/cache/{hash}", operation="artifact.read", tenant_id="acme", namespace_id="nx",
          producer="nx", artifact_key="n1", artifact_hash="n1")),
    ("PUT", "/nx/proj/v1/cache/n1", 200, b"n",
     dict(route="/nx/{namespace_id}/v1/cache/{hash}", operation="artifact.write", tenant_id="acme",
          namespace_id="proj", producer="nx", artifact_key="n1", artifact_hash="n1")),
    ("GET", "/api/metro/cache/m1", 404, None,
     dict(route="/api/metro/cache/{cache_key}", operation="artifact.read", tenant_id="acme",
          namespace_id="metro", producer="metro", artifact_key="m1", artifact_hash="m1")),
    ("DELETE", "/api/cache/clean?tenant_id=acme&namespace_id=p", 204, None,
     dict(route="/api/cache/clean", operation="namespace.delete", tenant_id="acme", namespace_id="p",
          producer="nil", artifact_key="nil", artifact_hash="nil")),
]


@pytest.mark.parametrize("method,url,status,body,expected", CTX_CASES, ids=[c[1] for c in CTX_CASES])
def test_hooks_see_what_kura_gives_them(ctx_client, method: str, url: str, status: int,
                                        body: bytes | None, expected: dict[str, str]) -> None:
    r = ctx_client.open(url, method=method, data=body)
    assert r.status_code == status
    assert seen(r) == expected


def test_module_part_and_complete_are_authorized_for_the_upload_namespace(ctx_client) -> None:
    """A token for namespace b cannot write into namespace a's upload by naming b in the query."""
    a, b = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
    q = "tenant_id=acme&hash=h&name=M"
    upload_id = ctx_client.post(f"/api/cache/module/start?{q}&namespace_id=a", headers=a).json["upload_id"]
    spoof = f"tenant_id=acme&namespace_id=b&upload_id={upload_id}"
    r = ctx_client.post(f"/api/cache/module/part?{spoof}&part_number=1", data=b"evil", headers=b)
    assert r.status_code == 403
    assert seen(r)["namespace_id"] == "a" and seen(r)["artifact_key"] == "builds/h/M"
    assert ctx_client.post(f"/api/cache/module/complete?{spoof}", json={"parts": [1]},
                           headers=b).status_code == 403
    own = f"tenant_id=acme&upload_id={upload_id}"
    r = ctx_client.post(f"/api/cache/module/part?{own}&part_number=1", data=b"good", headers=a)
    assert r.status_code == 204 and seen(r)["artifact_hash"] == "h"
    assert ctx_client.post(f"/api/cache/module/complete?{own}", json={"parts": [1]},
                           headers=a).status_code == 204
    assert ctx_client.get(f"/api/cache/module/x?{q}&namespace_id=a").data == b"good"


# Every artifact route, with a key that holds an encoded slash: refused, never redirected.
ENCODED_SLASH = [
    ("GET", "/api/cache/cas/%2Fvictim?tenant_id=acme", "Invalid CAS id: slashes are not allowed"),
    ("POST", "/api/cache/cas/a%2F..%2Fb?tenant_id=acme", "Invalid CAS id: slashes are not allowed"),
    ("GET", "/api/cache/keyvalue/%2Fv?tenant_id=acme", "Invalid cas_id: slashes are not allowed"),
    ("GET", "/api/cache/gradle/%2Fk?tenant_id=acme", "Invalid cache key: slashes are not allowed"),
    ("PUT", "/api/cache/gradle/k%2F?tenant_id=acme", "Invalid cache key: slashes are not allowed"),
    ("GET", "/gradle/acme/_/%2Fk", "Invalid cache key: slashes are not allowed"),
    ("GET", "/gradle/acme/a%2Fb/k", "Invalid namespace_id: slashes are not allowed"),
    ("GET", "/v1/cache/%2Fh", "Invalid hash: slashes are not allowed"),
    ("PUT", "/nx/p%2Fq/v1/cache/h", "Invalid namespace_id: slashes are not allowed"),
    ("GET", "/api/metro/cache/%2Fm", "Invalid cache key: slashes are not allowed"),
    ("GET", "/api/cache/module/x?tenant_id=acme&hash=%2Fh&name=M", "Invalid hash: slashes are not allowed"),
]
# Literal extra or missing segments: no route of that shape.
NO_SUCH_ROUTE = ["/api/cache/cas/a//b?tenant_id=acme", "/api//cache/cas/b?tenant_id=acme",
                 "/api/cache/cas/a/b?tenant_id=acme", "/v1/cache/h/", "/v1//cache/h",
                 "/api/cache/module/a/b?tenant_id=acme&hash=h&name=M", "/gradle/acme/_//k"]


@pytest.mark.parametrize("method,url,message", ENCODED_SLASH)
def test_an_encoded_slash_in_a_key_is_refused(client, method: str, url: str, message: str) -> None:
    r = client.open(url, method=method, data=b"x" if method in ("PUT", "POST") else None)
    assert r.status_code == 400 and r.json == {"message": message}


def test_options_is_not_a_declared_method(client) -> None:
    r = client.open("/api/cache/cas/c1?tenant_id=acme", method="OPTIONS")
    assert r.status_code == 405 and set(r.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST"}


@pytest.mark.parametrize("url", NO_SUCH_ROUTE)
def test_a_path_of_another_shape_is_404_not_a_redirect(client, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 404 and r.json == {"message": "Not found"}


def test_keys_are_served_under_their_exact_percent_decoded_name(client) -> None:
    assert client.put("/api/cache/gradle/a%20b%2Bc?tenant_id=acme", data=b"v").status_code == 201
    assert client.get("/api/cache/gradle/a b+c?tenant_id=acme").data == b"v"
    assert client.get("/api/cache/gradle/a%20b+c?tenant_id=acme").data == b"v"
    r = client.get("/api/cache/gradle/%FF?tenant_id=acme")
    assert r.status_code == 400 and r.json == {"message": "Invalid cache key: not valid UTF-8"}


def test_query_parameters_read_as_kura_reads_them(client) -> None:
    assert client.put("/api/cache/gradle/q?tenant_id=acme&namespace_id=p", data=b"p").status_code == 201
    # An empty tenant_id is missing, whatever the alias says.
    r = client.get("/api/cache/gradle/q?tenant_id=&account_handle=acme&namespace_id=p")
    assert r.status_code == 400 and r.json == {"message": "Missing tenant_id"}
    # An empty namespace_id is the tenant-wide namespace, whatever the alias says.
    assert client.get("/api/cache/gradle/q?tenant_id=acme&namespace_id=&project_handle=p").status_code == 404
    # A repeated name keeps its last value.
    assert client.get("/api/cache/gradle/q?tenant_id=acme&namespace_id=x&namespace_id=p").data == b"p"
    assert client.get("/api/cache/gradle/q?account_handle=acme&project_handle=%70").data == b"p"


def test_a_route_parses_its_target_from_the_raw_path_and_query() -> None:
    from app.http import gradle, nx, xcode_cas
    from app.http.routes import SPECS

    cas = SPECS["xcode_cas.download"]
    t = cas.parse_target("/api/cache/cas/%61b", "account_handle=t&project_handle=p&x=%FF", "node")
    assert (t.tenant_id, t.namespace_id, t.key, t.artifact_hash) == ("t", "p", "blob/ab", "ab")
    assert t.query.to_dict() == {"account_handle": "t", "project_handle": "p", "x": "\ufffd"}
    t = SPECS["gradle.get_by_path"].parse_target("/gradle/t/_/k/", "", "node")
    assert (t.tenant_id, t.namespace_id, t.key) == ("t", "", "k")
    t = SPECS["nx.get"].parse_target("/v1/cache/h", "", "node")
    assert (t.tenant_id, t.namespace_id, t.key) == ("node", "nx", "h")
    assert xcode_cas.bp and gradle.bp and nx.bp


def test_keyvalue_document_is_stored_exactly_as_kura_stores_it(client) -> None:
    body = json.dumps({"cas_id": "kv", "extra": 1,
                       "entries": [{"value": "caf\u00e9", "other": True}, {"value": "b"}]})
    assert client.put("/api/cache/keyvalue?tenant_id=acme", data=body,
                      content_type="application/json").status_code == 204
    r = client.get("/api/cache/keyvalue/kv?tenant_id=acme")
    assert json.loads(r.data) == {"entries": [{"value": "caf\u00e9"}, {"value": "b"}]}
    assert r.data == '{"entries":[{"value":"caf\u00e9"},{"value":"b"}]}'.encode()
    assert r.headers["Content-Type"] == "application/json"
