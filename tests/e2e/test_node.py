"""The real node: ``gunicorn -c gunicorn.conf.py`` as a subprocess on free loopback ports."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from app.node_state import NodeState, state_path
from app.storage.staging import RESERVE_STEP
from tests.nodes import REPO, make_node

T = "tenant_id=acme"


def metric(node, name: str) -> float:
    total = 0.0
    for line in requests.get(node.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_every_route_through_the_real_node(node, web) -> None:
    u = node.url
    up = web.get(u + "/up")
    assert up.http_version == web.http_version and up.json()["tenant_id"] == "default"
    assert web.get(u + "/ready").status_code == 200
    assert web.get(u + "/status/rollout").json()["state"] == "serving"
    assert web.post(f"{u}/api/cache/cas/c1?{T}", content=b"cas").status_code == 204
    assert web.get(f"{u}/api/cache/cas/c1?{T}").content == b"cas"
    assert web.put(f"{u}/api/cache/keyvalue?{T}",
                   json={"cas_id": "c1", "entries": [{"value": "v"}]}).status_code == 204
    assert web.get(f"{u}/api/cache/keyvalue/c1?{T}").json() == {"entries": [{"value": "v"}]}
    start = web.post(f"{u}/api/cache/module/start?{T}&hash=h&name=n").json()
    assert web.post(f"{u}/api/cache/module/part?{T}&upload_id={start['upload_id']}&part_number=1",
                    content=b"mod").status_code == 204
    assert web.post(f"{u}/api/cache/module/complete?{T}&upload_id={start['upload_id']}",
                    json={"parts": [1]}).status_code == 204
    assert web.head(f"{u}/api/cache/module/x?{T}&hash=h&name=n").status_code == 204
    assert web.get(f"{u}/api/cache/module/x?{T}&hash=h&name=n").content == b"mod"
    assert web.put(f"{u}/api/cache/gradle/g1?{T}", content=b"gr").status_code == 201
    assert web.get(f"{u}/gradle/acme/_/g1").content == b"gr"
    assert web.put(f"{u}/v1/cache/n1", content=b"nx").status_code == 200
    assert web.get(f"{u}/v1/cache/n1").content == b"nx"
    assert web.put(f"{u}/api/metro/cache/m1", content=b"metro").status_code == 200
    assert web.get(f"{u}/api/metro/cache/m1").content == b"metro"
    assert web.delete(f"{u}/api/cache/clean?{T}").status_code == 204
    assert web.get(f"{u}/api/cache/gradle/g1?{T}").status_code == 404
    r = web.get(u + "/_internal/status")
    assert r.status_code == 404 and r.json() == {"message": "Not found"}
    wrong = web.request("PATCH", f"{u}/api/cache/gradle/g1?{T}")
    assert wrong.status_code == 405 and "GET" in wrong.headers["Allow"]
    assert wrong.json()["message"]
    # The internal plane is the replicator's HTTP/1.1 server, not the public port.
    assert requests.get(node.internal_url + "/_internal/status").json()["tenant_id"] == "default"
    assert web.get(f"{u}/metrics").text.count("kura_http_requests_total{") > 0


def test_upload_without_content_length(node, web) -> None:
    """Metro's uploads: HTTP/1.1 chunked, HTTP/2 DATA frames with no content-length."""
    chunks = [os.urandom(100_000) for _ in range(20)]
    r = web.put(f"{node.url}/api/metro/cache/chunky", content=iter(chunks))
    assert r.status_code == 200 and r.http_version == web.http_version
    assert web.get(f"{node.url}/api/metro/cache/chunky").content == b"".join(chunks)


def test_64_mib_round_trip(node, web, tmp_path) -> None:
    """HTTP/1.1 sends a large hit with sendfile; HTTP/2 must frame it, from segment reads.
    The upload goes through curl over the same protocol: httpx's HTTP/2 uploads crawl
    (about 0.6 MiB/s here, where curl's h2 upload of the same 64 MiB takes under a second)."""
    h1 = web.http_version == "HTTP/1.1"
    path = "sendfile" if h1 else "read"
    data = os.urandom(64 * 1024 * 1024)
    body = tmp_path / "big"
    body.write_bytes(data)
    before = metric(node, f'kura_artifact_serving_paths_total{{path="{path}"}}')
    upload = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
         "--http1.1" if h1 else "--http2-prior-knowledge", "-X", "PUT", "--data-binary", f"@{body}",
         f"{node.url}/api/cache/gradle/big?{T}"], capture_output=True, text=True, timeout=120)
    assert upload.stdout == ("201 1.1" if h1 else "201 2"), upload.stderr
    digest = hashlib.sha256()
    with web.stream("GET", f"{node.url}/api/cache/gradle/big?{T}") as r:
        assert r.headers["Content-Length"] == str(len(data))
        for chunk in r.iter_bytes(1024 * 1024):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert metric(node, f'kura_artifact_serving_paths_total{{path="{path}"}}') == before + 1


