"""Storage: LMDB metadata + append-only segment files. ``ArtifactStore`` is the interface."""
from app.storage.store import ArtifactStore, Located, WriteResult

__all__ = ["ArtifactStore", "Located", "WriteResult"]
