"""The durable replication outbox: one row per (peer, message), written in the same LMDB
transaction as the change it announces. The replicator drains it; a row is deleted only
after the peer acknowledged it, so delivery is at-least-once (duplicates are harmless:
replicated writes are last-writer-wins on ``version_ms``)."""
from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import lmdb

from app import metrics
from app.errors import BudgetExhausted
from app.storage.lmdb_env import Databases, next_counter, read_counter, u64, write_txn

# One encoder for every row: json.dumps with arguments builds a new one per call, and a
# batch write enqueues a message per artifact.
_encode_message = json.JSONEncoder(separators=(",", ":")).encode


class Outbox:
    def __init__(self, env: lmdb.Environment, dbs: Databases, max_depth: int) -> None:
        self._env = env
        self._dbs = dbs
        self.max_depth = max_depth

    def last_seq(self) -> int:
        """The sequence number of the newest row ever enqueued (moves on every enqueue)."""
        with self._env.begin() as txn:
            return read_counter(txn, self._dbs.meta, b"outbox_seq")

    def depth(self) -> int:
        with self._env.begin() as txn:
            return txn.stat(self._dbs.outbox)["entries"]

    def raise_if_full(self, txn: lmdb.Transaction) -> None:
        if txn.stat(self._dbs.outbox)["entries"] >= self.max_depth:
            metrics.BACKPRESSURE.labels("outbox").inc()
            raise BudgetExhausted(
                f"replication outbox is full (KURA_OUTBOX_MAX_DEPTH={self.max_depth})")

    def enqueue(self, txn: lmdb.Transaction, peers: Sequence[str], message: dict[str, Any]) -> None:
        """Add one row per peer (caller holds the write txn of the change itself)."""
        if not peers:
            return
        seq = u64(next_counter(txn, self._dbs.meta, b"outbox_seq"))
        body = _encode_message(message).encode()
        for peer in peers:
            txn.put(peer.encode() + b"\0" + seq, body, db=self._dbs.outbox)

    def peek(self, peer: str, limit: int = 100, after: bytes | None = None
             ) -> list[tuple[bytes, dict[str, Any]]]:
        """The oldest ``limit`` rows for ``peer`` as ``(row_key, message)``, starting after the
        row key ``after`` (so a large backlog is read a window at a time)."""
        prefix = peer.encode() + b"\0"
        rows = []
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._dbs.outbox)
            if cursor.set_range(after + b"\0" if after else prefix):
                for key, value in cursor:
                    if not key.startswith(prefix) or len(rows) >= limit:
                        break
                    rows.append((key, json.loads(value)))
        return rows

    def complete(self, row_key: bytes) -> None:
        self.complete_many((row_key,))

    def complete_many(self, row_keys: Sequence[bytes]) -> None:
        """Delete delivered rows in one transaction (a row whose deletion is lost to a crash
        is only delivered twice, which is harmless)."""
        if not row_keys:
            return
        with write_txn(self._env) as txn:
            for key in row_keys:
                txn.delete(key, db=self._dbs.outbox)

    def count_for(self, peer: str, cap: int) -> int:
        """Rows waiting for ``peer``, counted up to ``cap``."""
        prefix = peer.encode() + b"\0"
        n = 0
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._dbs.outbox)
            if cursor.set_range(prefix):
                for key in cursor.iternext(keys=True, values=False):
                    if not key.startswith(prefix) or n >= cap:
                        break
                    n += 1
        return n

    def peers_with_rows(self) -> Iterator[str]:
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._dbs.outbox)
            seen = b""
            while cursor.set_range(seen):
                key = cursor.key()
                peer = key.split(b"\0", 1)[0]
                yield peer.decode()
                seen = peer + b"\x01"

    def drop_peer(self, peer: str) -> int:
        """Remove every row of a peer that left the membership."""
        prefix = peer.encode() + b"\0"
        removed = 0
        with write_txn(self._env) as txn:
            cursor = txn.cursor(db=self._dbs.outbox)
            if cursor.set_range(prefix):
                while cursor.key().startswith(prefix):
                    cursor.delete()
                    removed += 1
                    if not cursor.key():
                        break
        return removed