def test_50_concurrent_uploads_and_reads(node) -> None:
    blobs = {f"k{i}": os.urandom(50_000 + i) for i in range(50)}

    def upload(key: str) -> int:
        return requests.put(f"{node.url}/api/cache/gradle/{key}?{T}", data=blobs[key]).status_code

    def read(key: str) -> bytes:
        return requests.get(f"{node.url}/api/cache/gradle/{key}?{T}").content

    with ThreadPoolExecutor(50) as pool:
        assert set(pool.map(upload, blobs)) == {201}
        assert list(pool.map(read, blobs)) == list(blobs.values())
    # Metrics from both workers are aggregated into one /metrics.
    assert metric(node, 'kura_artifact_writes_total{producer="gradle",result="ok"}') == 50


def test_truncated_upload_from_a_disconnecting_client_is_invisible(node) -> None:
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(f"PUT /api/cache/gradle/cut?{T} HTTP/1.1\r\nHost: x\r\n"
                     "Content-Length: 100000\r\n\r\n".encode() + b"x" * 5000)
        time.sleep(0.2)
    time.sleep(0.5)
    assert requests.get(f"{node.url}/api/cache/gradle/cut?{T}").status_code == 404
    assert os.listdir(node.data_dir / "tmp" / "staging") == []


def test_errors_below_flask_are_json(node) -> None:
    # gunicorn refuses a request line over limit_request_line (8190) with 414 URI Too Long.
    target = f"/api/cache/cas/{'x' * 9000}?{T}"
    r = requests.get(node.url + target)
    assert r.status_code == 414
    assert r.headers["Content-Type"] == "application/json"
    # The size is what gunicorn had read when it gave up: with h2c on, the first bytes of a
    # connection are read ahead (the HTTP/2 preface check), so it is not the whole line.
    seen = re.fullmatch(r"Request Line is too large \((\d+) > 8190\)", r.json()["message"])
    assert seen is not None and 8190 < int(seen.group(1)) <= len(f"GET {target} HTTP/1.1")


def test_second_node_on_same_directory_is_refused(node, tmp_path) -> None:
    second = make_node(tmp_path, "second", KURA_DATA_DIR=str(node.data_dir))
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=REPO,
                          env=second.env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "in use by another kura-py node" in proc.stderr
    assert requests.get(node.url + "/up").status_code == 200


def test_invalid_configuration_fails_naming_the_variable(tmp_path) -> None:
    node = make_node(tmp_path, "bad", KURA_PORT="not-a-port")
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=REPO,
                          env=node.env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "KURA_PORT" in proc.stderr


def test_sigkill_mid_upload_then_restart(node_factory) -> None:
    """SIGKILL to every process while five uploads are half-way in: after a restart every
    acknowledged upload is there byte for byte and none of the five is."""
    node = node_factory("crashy")
    acknowledged = {}
    for i in range(20):
        data = os.urandom(200_000)
        assert requests.put(f"{node.url}/api/cache/gradle/ok{i}?{T}", data=data).status_code == 201
        acknowledged[f"ok{i}"] = data

    # Each body stops after one and a half staging steps. Before the SIGKILL all five are
    # in the app (the node's in-flight count) and their bytes are arriving: the node
    # reserves its tmp budget (in its shared state) a step at a time as a body is staged.
    first_part = RESERVE_STEP + RESERVE_STEP // 2
    in_flight = 5
    release = threading.Event()
    outcomes: dict[int, object] = {}

    def held_body():
        for offset in range(0, first_part, 64 * 1024):
            yield b"p" * min(64 * 1024, first_part - offset)
        release.wait(60)
        yield b"never sent"

    def held_upload(i: int) -> None:
        try:
            outcomes[i] = requests.put(f"{node.url}/api/cache/gradle/partial{i}?{T}",
                                       data=held_body(), timeout=60).status_code
        except requests.RequestException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=held_upload, args=(i,), daemon=True) for i in range(in_flight)]
    for t in threads:
        t.start()
    node_state = NodeState(state_path(node.run_dir))
    deadline = time.monotonic() + 20
    while True:
        inflight = requests.get(node.url + "/status/rollout").json()["http_inflight_requests"]
        staged = node_state.tmp_bytes()
        if inflight == in_flight and staged >= in_flight * RESERVE_STEP:
            break
        assert time.monotonic() < deadline, (inflight, staged)
        time.sleep(0.05)
    node_state.close()

    node.kill_all()
    release.set()  # the clients go on sending and find the node gone
    for t in threads:
        t.join(10)
    assert all(isinstance(outcomes.get(i), requests.RequestException) for i in range(in_flight)), outcomes
    node.start()
    for key, data in acknowledged.items():
        assert requests.get(f"{node.url}/api/cache/gradle/{key}?{T}").content == data
    for i in range(in_flight):
        assert requests.get(f"{node.url}/api/cache/gradle/partial{i}?{T}").status_code == 404
    assert os.listdir(node.data_dir / "tmp" / "staging") == []


