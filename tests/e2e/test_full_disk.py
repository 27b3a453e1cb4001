"""A full data disk: the node degrades to 429 / RESOURCE_EXHAUSTED, keeps serving reads and
probes, loses no process, and writes again by itself once space is freed.

A real node whose data directory is a 64 MiB tmpfs (root only: skipped where a tmpfs cannot
be mounted; CI runs as root). The disk is filled and held full by another "tenant" that takes
every byte freed (``bench.tmpfs.DiskHog``), under load from HTTP and gRPC clients
(``bench.full_disk``, which measures the same for five minutes).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from bench import full_disk
from tests.nodes import Node
from tests.tmpfs import fill, tmpfs

MIB = 1024 * 1024
HOLD_S = 20


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs where ``node_factory("node")`` puts its data directory (the node's log
    stays outside). Requested before ``node_factory``, so unmounted after the node stopped."""
    with tmpfs(tmp_path / "node", 64 * MIB) as mount:
        yield mount


def test_full_data_disk_answers_429_keeps_reads_and_processes_and_recovers(
        disk: Path, node_factory) -> None:  # type: ignore[no-untyped-def]
    node: Node = node_factory("node", KURA_HTTP_WORKERS="2")
    started = node.started_pids()
    processes = {p.pid for p in node.processes()}
    target = full_disk.Target(node.url, node.grpc_target, disk, node.process.pid)

    report = full_disk.run(target, hold_s=HOLD_S)

    summary = json.dumps(report.to_json(), indent=1)
    assert report.deaths == [], f"processes died:\n{summary}\n{node.log()}"
    assert node.started_pids() == started, "nothing was restarted"
    assert {p.pid for p in node.processes()} == processes
    assert report.first_429["retry_after"].isdigit(), summary
    assert report.first_429["content_type"] == "application/json"
    assert json.loads(report.first_429["body"])["message"].startswith("disk is full"), summary

    full = report.statuses["full"]
    for op in full_disk.WRITE_OPS:  # every write is answered: stored, or refused for now
        assert set(full[op]) <= {"200", "201", "204", "OK", "429", "RESOURCE_EXHAUSTED"}, summary
    assert full["put_1mib"].get("429", 0) > 0 and full["put_kv"].get("429", 0) > 0, summary
    assert full["grpc_write"].get("RESOURCE_EXHAUSTED", 0) > 0, summary
    # Stored artifacts stay readable; one in a segment may have been evicted (the disk's
    # free-space reserve): a miss, never an error.
    assert set(full["get_kv"]) == {"200"} and set(full["grpc_get_action"]) == {"OK"}, summary
    assert set(full["get_gradle"]) <= {"200", "404"}, summary
    for probe in ("up", "ready", "metrics"):
        assert set(full[probe]) == {"200"}, summary

    assert report.resume_s is not None and report.resume_s < 10, summary
    freed = report.statuses["freed"]
    assert set(freed["put_1mib"]) <= {"200", "201", "429"} and freed["put_1mib"].get("201"), summary


def test_a_process_recording_metrics_into_a_full_filesystem_keeps_running(tmp_path: Path) -> None:
    """Prometheus' multiprocess files are memory-mapped: on a full filesystem a new sample
    used to be SIGBUS. Now it is kept in memory (logged once) and the process goes on."""
    with tmpfs(tmp_path / "run", 1 * MIB) as run:
        script = (
            "from app import metrics\n"
            "for i in range(2000):\n"  # new label values: new pages of the files
            "    metrics.HTTP_REQUESTS.labels(f'/route/{i}', '200').inc()\n"
            "    metrics.HTTP_DURATION.labels(f'/route/{i}').observe(0.01)\n"
            "print('alive')\n")
        fill(run, leave_bytes=8 * 1024)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60, cwd=Path(__file__).resolve().parents[2],
                              env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(run)})
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "alive"
    assert "event=metrics_file_full" in done.stderr


def test_the_node_refuses_a_run_directory_on_the_data_disk(node_factory) -> None:  # type: ignore[no-untyped-def]
    node: Node = node_factory("node", start=False)
    node.env["KURA_RUN_DIR"] = str(node.data_dir / "run-here")
    node.start(wait=False)
    assert node.process.wait(30) == 1
    assert "same filesystem as KURA_DATA_DIR" in node.log()


def test_the_node_refuses_a_run_directory_too_small_for_its_processes(
        tmp_path: Path, node_factory) -> None:  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path / "small-run", 1 * MIB) as run:
        node: Node = node_factory("node", start=False, KURA_RUN_DIR=str(run), KURA_HTTP_WORKERS="8")
        node.start(wait=False)
        assert node.process.wait(30) == 1
    assert "KiB free, 11 processes need" in node.log()


def test_the_run_directory_lives_in_memory_and_goes_with_the_node(
        tmp_path: Path, node_factory) -> None:  # type: ignore[no-untyped-def]
    node: Node = node_factory("node")
    run = Path(node.run_dir)
    assert run.parent == Path("/dev/shm")
    assert sorted(os.listdir(run)) == ["members.json", "mesh.json", "node-state", "prometheus"]
    assert not (node.data_dir / "run").exists()
    node.signal(signal.SIGTERM)
    assert node.process.wait(30) == 0
    assert not run.exists(), "the master removes it at exit"

    broken = tmp_path / "broken.lua"
    broken.write_text("function authenticate(ctx) return {")  # does not load: the start fails
    failing: Node = node_factory("failing", start=False, KURA_EXTENSION_SCRIPT_PATH=str(broken))
    failing.start(wait=False)
    assert failing.process.wait(30) == 1
    assert not Path(failing.run_dir).exists(), "a start that failed leaves nothing in memory"
