"""Hostile ids, query values and JSON bodies on every HTTP route: 4xx with a JSON message,
never a 500. Named regressions first, then generated requests through the Flask app and
through a real node."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from app.http import gradle, keyvalue, metro, module_cache, namespaces, nx, xcode_cas  # noqa: F401
from app.http.bodies import MAX_JSON_DEPTH
from app.http.routes import SPECS
from tests.http.raw_http import exchange

T = "tenant_id=acme"
KV = f"/api/cache/keyvalue?{T}"
DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE_INT = "9" * 5000
SURROGATE = '"\\ud800"'  # a lone surrogate, escaped as JSON allows


def start_upload(client: Any, name: str = "n") -> str:
    return client.post(f"/api/cache/module/start?{T}&hash=h&name={name}").json["upload_id"]


def put_kv(client: Any, body: bytes) -> Any:
    return client.put(KV, data=body, content_type="application/json")


@pytest.mark.parametrize("body, message", [
    (DEEP, f"Invalid key-value payload: nested deeper than {MAX_JSON_DEPTH} levels"),
    (b'{"cas_id": "c", "entries": []}'.replace(b"[]", b"[" * 40 + b"]" * 40),
     f"Invalid key-value payload: nested deeper than {MAX_JSON_DEPTH} levels"),
    (f'{{"cas_id": "c", "entries": [], "n": {HUGE_INT}}}'.encode(),
     "Invalid key-value payload: malformed JSON (ValueError)"),
    (f'{{"cas_id": {SURROGATE}, "entries": []}}'.encode(),
     "Invalid key-value payload: a string is not valid Unicode (lone surrogate)"),
    (f'{{"cas_id": "c", "entries": [{{"value": {SURROGATE}}}]}}'.encode(),
     "Invalid key-value payload: a string is not valid Unicode (lone surrogate)"),
    (b'{"cas_id": "c", "entries": [], "n": NaN}', "Invalid key-value payload: malformed JSON (ValueError)"),
    (b'{"cas_id": "\xed\xa0\x80", "entries": []}', "Invalid key-value payload: not valid UTF-8"),
])
def test_keyvalue_refuses_what_json_cannot_hold(client, body: bytes, message: str) -> None:
    r = put_kv(client, body)
    assert (r.status_code, r.json) == (400, {"message": message})


def test_keyvalue_keeps_documents_up_to_the_depth_limit(client) -> None:
    nested: Any = "v"
    for _ in range(MAX_JSON_DEPTH - 3):  # the document, entries and entry levels come on top
        nested = [nested]
    r = put_kv(client, json.dumps({"cas_id": "c", "entries": [{"value": "v", "x": nested}]}).encode())
    assert r.status_code == 204
    assert client.get(f"/api/cache/keyvalue/c?{T}").json == {"entries": [{"value": "v"}]}


@pytest.mark.parametrize("body, message", [
    (DEEP, f"Invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels"),
    (f'{{"parts": [{HUGE_INT}]}}'.encode(), "Invalid JSON body: malformed JSON (ValueError)"),
    (f'{{"parts": [1], {SURROGATE}: 1}}'.encode(),
     "Invalid JSON body: a string is not valid Unicode (lone surrogate)"),
])
def test_module_complete_refuses_what_json_cannot_hold(client, body: bytes, message: str) -> None:
    upload_id = start_upload(client)
    assert client.post(f"/api/cache/module/part?{T}&upload_id={upload_id}&part_number=1",
                       data=b"p").status_code == 204
    r = client.post(f"/api/cache/module/complete?{T}&upload_id={upload_id}", data=body)
    assert (r.status_code, r.json) == (400, {"message": message})


@pytest.mark.parametrize("number", ["%C2%B2", "%D9%A3", "1" * 5000, "+1", "1.0", "-1", "0", "10001"])
def test_part_numbers_are_ascii_decimals_in_range(client, number: str) -> None:
    upload_id = start_upload(client)
    r = client.post(f"/api/cache/module/part?{T}&upload_id={upload_id}&part_number={number}", data=b"p")
    assert (r.status_code, r.json) == (400, {"message": "Invalid part_number"})


def test_cli_version_with_an_absurd_number_is_an_old_client(client) -> None:
    upload_id = start_upload(client)
    client.post(f"/api/cache/module/part?{T}&upload_id={upload_id}&part_number=1", data=b"p")
    assert client.post(f"/api/cache/module/complete?{T}&upload_id={upload_id}",
                       json={"parts": [1]}).status_code == 204
    for version in (HUGE_INT, "4." + HUGE_INT, "\u0664.202.0"):
        r = client.post(f"/api/cache/module/start?{T}&hash=h&name=n",
                        headers={"x-tuist-cli-version": version})
        assert (r.status_code, r.json) == (200, {"upload_id": None})


@pytest.mark.parametrize("url", [
    f"/api/cache/gradle/%ED%A0%80?{T}", "/api/cache/gradle/k?tenant_id=%ED%A0%80",
    f"/api/cache/module/start?{T}&hash=%ED%A0%80&name=n", "/gradle/%ED%A0%80/_/k",
])
def test_encoded_surrogates_in_ids_are_400(client, url: str) -> None:
    r = client.get(url) if "/start" not in url else client.post(url)
    assert r.status_code == 400 and r.json["message"].endswith("not valid UTF-8")


# --- generated requests -----------------------------------------------------------------

# /ready is left out: its 503 says "not ready yet", whatever the request.
ROUTES = sorted({(spec.template, method) for spec in SPECS.values() for method in spec.methods}
                | {("/up", "GET"), ("/status/rollout", "GET"), ("/metrics", "GET")})
# The routes that read a JSON document or a number: drawn as often as all the others.
PARSING_ROUTES = [("/api/cache/keyvalue", "PUT"), ("/api/cache/module/complete", "POST"),
                  ("/api/cache/module/part", "POST"), ("/api/cache/module/start", "POST")]
QUERY_NAMES = ["tenant_id", "account_handle", "namespace_id", "project_handle", "hash", "name",
               "cache_category", "upload_id", "part_number"]
ODD_TEXT = ["", ".", "..", "_", "\u00b2", "\u0663", HUGE_INT, "\ud800", "\udcff", "a\x00b", "\n", "x" * 1100,
            "%", "a/b", "a\\b", "\u00e9", "\U0001f600", "1", "10000", "builds", "acme"]


def encoded(raw: bytes) -> str:
    return quote_from_bytes(raw, safe="")


text_values = st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=12))
hostile_component = st.one_of(
    text_values.map(lambda s: encoded(s.encode("utf-8", "surrogatepass"))),
    st.binary(max_size=12).map(encoded),
    st.sampled_from(["%2F", "%2E%2E", "%ED%A0%80", "%C2%B2", "%FF", "%zz", "%", "+"]),
)
json_leaves = st.one_of(
    text_values, st.sampled_from([10**400, -(10**400), 2**63, -1, 0, 1, 1.5, True, None]),
    st.integers(), st.floats(allow_nan=False),
)
json_values = st.recursive(json_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(text_values, inner, max_size=4)), max_leaves=12)
odd_documents = st.one_of(
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.sampled_from([f"[{HUGE_INT}]".encode(), b"[NaN]", b'["\\ud800"]', b"\xed\xa0\x80", b"{", b""]),
    st.binary(max_size=64),
)


def _dump(value: Any) -> bytes:
    return json.dumps(value).encode()  # lone surrogates become \ud800 escapes, huge ints digits


@st.composite
def keyvalue_document(draw: Any) -> bytes:
    doc = {"cas_id": draw(text_values),
           "entries": draw(st.lists(st.fixed_dictionaries({"value": text_values}), max_size=3))}
    if draw(st.booleans()):
        doc[draw(text_values)] = draw(json_values)
    return _dump(doc)


@st.composite
def request_body(draw: Any, template: str) -> bytes:
    if template == "/api/cache/keyvalue" and draw(st.booleans()):
        return draw(keyvalue_document())
    if template == "/api/cache/module/complete" and draw(st.booleans()):
        return _dump({"parts": draw(st.one_of(st.lists(json_leaves, max_size=4), json_values))})
    return draw(st.one_of(odd_documents, json_values.map(_dump)))


@st.composite
def hostile_request(draw: Any, upload_id: str) -> tuple[str, str, str, bytes, dict[str, str]]:
    """``(method, path, query string, body)`` aimed at one route."""
    template, method = draw(st.one_of(st.sampled_from(PARSING_ROUTES), st.sampled_from(ROUTES)))
    path = "/".join(draw(hostile_component) if part.startswith("{") else part
                    for part in template.split("/"))
    pairs = [("tenant_id", "acme")] if draw(st.integers(0, 9)) < 8 else []
    if "/module/" in template:
        pairs += [("hash", "h"), ("name", "n")] if draw(st.booleans()) else []
        pairs += [("upload_id", upload_id)] if draw(st.integers(0, 9)) < 7 else []
        pairs += [("part_number", draw(st.one_of(st.sampled_from(["1", "2"]), hostile_component)))]
    pairs += draw(st.lists(st.tuples(st.sampled_from(QUERY_NAMES), hostile_component), max_size=3))
    query = "&".join(f"{name}={value}" for name, value in draw(st.permutations(pairs)))
    body = draw(request_body(template)) if method in ("PUT", "POST") else b""
    headers = {"x-tuist-cli-version": draw(st.sampled_from(["4.202.0", HUGE_INT, "\u0664.1", "v1.2.3"]))}
    return method, path, query, body, headers


def assert_clean_answer(status: int, content_type: str, body: bytes, request: Any) -> None:
    assert status < 500, (request, status, body[:300])
    if status >= 400 and request[0] != "HEAD":
        assert content_type == "application/json", (request, status)
        assert isinstance(json.loads(body)["message"], str), (request, body[:300])


HYPOTHESIS = dict(deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))


def test_generated_hostile_requests_through_the_app(client) -> None:
    upload_id = start_upload(client, "fuzz")
    seen: Counter[int] = Counter()

    @settings(max_examples=500, **HYPOTHESIS)
    @given(hostile_request(upload_id))
    def answered(request: tuple[str, str, str, bytes, dict[str, str]]) -> None:
        method, path, query, body, headers = request
        r = client.open(path, method=method, query_string=query, data=body, headers=headers,
                        content_type="application/json")
        seen[r.status_code] += 1
        assert_clean_answer(r.status_code, r.mimetype, r.data, request)

    answered()
    assert {200, 400, 404}.issubset(seen), seen  # the requests reached the views


def test_generated_hostile_requests_through_a_real_node(node_factory) -> None:
    node = node_factory(start=False, KURA_HTTP_WORKERS="1")
    node.start(wait=False)
    node.wait_ready(path="/up")
    upload_id = exchange(node.port, f"POST /api/cache/module/start?{T}&hash=h&name=n HTTP/1.1\r\n"
                                    "Host: k\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
                         ).answers[0].json()["upload_id"]
    seen: Counter[int] = Counter()

    @settings(max_examples=250, **HYPOTHESIS)
    @given(hostile_request(upload_id))
    def answered(request: tuple[str, str, str, bytes, dict[str, str]]) -> None:
        method, path, query, body, headers = request
        target = path + ("?" + query if query else "")
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        head = (f"{method} {target} HTTP/1.1\r\nHost: kura\r\nConnection: close\r\n{extra}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        result = exchange(node.port, head.encode("utf-8") + body, timeout=10)
        assert len(result.answers) == 1, (request, result)
        answer = result.answers[0]
        seen[answer.status] += 1
        assert_clean_answer(answer.status, answer.headers.get("content-type", ""), answer.body, request)

    answered()
    assert {200, 400, 404}.issubset(seen), seen