def test_sigterm_drains_inflight_then_exits(node, web) -> None:
    """An upload in flight (an HTTP/1.1 request, or an HTTP/2 stream) finishes; new requests
    get 503 meanwhile."""
    results: dict[str, object] = {}
    release = threading.Event()

    def slow_body():
        yield b"x" * 100_000
        release.wait(20)
        yield b"y" * 100_000

    def upload() -> None:
        r = web.put(f"{node.url}/api/cache/gradle/drain?{T}", content=slow_body(), timeout=30)
        results["status"], results["version"] = r.status_code, r.http_version

    thread = threading.Thread(target=upload)
    thread.start()
    deadline = time.monotonic() + 10
    while requests.get(node.url + "/status/rollout").json()["http_inflight_requests"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = node.known_pids()
    signalled_at = time.monotonic()
    node.signal(signal.SIGTERM)
    time.sleep(0.5)
    ready = requests.get(node.url + "/ready")
    assert ready.status_code == 503 and ready.json()["state"] == "draining"
    refused = requests.get(f"{node.url}/api/cache/gradle/other?{T}")
    assert refused.status_code == 503
    assert refused.json() == {"message": "server is draining"}
    assert refused.headers["Connection"].lower() == "close"
    release.set()
    thread.join(30)
    assert results == {"status": 201, "version": web.http_version}
    node.expect_clean_stop(signalled_at, before)


def test_broken_hook_script_fails_at_start_naming_the_variable(tmp_path) -> None:
    script = tmp_path / "broken.lua"
    script.write_text("function authenticate(ctx) return {")
    node = make_node(tmp_path, "badhook", KURA_EXTENSION_SCRIPT_PATH=str(script))
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=REPO,
                          env=node.env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "KURA_EXTENSION_SCRIPT_PATH" in proc.stderr


def test_hooks_guard_the_real_node(node_factory, web) -> None:
    script = REPO / "examples" / "hooks" / "static_tokens.lua"
    node = node_factory("hooked", KURA_EXTENSION_SCRIPT_PATH=str(script),
                        KURA_EXTENSION_STATIC_READ_TOKENS="ro", KURA_EXTENSION_STATIC_WRITE_TOKENS="rw")
    url = f"{node.url}/api/cache/gradle/k?{T}"
    assert web.put(url, content=b"v", headers={"Authorization": "Bearer ro"}).status_code == 403
    assert web.put(url, content=b"v", headers={"Authorization": "Bearer rw"}).status_code == 201
    read = web.get(url, headers={"Authorization": "Bearer ro"})
    assert read.content == b"v" and read.http_version == web.http_version
    assert web.get(url).status_code == 401
    assert web.get(node.url + "/up").status_code == 200


def test_download_fast_path_agrees_with_the_blueprints(node, web) -> None:
    u = node.url
    web.put(f"{u}/api/cache/keyvalue?{T}", json={"cas_id": "kv", "entries": [{"value": "v"}]})
    web.post(f"{u}/api/cache/cas/c?{T}&namespace_id=p", content=b"c" * 10, headers={"Content-Type": "x/y"})
    big = os.urandom(200_000)
    web.put(f"{u}/gradle/acme/proj/g", content=big)
    web.put(f"{u}/nx/proj/v1/cache/n", content=b"nx")
    before = metric(node, 'kura_http_requests_total{route="/api/cache/cas/{id}",status="200"}')
    kv = web.get(f"{u}/api/cache/keyvalue/kv?{T}")
    assert kv.json() == {"entries": [{"value": "v"}]} and kv.headers["Content-Type"] == "application/json"
    cas = web.get(f"{u}/api/cache/cas/c?account_handle=acme&project_handle=p")
    assert cas.content == b"c" * 10 and cas.headers["Content-Type"] == "x/y"
    assert cas.headers["Server"] == "kura", "a hit must be answered by the fast path"
    assert cas.http_version == web.http_version
    assert web.get(f"{u}/gradle/acme/proj/g/").content == big
    assert web.get(f"{u}/api/cache/gradle/g?{T}&namespace_id=proj").content == big
    assert web.get(f"{u}/v1/cache/n?namespace_id=proj").content == b"nx"
    head = web.head(f"{u}/nx/proj/v1/cache/n")
    assert head.status_code == 200 and head.headers["Content-Length"] == "2" and head.content == b""
    # What the fast path leaves to the blueprint still gets the blueprint's answers.
    assert web.get(f"{u}/api/cache/cas/c").json() == {"message": "Missing tenant_id"}
    miss = web.get(f"{u}/api/cache/cas/c?{T}")
    assert miss.status_code == 404 and miss.headers["Server"] != "kura"  # the blueprint's 404
    dots = web.get(f"{u}/api/cache/cas/%2E%2E?{T}")  # a client could resolve a literal ..
    assert dots.status_code == 400
    assert dots.json() == {"message": "Invalid CAS id: path traversal is not allowed"}
    # Both paths read the query alike: an empty tenant_id is missing even with an alias.
    empty = web.get(f"{u}/api/cache/cas/c?tenant_id=&account_handle=acme&namespace_id=p")
    assert empty.status_code == 400 and empty.json() == {"message": "Missing tenant_id"}
    assert web.get(f"{u}/api/cache/cas/c?{T}&namespace_id=&project_handle=p").status_code == 404
    encoded = web.get(f"{u}/api/cache/cas/%63?account_handle=acme&project_handle=%70")
    assert encoded.content == b"c" * 10 and encoded.headers["Server"] == "kura"
    assert metric(node, 'kura_http_requests_total{route="/api/cache/cas/{id}",status="200"}') == before + 2


def test_http10_download_without_keep_alive_closes(node) -> None:
    requests.put(f"{node.url}/nx/proj/v1/cache/n", data=b"nx")
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(b"GET /nx/proj/v1/cache/n HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.0 200 OK") and data.endswith(b"\r\n\r\nnx")


# Keys with an encoded slash on every artifact route, as gunicorn decodes them into
# PATH_INFO: refused with 400, never redirected to another key.
ENCODED_SLASH_KEYS = [
    ("GET", f"/api/cache/cas/%2Fvictim?{T}", "Invalid CAS id"),
    ("POST", f"/api/cache/cas/%2Fvictim?{T}", "Invalid CAS id"),
    ("GET", f"/api/cache/keyvalue/%2Fvictim?{T}", "Invalid cas_id"),
    ("GET", f"/api/cache/gradle/%2Fvictim?{T}", "Invalid cache key"),
    ("PUT", f"/api/cache/gradle/%2Fvictim?{T}", "Invalid cache key"),
    ("GET", "/gradle/acme/_/%2Fvictim", "Invalid cache key"),
    ("PUT", "/gradle/acme/_/%2Fvictim/", "Invalid cache key"),
    ("GET", "/v1/cache/%2Fvictim", "Invalid hash"),
    ("PUT", "/nx/p/v1/cache/%2Fvictim", "Invalid hash"),
    ("GET", "/api/metro/cache/%2Fvictim", "Invalid cache key"),
    ("PUT", "/api/metro/cache/%2Fvictim", "Invalid cache key"),
    ("GET", f"/api/cache/module/x?{T}&hash=%2Fvictim&name=n", "Invalid hash"),
]


def test_artifact_routes_never_redirect(node, web) -> None:
    u = node.url
    assert web.post(f"{u}/api/cache/cas/victim?{T}", content=b"victim").status_code == 204
    for method, target, what in ENCODED_SLASH_KEYS:
        r = web.request(method, u + target, content=b"x" if method != "GET" else None)
        assert r.status_code == 400, (method, target, r.status_code, r.headers.get("Location"))
        assert r.json() == {"message": f"{what}: slashes are not allowed"}, target
    for target in (f"/api/cache/cas//victim?{T}", f"/api//cache/cas/victim?{T}", "/v1/cache/victim/",
                   f"/api/cache/module/a/b?{T}&hash=h&name=n"):
        r = web.get(u + target)
        assert r.status_code == 404 and r.json() == {"message": "Not found"}, target
