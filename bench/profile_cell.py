"""Profile one benchmark cell with py-spy: where a kura-py node spends its time under load.

    .venv/bin/python -m bench.profile_cell http-get --size 4096 --concurrency 8 --seconds 8
    .venv/bin/python -m bench.profile_cell reapi --operation "BatchUpdateBlobs(1000x4KiB)"

Starts a fresh node, drives the cell for ``--seconds`` while ``py-spy record``
samples the whole process tree (``--subprocesses``), writes the collapsed stacks
(``--out``, speedscope/flamegraph input) and prints the top functions by own and
by inclusive samples. Needs ``.venv/bin/pip install py-spy`` and root (ptrace).
"""
from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import http_bench, reapi_bench
from bench.servers import REPO, KuraNode


# Load runs this long before sampling starts.
WARM_UP_S = 3.0


def _py_spy() -> str:
    local = REPO / ".venv" / "bin" / "py-spy"
    found = str(local) if local.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def summarise(collapsed: Path, top: int) -> str:
    """Top frames by own samples and by inclusive samples from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples", "", "top own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "top inclusive time:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_cell")
    p.add_argument("kind", choices=("http-get", "http-put", "reapi"))
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--operation", default="GetActionResult")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="bench/results/profile.collapsed.txt")
    p.add_argument("--idle", action="store_true", help="include idle (waiting) samples")
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="kura-profile-"))
    node = KuraNode(workdir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        node.start()
        load: threading.Thread
        if args.kind.startswith("http"):
            method = "GET" if args.kind == "http-get" else "PUT"
            files = http_bench.make_body_files(workdir / "bodies", (args.size,))
            target = http_bench.HttpTarget("kura", node.http_port, lambda: node.pid,
                                           lambda key: f"/v1/cache/{key}", "/v1/cache/")
            http_bench.seed_get_bodies(target, files)
            load = threading.Thread(target=http_bench.measure, args=(
                target, method, args.size, files[args.size], args.concurrency,
                args.seconds + WARM_UP_S + 2, "profile"))
        else:
            node.wait_grpc(60)
            rtarget = reapi_bench.ReapiTarget("kura", f"127.0.0.1:{node.grpc_port}", node.pid)
            state = reapi_bench.setup_target(rtarget, "profile")
            load = threading.Thread(target=reapi_bench.measure, args=(
                rtarget, state, args.operation, args.concurrency, args.seconds + WARM_UP_S + 2))
        load.start()
        time.sleep(WARM_UP_S)  # every process has imported, connected and warmed its caches
        cmd = [_py_spy(), "record", "--pid", str(node.pid), "--subprocesses", "--format", "raw",
               "--rate", str(args.rate), "--duration", str(int(args.seconds)), "--output", str(out),
               "--nonblocking"]
        if args.idle:
            cmd.append("--idle")
        subprocess.run(cmd, check=True, capture_output=True, timeout=args.seconds + 60)
        load.join()
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(summarise(out, args.top))
    print(f"\ncollapsed stacks: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
