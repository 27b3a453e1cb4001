"""REAPI cells: kura-py's gRPC processes against BuildGrid, driven by client processes.

The parent never imports grpc: setup and every client connection run in spawned
processes (grpc and fork do not mix), which also keeps the clients from sharing
one GIL: a cell at concurrency c runs c client processes, each with its own channel
(its own connection, which the kernel hands to one of kura-py's KURA_GRPC_WORKERS
REAPI processes). One Python client cannot saturate a server on the batch and
ByteStream calls, so those cells run with several clients as well as with one. Blob
contents are derived from a seed so the setup process and the load processes agree on
digests without passing bytes.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.proctree import tree_cpu_seconds
from bench.stats import MIB, median, percentile, ratio

SMALL_BLOB = 4096
BATCH_BLOBS = 1000
BIG_BLOB = 64 * MIB
BYTESTREAM_CHUNK = 1 * MIB
GRPC_OPTIONS = [("grpc.max_send_message_length", 256 * MIB),
                ("grpc.max_receive_message_length", 256 * MIB)]

# (operation, concurrencies) in the order they run.
OPERATIONS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("GetActionResult", (1, 8)),
    ("UpdateActionResult", (1, 8)),
    ("FindMissingBlobs(1000)", (1, 8)),
    ("BatchUpdateBlobs(1000x4KiB)", (1, 4)),
    ("BatchReadBlobs(1000x4KiB)", (1, 8)),
    ("ByteStream.Write(64MiB)", (1, 4)),
    ("ByteStream.Read(64MiB)", (1, 4)),
)


@dataclass(frozen=True)
class ReapiTarget:
    name: str
    address: str
    pid: int
    instance: str = ""


@dataclass
class ReapiState:
    """What setup stored on a target, and how its limits split the batch requests."""

    seed: str
    max_batch_bytes: int
    batch_split: int  # BatchUpdate/BatchRead of 1000 blobs go out as this many RPCs
    find_missing_split: int
    big_blob_hash: str
    action_hash: str


@dataclass
class WorkerResult:
    calls: int = 0
    errors: int = 0
    bytes_moved: int = 0
    started: float = 0.0
    finished: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    first_error: str = ""


def _small_blob(seed: str, index: int) -> bytes:
    return hashlib.sha256(f"{seed}-{index}".encode()).digest() * (SMALL_BLOB // 32)


def _big_blob(seed: str) -> bytes:
    block = hashlib.sha256(f"{seed}-big".encode()).digest() * (MIB // 32)
    return b"".join(bytes([i % 251]) + block[1:] for i in range(BIG_BLOB // MIB))


def _pb() -> Any:
    """The generated modules: the node's own copies (app/reapi/gen)."""
    from app.reapi.gen.build.bazel.remote.execution.v2 import (  # noqa: PLC0415
        remote_execution_pb2, remote_execution_pb2_grpc)
    from app.reapi.gen.google.bytestream import bytestream_pb2, bytestream_pb2_grpc  # noqa: PLC0415

    return remote_execution_pb2, remote_execution_pb2_grpc, bytestream_pb2, bytestream_pb2_grpc


