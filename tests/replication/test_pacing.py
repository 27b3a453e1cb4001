"""Bandwidth pacing: the arithmetic, the schedule, the shared latency view, and a paced
transfer between two real nodes."""
from __future__ import annotations

import os
import time

import pytest

from app.node_state import KIND_HTTP, KIND_REAPI, NodeState
from app.replication.pacing import MAX_LATENCY_DIVISOR, Pacer, effective_limit
from tests.mesh import gradle_path, make_mesh, start, wait_until

MIB = 1024 * 1024


@pytest.mark.parametrize("configured, inflight, latency_ms, target_ms, expected", [
    (0, 50, 900.0, 100, 0.0),                 # off
    (512 * MIB, 0, 0.0, 100, 512 * MIB),      # idle public side: the full rate
    (512 * MIB, 3, 0.0, 100, 128 * MIB),      # 3 public requests in flight: a quarter
    (512 * MIB, 0, 250.0, 100, 512 * MIB / 3),  # latency 2.5x the target: ceil -> a third
    (512 * MIB, 5, 250.0, 100, 512 * MIB / 6),  # the larger divisor wins
    (512 * MIB, 0, 1e9, 100, 512 * MIB / MAX_LATENCY_DIVISOR),  # capped at 64
    (512 * MIB, 0, 900.0, 0, 512 * MIB),      # no latency target: in-flight only
    (10, 100, 0.0, 100, 1.0),                 # never below 1 byte/s
])
def test_effective_limit(configured, inflight, latency_ms, target_ms, expected) -> None:
    assert effective_limit(configured, inflight, latency_ms, target_ms) == pytest.approx(expected)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_pacer_schedules_chunks_back_to_back_and_follows_the_load() -> None:
    clock = FakeClock()
    load = {"now": (0, 0.0)}
    pacer = Pacer(1000, 100, lambda: load["now"], clock=clock, sleep=clock.sleep)
    pacer.acquire(500)  # the first chunk leaves at once
    pacer.acquire(500)  # the next waits for the first one's 0.5 s
    pacer.acquire(1000)
    assert clock.slept == [pytest.approx(0.5), pytest.approx(0.5)]
    assert clock.now == pytest.approx(101.0)
    # Three public requests in flight: a quarter of the rate, from the next reading on.
    load["now"] = (3, 0.0)
    clock.now += 1.0 + 0.1  # past the previous reservation and the load refresh interval
    clock.slept.clear()
    pacer.acquire(250)
    pacer.acquire(250)
    assert clock.slept == [pytest.approx(1.0)]
    # Idle for a while: no burst is saved up.
    clock.now += 60
    clock.slept.clear()
    pacer.acquire(250)
    pacer.acquire(250)
    assert clock.slept == [pytest.approx(1.0)]


def test_pacer_off_never_waits() -> None:
    clock = FakeClock()
    pacer = Pacer(0, 100, lambda: (99, 9e9), clock=clock, sleep=clock.sleep)
    for _ in range(100):
        pacer.acquire(10 * MIB)
    assert clock.slept == []


def test_public_latency_is_shared_through_the_node_state(tmp_path) -> None:
    path = str(tmp_path / "node-state")
    NodeState.reset(path)
    http, reapi, replicator = NodeState(path), NodeState(path), NodeState(path)
    http.claim_slot(KIND_HTTP)
    assert replicator.public_latency_ewma_ms() == 0.0
    http.note_latency(0.010)
    assert replicator.public_latency_ewma_ms() == pytest.approx(10.0)
    for _ in range(50):
        http.note_latency(0.002)  # the EWMA follows (weight 1/8)
    assert replicator.public_latency_ewma_ms() == pytest.approx(2.0, abs=0.1)
    # Another process's slower EWMA is what counts. (One process per slot: pretend.)
    reapi._slot = -1
    reapi.claim_slot(KIND_REAPI)
    reapi.note_latency(0.300)
    assert replicator.public_latency_ewma_ms() == pytest.approx(300.0)
    http.add_inflight(2)
    assert replicator.public_inflight() == 2


def test_a_paced_transfer_takes_as_long_as_the_limit_says(tmp_path) -> None:
    limit = 2 * MIB
    a, b = mesh = make_mesh(tmp_path, ["a", "b"],
                            KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND=str(limit))
    start(mesh)
    body = os.urandom(8 * MIB)
    started = time.monotonic()
    assert a.put(gradle_path("paced"), body).status_code == 201
    wait_until(lambda: b.get(gradle_path("paced"), stream=True).status_code == 200, 60,
               "the paced artifact on b")
    elapsed = time.monotonic() - started
    expected = len(body) / limit
    assert expected * 0.85 <= elapsed <= expected * 3, elapsed
    assert b.get(gradle_path("paced")).content == body
    assert a.metric("kura_replication_bandwidth_configured_limit_bytes_per_second") == limit
    assert 0 < a.metric("kura_replication_bandwidth_effective_limit_bytes_per_second") <= limit
    assert a.metric("kura_public_request_latency_ewma_ms") > 0  # the PUT above was sampled
    assert "kura_public_http_inflight_requests" in a.get("/metrics").text
