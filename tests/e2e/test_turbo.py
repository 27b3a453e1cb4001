"""Turborepo against a real node: the real ``turbo`` CLI from npm, and the routes black-box.

The ``turbo`` fixture installs a pinned ``turbo`` (its Linux binary ships as an npm
package) into a directory the test session creates, with npm's cache there too, so a run
leaves nothing behind; it is skipped only when npm itself is missing. turbo runs fully
offline apart from the node: telemetry and update checks off, no login, the remote cache
only (``TURBO_CACHE=remote:rw``), the token and team from the environment.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from tests.mesh import MeshNode
from tests.nodes import REPO

TURBO_VERSION = "2.5.8"
NPM = shutil.which("npm")
STATIC_TOKENS = REPO / "examples" / "hooks" / "static_tokens.lua"
TOKENS = {"KURA_EXTENSION_SCRIPT_PATH": str(STATIC_TOKENS),
          "KURA_EXTENSION_STATIC_READ_TOKENS": "ro-token",
          "KURA_EXTENSION_STATIC_WRITE_TOKENS": "rw-token"}


@pytest.fixture(scope="module")
def turbo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if NPM is None:
        pytest.skip("npm is not installed")
    prefix = tmp_path_factory.mktemp("turbo-npm")
    subprocess.run([NPM, "install", "--prefix", str(prefix), "--cache", str(prefix / "npm-cache"),
                    "--no-audit", "--no-fund", "--no-update-notifier", f"turbo@{TURBO_VERSION}"],
                   check=True, capture_output=True, timeout=300)
    return prefix / "node_modules" / ".bin" / "turbo"


def workspace(root: Path) -> Path:
    """Two npm workspace packages; ``b``'s build reads ``a``'s output."""
    files = {
        "package.json": {"name": "kura-turbo-e2e", "private": True, "packageManager": "npm@10.0.0",
                         "workspaces": ["packages/*"]},
        "package-lock.json": {"name": "kura-turbo-e2e", "lockfileVersion": 3, "requires": True,
                              "packages": {
                                  "": {"name": "kura-turbo-e2e", "workspaces": ["packages/*"]},
                                  "node_modules/a": {"resolved": "packages/a", "link": True},
                                  "node_modules/b": {"resolved": "packages/b", "link": True},
                                  "packages/a": {"name": "a", "version": "1.0.0"},
                                  "packages/b": {"name": "b", "version": "1.0.0",
                                                 "dependencies": {"a": "*"}}}},
        "turbo.json": {"tasks": {"build": {"dependsOn": ["^build"], "outputs": ["dist/**"]}}},
        "packages/a/package.json": {"name": "a", "version": "1.0.0", "scripts": {
            "build": "mkdir -p dist && head -c 300000 /dev/urandom > dist/blob && "
                     "echo built-a > dist/out.txt"}},
        "packages/b/package.json": {"name": "b", "version": "1.0.0", "dependencies": {"a": "*"},
                                    "scripts": {"build": "mkdir -p dist && cat ../a/dist/out.txt > "
                                                         "dist/out.txt && echo built-b >> dist/out.txt"}},
    }
    for name, doc in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
    # turbo hashes the files of a package that git would see: its own logs are not inputs.
    (root / ".gitignore").write_text(".turbo\ndist\nnode_modules\n")
    return root


OUTPUTS = ["packages/a/dist/blob", "packages/a/dist/out.txt", "packages/b/dist/out.txt"]


def run_turbo(turbo: Path, root: Path, api: str, token: str, team: str = "acme") -> tuple[str, list[dict]]:
    """``turbo run build`` from a clean slate (no local cache, no outputs); its output and
    the run summary's tasks."""
    shutil.rmtree(root / ".turbo", ignore_errors=True)
    for package in ("a", "b"):
        shutil.rmtree(root / "packages" / package / "dist", ignore_errors=True)
        shutil.rmtree(root / "packages" / package / ".turbo", ignore_errors=True)
    home = root.parent / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": str(Path(shutil.which("node") or "/usr/bin/node").parent) + ":/usr/bin:/bin",
           "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "TURBO_TELEMETRY_DISABLED": "1", "DO_NOT_TRACK": "1", "TURBO_NO_UPDATE_NOTIFIER": "1",
           "TURBO_API": api, "TURBO_TOKEN": token, "TURBO_TEAM": team, "TURBO_CACHE": "remote:rw",
           "TURBO_UI": "false", "TURBO_DAEMON": "false", "TURBO_PRINT_VERSION_DISABLED": "1"}
    result = subprocess.run([str(turbo), "run", "build", "--summarize", "--no-daemon"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    [summary] = (root / ".turbo" / "runs").glob("*.json")
    return output, json.loads(summary.read_text())["tasks"]


def metric(node: Any, name: str, **labels: str) -> float:
    return MeshNode(node.data_dir.name, node).metric(name, **labels)


def test_second_turbo_run_is_full_turbo_from_the_node(node_factory: Callable[..., Any], turbo: Path,
                                                      tmp_path: Path) -> None:
    node = node_factory("turbo", **TOKENS)
    root = workspace(tmp_path / "ws")

    # A read-only token: turbo builds, the node refuses its uploads in the shape turbo reads.
    output, tasks = run_turbo(turbo, root, node.url, "ro-token")
    assert "Insufficient permissions to write to remote cache" in output, output
    assert [t["cache"]["status"] for t in tasks] == ["MISS", "MISS"]
    assert metric(node, "kura_artifact_writes_total", producer="turbo") == 0

    started = time.monotonic()
    output, tasks = run_turbo(turbo, root, node.url, "rw-token")
    first_s = time.monotonic() - started
    assert [t["cache"]["status"] for t in tasks] == ["MISS", "MISS"], output
    built = {name: (root / name).read_bytes() for name in OUTPUTS}
    assert built["packages/b/dist/out.txt"] == b"built-a\nbuilt-b\n"
    assert metric(node, "kura_artifact_writes_total", producer="turbo", result="ok") == 2

    # Local cache and outputs gone: everything comes back from the node, read-only suffices.
    hits_before = metric(node, "kura_artifact_reads_total", producer="turbo", result="ok")
    started = time.monotonic()
    output, tasks = run_turbo(turbo, root, node.url, "ro-token")
    second_s = time.monotonic() - started
    assert "FULL TURBO" in output and "2 cached, 2 total" in output, output
    assert [(t["cache"]["status"], t["cache"]["source"]) for t in tasks] == [("HIT", "REMOTE")] * 2
    assert {name: (root / name).read_bytes() for name in OUTPUTS} == built
    assert metric(node, "kura_artifact_reads_total", producer="turbo", result="ok") == hits_before + 2
    # The time turbo reports saved is the x-artifact-duration its upload sent, kept by the node.
    known = requests.post(f"{node.url}/v8/artifacts?slug=acme", json={"hashes": [t["hash"] for t in tasks]},
                          headers={"Authorization": "Bearer ro-token"}, timeout=10).json()
    assert [t["cache"]["timeSaved"] for t in tasks] == [known[t["hash"]]["taskDurationMs"] for t in tasks]
    assert all(known[t["hash"]]["taskDurationMs"] > 0 for t in tasks)
    print(f"turbo {TURBO_VERSION}: first run {first_s:.2f}s (2 misses, 2 uploads), after clean "
          f"{second_s:.2f}s (2 remote hits, FULL TURBO)")


def test_hooks_metrics_and_kept_headers_on_the_real_node(node_factory: Callable[..., Any]) -> None:
    node = node_factory("turbo-hooks", **TOKENS)
    url = f"{node.url}/v8/artifacts/abc?slug=acme"
    kept = {"x-artifact-duration": "812", "x-artifact-tag": "c2ln"}
    r = requests.put(url, data=b"artifact", headers={"Authorization": "Bearer ro-token", **kept}, timeout=10)
    assert r.status_code == 403
    assert r.json() == {"message": "Token is read-only",
                        "error": {"code": "forbidden", "message": "Token is read-only"}}
    r = requests.get(url, timeout=10)
    assert r.status_code == 401
    assert r.json() == {"message": "Missing bearer token",
                        "error": {"code": "unauthorized", "message": "Missing bearer token"}}
    r = requests.put(url, data=b"artifact", headers={"Authorization": "Bearer rw-token", **kept}, timeout=10)
    assert r.status_code == 202
    got = requests.get(url, headers={"Authorization": "Bearer ro-token"}, timeout=10)
    assert got.content == b"artifact" and {k: got.headers[k] for k in kept} == kept
    assert metric(node, "kura_artifact_writes_total", producer="turbo", result="ok") == 1
    assert metric(node, "kura_artifact_writes_total", producer="turbo") == 1
    assert metric(node, "kura_artifact_reads_total", producer="turbo", result="ok") == 1
    assert metric(node, "kura_http_requests_total", route="/v8/artifacts/{hash}", status="403") == 1
    assert metric(node, "kura_http_requests_total", route="/v8/artifacts/{hash}", status="202") == 1


def test_fast_path_sends_the_kept_headers(node: Any) -> None:
    kept = {"x-artifact-duration": "45", "x-artifact-tag": "dGFn"}
    big = bytes(range(256)) * 1000  # above the inline/pread size: sendfile
    for key, body in (("small", b"s"), ("big", big)):
        assert requests.put(f"{node.url}/v8/artifacts/{key}?teamId=team_1", data=body, headers=kept,
                            timeout=10).status_code == 202
        got = requests.get(f"{node.url}/v8/artifacts/{key}?teamId=team_1", timeout=10)
        assert got.headers["Server"] == "kura", "a hit is answered by the fast path"
        assert got.content == body and {k: got.headers[k] for k in kept} == kept
        head = requests.head(f"{node.url}/v8/artifacts/{key}?teamId=team_1", timeout=10)
        assert head.headers["Server"] == "kura" and {k: head.headers[k] for k in kept} == kept
        assert head.headers["Content-Length"] == str(len(body))
