"""Start-up time against the number of stored artifacts.

For each count: seed a fresh data directory through ArtifactStore (bench.seed_store,
in its own process), then start a node on it and time, from process spawn, the
first 200 on /up and the first successful GET of a seeded artifact.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from bench.seed_store import seed_key
from bench.servers import REPO, KuraNode
from bench.stats import median


def seed(data_dir: Path, count: int, log: Callable[[str], None]) -> float:
    """Seed ``count`` artifacts; returns the seeding wall time in seconds."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if count == 0:
        return 0.0
    start = time.monotonic()
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "bench.seed_store",
                           str(data_dir), str(count)], cwd=REPO, capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"seeding failed: {proc.stderr[-2000:]}")
    log(f"  seeded {count:,} artifacts in {time.monotonic() - start:.1f} s")
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def _first_get(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.01)
    return False


def measure_startup(workdir: Path, data_dir: Path, count: int) -> dict[str, object]:
    node = KuraNode(workdir, data_dir=data_dir)
    try:
        up_s = node.start(timeout_s=300)
        key = seed_key(count // 2) if count else None
        get_s = None
        if key is not None and _first_get(f"{node.base_url}/v1/cache/{key}", 120):
            get_s = time.monotonic() - node.spawned_at
        return {"up_s": up_s, "first_get_s": get_s}
    finally:
        node.stop()


def run_startup(workdir: Path, counts: tuple[int, ...], reps: int,
                log: Callable[[str], None]) -> list[dict[str, object]]:
    rows = []
    for count in counts:
        data_dir = workdir / f"startup-{count}"
        seconds = seed(data_dir, count, log)
        samples = []
        for rep in range(reps):
            sample = measure_startup(workdir, data_dir, count)
            samples.append(sample)
            log(f"  start-up with {count:>9,} artifacts rep {rep + 1}/{reps}: /up {sample['up_s']:.2f} s, "
                f"first GET {sample['first_get_s'] if sample['first_get_s'] is None else round(sample['first_get_s'], 2)} s")
        rows.append({
            "kind": "startup", "artifacts": count, "seed_seconds": seconds,
            "up_s": median(s["up_s"] for s in samples),  # type: ignore[misc]
            "first_get_s": median(s["first_get_s"] for s in samples),  # type: ignore[misc]
            "samples": samples,
        })
        shutil.rmtree(data_dir, ignore_errors=True)
    return rows


if __name__ == "__main__":  # pragma: no cover - manual use
    print(run_startup(Path(sys.argv[1]), tuple(int(c) for c in sys.argv[2:]), 1, print))
