"""Durable small writes on the real node: concurrent PUTs across workers share syncs, and every
acknowledged one survives a SIGKILL of the whole node."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.mesh import MeshNode

T = "tenant_id=default"
WRITERS = 16
BODY = 4096


def put_all(url: str, keys: list[str], acknowledged: dict[str, bytes],
            stop: threading.Event | None = None) -> None:
    """PUT each key with fresh bytes on one keep-alive connection; record the acknowledged ones."""
    with requests.Session() as session:
        for key in keys:
            if stop is not None and stop.is_set():
                return
            data = os.urandom(BODY)
            try:
                response = session.put(f"{url}/api/cache/gradle/{key}?{T}", data=data, timeout=60)
            except requests.RequestException:
                return  # the node is gone: this write was never acknowledged
            assert response.status_code == 201, response.text
            acknowledged[key] = data


def test_concurrent_small_puts_share_syncs_and_every_acknowledged_one_survives_sigkill(
        node_factory) -> None:
    node = node_factory("durable", KURA_HTTP_WORKERS="2")
    view = MeshNode("durable", node)

    # 1. Sixteen connections over two workers: the writes share segment and LMDB syncs.
    acknowledged: dict[str, bytes] = {}
    with ThreadPoolExecutor(WRITERS) as pool:
        for future in [pool.submit(put_all, node.url, [f"a{w}-{i}" for i in range(12)], acknowledged)
                       for w in range(WRITERS)]:
            future.result()
    writes = len(acknowledged)
    assert writes == WRITERS * 12
    segment_syncs = view.metric("kura_storage_syncs_total", file="segment")
    lmdb_syncs = view.metric("kura_storage_syncs_total", file="lmdb")
    assert 0 < segment_syncs < writes
    # Without sharing each write commits once and syncs data.mdb twice (data pages, meta page).
    assert 0 < lmdb_syncs < 2 * writes

    # 2. The same load, cut by a SIGKILL of every process of the node half-way through.
    stop = threading.Event()
    second: dict[str, bytes] = {}
    with ThreadPoolExecutor(WRITERS) as pool:
        futures = [pool.submit(put_all, node.url, [f"b{w}-{i}" for i in range(10_000)], second, stop)
                   for w in range(WRITERS)]
        while len(second) < 100 and not any(f.done() for f in futures):
            stop.wait(0.01)
        node.kill_all()
        stop.set()
        for future in futures:
            future.result()
    assert len(second) >= 100
    acknowledged.update(second)

    node.start()
    with requests.Session() as session:
        for key, data in acknowledged.items():
            response = session.get(f"{node.url}/api/cache/gradle/{key}?{T}", timeout=30)
            assert response.status_code == 200, key
            assert response.content == data, key
