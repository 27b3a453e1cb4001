"""The manifest: what the node knows about one artifact, stored under its 32-byte id."""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Manifest:
    producer: str
    namespace_id: str
    key: str
    content_type: str
    version_ms: int
    size: int
    segment_id: int = 0  # 0: the body is stored inline in LMDB
    offset: int = 0

    @property
    def inline(self) -> bool:
        return self.segment_id == 0

    def encode(self) -> bytes:
        doc = {"p": self.producer, "n": self.namespace_id, "k": self.key,
               "ct": self.content_type, "v": self.version_ms, "s": self.size}
        if self.segment_id:
            doc["seg"] = self.segment_id
            doc["off"] = self.offset
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Manifest":
        doc = json.loads(raw)
        return cls(producer=doc["p"], namespace_id=doc["n"], key=doc["k"],
                   content_type=doc["ct"], version_ms=doc["v"], size=doc["s"],
                   segment_id=doc.get("seg", 0), offset=doc.get("off", 0))

    def relocated(self, segment_id: int, offset: int) -> "Manifest":
        return Manifest(self.producer, self.namespace_id, self.key, self.content_type,
                        self.version_ms, self.size, segment_id, offset)