class _Client:
    def __init__(self, target: ReapiTarget) -> None:
        import grpc  # noqa: PLC0415

        self.grpc = grpc
        self.re, re_grpc, self.bs, bs_grpc = _pb()
        self.channel = grpc.insecure_channel(target.address, options=GRPC_OPTIONS)
        self.instance = target.instance
        self.ac = re_grpc.ActionCacheStub(self.channel)
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.caps = re_grpc.CapabilitiesStub(self.channel)
        self.bytestream = bs_grpc.ByteStreamStub(self.channel)

    def digest(self, data: bytes) -> Any:
        return self.re.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))

    def action_result(self, output_digest: Any) -> Any:
        return self.re.ActionResult(
            output_files=[self.re.OutputFile(path="out/bench.o", digest=output_digest)],
            exit_code=0)

    def batch_update(self, blobs: list[bytes], splits: int) -> int:
        req_cls = self.re.BatchUpdateBlobsRequest
        moved = 0
        for part in _split(blobs, splits):
            resp = self.cas.BatchUpdateBlobs(req_cls(
                instance_name=self.instance,
                requests=[req_cls.Request(digest=self.digest(b), data=b) for b in part]))
            bad = [r for r in resp.responses if r.status.code != 0]
            if bad or len(resp.responses) != len(part):
                raise RuntimeError(f"BatchUpdateBlobs: {len(bad)} failed: {bad[:1]}")
            moved += sum(len(b) for b in part)
        return moved

    def batch_read(self, digests: list[Any], splits: int) -> int:
        moved = 0
        for part in _split(digests, splits):
            resp = self.cas.BatchReadBlobs(self.re.BatchReadBlobsRequest(
                instance_name=self.instance, digests=part))
            for item in resp.responses:
                if item.status.code != 0:
                    raise RuntimeError(f"BatchReadBlobs: {item.status}")
                moved += len(item.data)
        return moved

    def find_missing(self, digests: list[Any], splits: int) -> int:
        missing = 0
        for part in _split(digests, splits):
            resp = self.cas.FindMissingBlobs(self.re.FindMissingBlobsRequest(
                instance_name=self.instance, blob_digests=part))
            missing += len(resp.missing_blob_digests)
        return missing

    def write(self, blob_hash: str, size: int, chunks: Callable[[], Any]) -> int:
        prefix = f"{self.instance}/" if self.instance else ""
        name = f"{prefix}uploads/{os.urandom(16).hex()}/blobs/{blob_hash}/{size}"

        def requests() -> Any:
            offset = 0
            for data in chunks():
                yield self.bs.WriteRequest(resource_name=name if offset == 0 else "",
                                           write_offset=offset, data=data,
                                           finish_write=offset + len(data) == size)
                offset += len(data)

        resp = self.bytestream.Write(requests())
        if resp.committed_size not in (size, -1):
            raise RuntimeError(f"ByteStream.Write committed {resp.committed_size} of {size}")
        return size

    def read(self, blob_hash: str, size: int) -> int:
        prefix = f"{self.instance}/" if self.instance else ""
        got = 0
        for resp in self.bytestream.Read(self.bs.ReadRequest(
                resource_name=f"{prefix}blobs/{blob_hash}/{size}")):
            got += len(resp.data)
        if got != size:
            raise RuntimeError(f"ByteStream.Read returned {got} of {size} bytes")
        return got


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    step = -(-len(items) // parts)
    return [items[i:i + step] for i in range(0, len(items), step)]


def _store_big_blob(client: _Client, seed: str) -> str:
    """Write the 64 MiB blob of ``seed`` (ByteStream); its hash."""
    big = _big_blob(seed)
    view = memoryview(big)
    big_hash = hashlib.sha256(big).hexdigest()
    client.write(big_hash, len(big), lambda: (bytes(view[i:i + BYTESTREAM_CHUNK])
                                              for i in range(0, len(big), BYTESTREAM_CHUNK)))
    return big_hash


def _setup(target: ReapiTarget, seed: str, queue: Any) -> None:
    """Store the seed blobs, the action result and the 64 MiB blob; find working batch splits."""
    try:
        client = _Client(target)
        caps = client.caps.GetCapabilities(client.re.GetCapabilitiesRequest(
            instance_name=target.instance), timeout=30)
        max_batch = caps.cache_capabilities.max_batch_total_size_bytes or 4 * MIB
        blobs = [_small_blob(seed, i) for i in range(BATCH_BLOBS)]
        # The client respects max_batch_total_size_bytes as Bazel does: fewest RPCs that fit.
        splits = max(1, -(-(BATCH_BLOBS * SMALL_BLOB) // max_batch))
        while True:
            try:
                client.batch_update(blobs, splits)
                client.batch_read([client.digest(b) for b in blobs], splits)
                break
            except client.grpc.RpcError:
                if splits >= 64:
                    raise
                splits *= 2
        digests = [client.digest(b) for b in blobs]
        find_split = 1
        while True:
            try:
                if client.find_missing(digests, find_split):
                    raise RuntimeError("FindMissingBlobs reports seeded blobs missing")
                break
            except client.grpc.RpcError:
                if find_split >= 64:
                    raise
                find_split *= 2
        big_hash = _store_big_blob(client, seed)
        action = client.digest(f"{seed}-action".encode())
        client.ac.UpdateActionResult(client.re.UpdateActionResultRequest(
            instance_name=target.instance, action_digest=action,
            action_result=client.action_result(digests[0])))
        client.ac.GetActionResult(client.re.GetActionResultRequest(
            instance_name=target.instance, action_digest=action))
        queue.put(ReapiState(seed, max_batch, splits, find_split, big_hash, action.hash))
    except Exception as exc:  # reported to the parent, which records the failure
        queue.put(f"{type(exc).__name__}: {exc}")


def _operation(op: str, client: _Client, state: ReapiState, worker: int,
               calls: int) -> tuple[Callable[[int], int], list[Any]]:
    """The per-call function for ``op`` and anything it prepared before the timed window."""
    re = client.re
    inst = client.instance
    digests = [client.digest(_small_blob(state.seed, i)) for i in range(BATCH_BLOBS)]
    if op == "GetActionResult":
        req = re.GetActionResultRequest(instance_name=inst, action_digest=re.Digest(
            hash=state.action_hash, size_bytes=len(f"{state.seed}-action")))

        def call(i: int) -> int:
            client.ac.GetActionResult(req)
            return 0
        return call, []
    if op == "UpdateActionResult":
        result = client.action_result(digests[0])
        nonce = os.urandom(8).hex()

        def call(i: int) -> int:
            action = client.digest(f"{nonce}-{worker}-{i}".encode())
            client.ac.UpdateActionResult(re.UpdateActionResultRequest(
                instance_name=inst, action_digest=action, action_result=result))
            return 0
        return call, []
    if op == "FindMissingBlobs(1000)":
        def call(i: int) -> int:
            missing = client.find_missing(digests, state.find_missing_split)
            if missing:
                raise RuntimeError(f"{missing} seeded blobs reported missing")
            return 0
        return call, []
    if op == "BatchUpdateBlobs(1000x4KiB)":
        # New blobs for every call, built before the timed window.
        base = os.urandom(SMALL_BLOB - 16)
        prepared = [[base + f"{worker:04x}{i:06x}{j:06x}".encode()[:16] for j in range(BATCH_BLOBS)]
                    for i in range(calls)]

        def call(i: int) -> int:
            return client.batch_update(prepared[i], state.batch_split)
        return call, prepared
    if op == "BatchReadBlobs(1000x4KiB)":
        def call(i: int) -> int:
            return client.batch_read(digests, state.batch_split)
        return call, []
    if op == "ByteStream.Write(64MiB)":
        base = bytearray(os.urandom(BIG_BLOB - 16))
        base_hash = hashlib.sha256(base)
        nonce = os.urandom(4).hex()
        view = memoryview(base)

        def call(i: int) -> int:
            tail = f"{nonce}{worker:02x}{i:06x}".encode()[:16]
            h = base_hash.copy()
            h.update(tail)
            last = len(base) - len(base) % BYTESTREAM_CHUNK

            def chunks() -> Any:
                for off in range(0, last, BYTESTREAM_CHUNK):
                    yield bytes(view[off:off + BYTESTREAM_CHUNK])
                yield bytes(view[last:]) + tail
            return client.write(h.hexdigest(), BIG_BLOB, chunks)
        return call, [base]
    if op == "ByteStream.Read(64MiB)":
        # A reference with an in-memory LRU CAS (BuildGrid) has evicted it by now, after the
        # ByteStream.Write cells: stored again before the timed part.
        _store_big_blob(client, state.seed)

        def call(i: int) -> int:
            return client.read(state.big_blob_hash, BIG_BLOB)
        return call, []
    raise ValueError(op)


def _worker(target: ReapiTarget, state: ReapiState, op: str, worker: int, duration_s: float,
            max_calls: int, barrier: Any, queue: Any) -> None:
    result = WorkerResult()
    try:
        client = _Client(target)
        call, _keep = _operation(op, client, state, worker, max_calls)
        call(max_calls - 1) if op not in ("BatchUpdateBlobs(1000x4KiB)", "ByteStream.Write(64MiB)",
                                          "UpdateActionResult") else None  # warm the channel
        client.caps.GetCapabilities(client.re.GetCapabilitiesRequest(instance_name=target.instance))
    except Exception as exc:
        result.first_error = f"setup: {type(exc).__name__}: {exc}"
        call = None  # type: ignore[assignment]
    barrier.wait()
    cpu0 = os.times()
    result.started = time.monotonic()
    deadline = result.started + duration_s
    i = 0
    while call is not None and i < max_calls and (i == 0 or time.monotonic() < deadline):
        t0 = time.perf_counter()
        try:
            result.bytes_moved += call(i)
            result.latencies_s.append(time.perf_counter() - t0)
            result.calls += 1
        except Exception as exc:
            result.errors += 1
            result.first_error = result.first_error or f"{type(exc).__name__}: {str(exc)[:300]}"
        i += 1
    result.finished = time.monotonic()
    cpu1 = os.times()
    result.cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    queue.put(result)


def setup_target(target: ReapiTarget, seed: str, timeout_s: float = 300) -> ReapiState:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_setup, args=(target, seed, queue), daemon=True)
    proc.start()
    try:
        outcome = queue.get(timeout=timeout_s)
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    if isinstance(outcome, str):
        raise RuntimeError(f"REAPI setup on {target.name} failed: {outcome}")
    return outcome


def max_calls_for(op: str, duration_s: float, concurrency: int = 1) -> int:
    """Calls one client may make. BatchUpdateBlobs builds new blobs for every call before the
    window (4 MiB each): their total over all clients stays bounded."""
    if op == "BatchUpdateBlobs(1000x4KiB)":
        return max(2, min(40 // concurrency, int(duration_s * 8)))
    if op.startswith("ByteStream"):
        return max(2, min(60, int(duration_s * 12)))
    return 1_000_000


def measure(target: ReapiTarget, state: ReapiState, op: str, concurrency: int,
            duration_s: float) -> dict[str, object]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(concurrency + 1)
    queue = ctx.Queue()
    calls = max_calls_for(op, duration_s, concurrency)
    procs = [ctx.Process(target=_worker, args=(target, state, op, w, duration_s, calls, barrier,
                                               queue), daemon=True) for w in range(concurrency)]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=300)
    cpu0 = tree_cpu_seconds(target.pid)
    results = [queue.get(timeout=duration_s * 10 + 300) for _ in procs]
    cpu = tree_cpu_seconds(target.pid) - cpu0
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    ok = sum(r.calls for r in results)
    wall = max(r.finished for r in results) - min(r.started for r in results)
    lats = [lat for r in results for lat in r.latencies_s]
    moved = sum(r.bytes_moved for r in results)
    return {
        "target": target.name, "calls": ok, "errors": sum(r.errors for r in results),
        "wall_s": wall, "calls_per_s": ok / wall if wall > 0 else 0.0,
        "mib_per_s": moved / MIB / wall if wall > 0 else 0.0,
        "p50_ms": percentile(lats, 50) * 1000, "p99_ms": percentile(lats, 99) * 1000,
        "server_cpu_s": cpu, "server_cpu_ms_per_call": cpu * 1000 / ok if ok else None,
        "client_cpu_s": sum(r.cpu_s for r in results),
        "first_error": next((r.first_error for r in results if r.first_error), ""),
    }


def run_reapi(targets: list[tuple[ReapiTarget, ReapiState]], reps: int, duration_s: float,
              log: Callable[[str], None],
              operations: tuple[tuple[str, tuple[int, ...]], ...] = OPERATIONS) -> list[dict[str, object]]:
    rows = []
    for op, concurrencies in operations:
        for conc in concurrencies:
            samples: dict[str, list[dict[str, object]]] = {t.name: [] for t, _ in targets}
            for rep in range(reps):
                order = targets if rep % 2 == 0 else list(reversed(targets))
                for target, state in order:
                    sample = measure(target, state, op, conc, duration_s)
                    samples[target.name].append(sample)
                    log(f"  {op:<28} c={conc} rep {rep + 1}/{reps} {target.name:<9} "
                        f"{sample['calls_per_s']:9.1f} calls/s {sample['mib_per_s']:8.1f} MiB/s "
                        f"p99 {sample['p99_ms']:8.2f} ms errors {sample['errors']} "
                        f"{sample['first_error']}")
            row: dict[str, object] = {"kind": "reapi", "operation": op, "concurrency": conc,
                                      "targets": {}}
            for name, items in samples.items():
                med = {k: median(s.get(k) for s in items)  # type: ignore[misc]
                       for k in ("calls_per_s", "mib_per_s", "p50_ms", "p99_ms",
                                 "server_cpu_ms_per_call", "client_cpu_s")}
                med["errors"] = sum(int(s["errors"]) for s in items)  # type: ignore[arg-type]
                row["targets"][name] = {"median": med, "samples": items}  # type: ignore[index]
            tg = row["targets"]  # type: ignore[assignment]
            if "kura" in tg and "buildgrid" in tg:
                row["ratio_throughput"] = ratio(tg["kura"]["median"]["calls_per_s"],
                                                tg["buildgrid"]["median"]["calls_per_s"])
                row["ratio_p99"] = ratio(tg["kura"]["median"]["p99_ms"],
                                         tg["buildgrid"]["median"]["p99_ms"])
                row["ratio_cpu_per_call"] = ratio(tg["kura"]["median"]["server_cpu_ms_per_call"],
                                                  tg["buildgrid"]["median"]["server_cpu_ms_per_call"])
            rows.append(row)
    return rows
