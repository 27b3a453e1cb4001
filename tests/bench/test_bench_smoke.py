"""Smoke run of the benchmark harness (bench/): seconds long, so the harness cannot rot.

It starts a real node (and nginx if installed), runs one small cell per kind and
checks the JSON document has real, positive numbers for every kura-py cell. The
full benchmark (``python -m bench.run``) never runs in CI.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _kura(row: dict) -> dict:
    return row["targets"]["kura"]["median"]


def test_smoke_run_writes_positive_kura_numbers(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--no-buildgrid", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    assert doc["mode"] == "smoke"
    assert doc["machine"]["nproc"] >= 1
    http = doc["http"]
    assert {(r["method"], r["size_bytes"]) for r in http} >= {("GET", 4096), ("PUT", 4096)}
    for row in http:
        kura = _kura(row)
        assert kura["errors"] == 0, row
        assert kura["requests_per_s"] > 0 and kura["mib_per_s"] > 0, row
        assert kura["p50_ms"] > 0 and kura["p99_ms"] >= kura["p50_ms"], row
        assert kura["server_cpu_ms_per_request"] is not None and kura["server_cpu_ms_per_request"] > 0, row

    http2 = doc["http2"]  # h2load: nghttp2-client (.ci/apt-packages-http2.txt)
    assert {r["size_bytes"] for r in http2} == {4096, 1024 * 1024}
    for row in http2:
        for name in ("kura-h2", "kura-h1"):
            kura = row["targets"][name]["median"]
            assert kura["errors"] == 0 and kura["requests_per_s"] > 0 and kura["p99_ms"] > 0, row

    reapi = doc["reapi"]
    assert {r["operation"] for r in reapi} == {"GetActionResult", "FindMissingBlobs(1000)"}
    for row in reapi:
        kura = _kura(row)
        assert kura["errors"] == 0, row
        assert kura["calls_per_s"] > 0 and kura["p50_ms"] > 0, row

    memory = doc["memory"]
    for part in ("upload", "download"):
        assert memory[part]["errors"] == 0
        assert memory[part]["samples"] > 0 and memory[part]["mib_per_s"] > 0
        assert all(w["baseline_mib"] > 0 for w in memory[part]["workers"].values())

    startup = {row["artifacts"]: row for row in doc["startup"]}
    assert startup[0]["up_s"] > 0
    assert startup[1000]["up_s"] > 0 and startup[1000]["first_get_s"] > 0

    assert doc["targets"], "target checks missing"
    assert "kura" in proc.stdout  # the table was printed
