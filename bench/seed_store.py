"""Seed a data directory with N small Nx artifacts through ``app.storage.ArtifactStore``.

Run in its own process (``python -m bench.seed_store DATA_DIR COUNT``) before any
node opens the directory. Keys are ``seed_key(i)``; bodies are 64 bytes, inline.

Seeding only: LMDB is opened without a sync per commit and synced once at the
end, otherwise a million commits would each wait for an fsync. The node that
starts afterwards opens the environment with its normal durable flags.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time

SEED_PRODUCER = "nx"
SEED_NAMESPACE = "nx"
PROGRESS_EVERY = 50_000


def seed_key(index: int) -> str:
    return hashlib.sha256(f"kura-bench-seed-{index}".encode()).hexdigest()


def seed_body(index: int) -> bytes:
    return hashlib.sha256(f"body-{index}".encode()).digest() * 2


def main(argv: list[str]) -> int:
    data_dir, count = argv[0], int(argv[1])
    import lmdb  # noqa: PLC0415

    real_open = lmdb.open

    def fast_open(*args: object, **kwargs: object) -> object:
        kwargs["sync"] = False
        kwargs["metasync"] = False
        return real_open(*args, **kwargs)

    lmdb.open = fast_open  # type: ignore[assignment]
    from app.settings import Settings  # noqa: PLC0415
    from app.storage import ArtifactStore  # noqa: PLC0415

    settings = Settings(data_dir=data_dir, node_url="http://127.0.0.1:1")
    store = ArtifactStore(settings)
    start = time.monotonic()
    for i in range(count):
        store.put_bytes(SEED_PRODUCER, SEED_NAMESPACE, seed_key(i), seed_body(i))
        if (i + 1) % PROGRESS_EVERY == 0:
            rate = (i + 1) / (time.monotonic() - start)
            print(f"seeded {i + 1}/{count} ({rate:.0f}/s)", file=sys.stderr, flush=True)
    store.env.sync(True)
    elapsed = time.monotonic() - start
    stats = store.stats()
    store.close()
    print(json.dumps({"count": count, "seconds": elapsed, "artifacts": stats["artifacts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
