"""Network faults between real nodes: stalled peers, killed nodes, slow links."""
from __future__ import annotations

import os
import threading
import time

from tests.mesh import MeshNode, gradle_path, make_mesh, quiescent, start, wait_until


class Writers:
    """Small writes to some nodes in the background; every one must be acknowledged."""

    def __init__(self, members: list[MeshNode], prefix: str) -> None:
        self.members = members
        self.prefix = prefix
        self.written: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._n = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            member = self.members[self._n % len(self.members)]
            key = f"{self.prefix}{self._n}-{member.name}"
            try:
                r = member.put(gradle_path(key), key.encode())
                if r.status_code == 201:
                    self.written.append(key)
                else:
                    self.failures.append(f"{key}: {r.status_code} {r.text[:100]}")
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"{key}: {exc!r}")
            self._n += 1
            time.sleep(0.02)

    def __enter__(self) -> "Writers":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def has_all(member: MeshNode, keys: list[str]) -> bool:
    return all(member.get(gradle_path(k)).content == k.encode() for k in keys)


def test_stalled_and_killed_peers_heal_with_nothing_lost(tmp_path, faulty_proxy) -> None:
    a, b, c = mesh = make_mesh(tmp_path, ["a", "b", "c"], proxy_factory=faulty_proxy,
                               KURA_PEER_LOSS_TIMEOUT_MS="4000", KURA_PEER_IDLE_TIMEOUT_MS="3000",
                               KURA_PEER_CONNECT_TIMEOUT_MS="1000")
    start(mesh)
    with Writers([a, c], "stall") as writers:
        # A short stall: b stays a member, its rows wait in the outboxes.
        b.proxy.stall()
        time.sleep(2)
        assert a.rollout()["outbox_messages"] > 0
        b.proxy.resume()
        time.sleep(1)
        # A long stall: a and c drop b (and its rows); when it is back they meet again and
        # b bootstraps what it missed.
        generation = a.rollout()["generation"]
        b.proxy.stall()
        wait_until(lambda: b.advertised not in a.ready()["known_peers"], 15, "a drops b")
        assert a.rollout()["generation"] > generation
        b.proxy.resume()
        wait_until(lambda: b.advertised in a.ready()["known_peers"], 15, "a re-admits b")
    assert writers.failures == [] and len(writers.written) > 50
    wait_until(lambda: quiescent(mesh), 30, "the mesh settles")
    wait_until(lambda: all(has_all(m, writers.written) for m in mesh), 20, "every write everywhere")

    # b dies (SIGKILL, whole node) while writes go on; it comes back and catches up.
    with Writers([a, c], "kill") as writers:
        time.sleep(0.5)
        b.node.kill_all()
        time.sleep(2)
        b.node.start(wait=False)
        b.node.wait_ready(60)
        time.sleep(0.5)
    assert writers.failures == []
    wait_until(lambda: quiescent(mesh), 30, "the mesh settles after the restart")
    wait_until(lambda: all(has_all(m, writers.written) for m in mesh), 20, "every write everywhere")


def test_slow_transfer_completes_and_stalled_one_is_retried(tmp_path, faulty_proxy) -> None:
    a, b = mesh = make_mesh(tmp_path, ["a", "b"], proxy_factory=faulty_proxy,
                            KURA_PEER_IDLE_TIMEOUT_MS="3000", KURA_PEER_CONNECT_TIMEOUT_MS="2000",
                            KURA_PEER_LOSS_TIMEOUT_MS="60000")
    start(mesh)
    # 100 MiB through a 2 MiB/s link to b: slow, but bytes keep coming, so it completes.
    big = os.urandom(100 * 1024 * 1024)
    b.proxy.throttle(2 * 1024 * 1024)
    started = time.monotonic()
    assert a.put(gradle_path("big"), big).status_code == 201
    wait_until(lambda: b.get(gradle_path("big"), stream=True).status_code == 200, 120,
               "the 100 MiB artifact on b")
    elapsed = time.monotonic() - started
    assert elapsed > 40  # it really went through the throttled link
    assert b.get(gradle_path("big")).content == big
    assert a.metric("kura_replication_requests_total", operation="upsert_artifact", result="error") == 0
    # A transfer that stalls fails after the idle timeout and is retried.
    b.proxy.forward()
    medium = os.urandom(8 * 1024 * 1024)
    b.proxy.throttle(1024 * 1024)
    assert a.put(gradle_path("medium"), medium).status_code == 201
    wait_until(lambda: b.proxy.bytes_to_target > 1024 * 1024, 20, "the transfer started")
    b.proxy.stall()
    wait_until(lambda: a.metric("kura_replication_requests_total", operation="upsert_artifact",
                                result="error") >= 1, 20, "the stalled transfer failed")
    assert b.get(gradle_path("medium")).status_code == 404  # nothing partial is visible
    b.proxy.forward()
    wait_until(lambda: b.get(gradle_path("medium")).content == medium, 90, "the retried transfer")
