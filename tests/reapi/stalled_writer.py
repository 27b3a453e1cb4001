"""A ByteStream client process that sends the first bytes of an upload and then stalls.

``python -m tests.reapi.stalled_writer PORT RESOURCE DATA_PATH STOP_AT`` streams
``DATA_PATH`` to ``RESOURCE`` in 256 KiB requests, stops sending after ``STOP_AT`` bytes
with the call still open, and waits to be killed: the resumable-write tests SIGKILL it
mid-stream, as a build machine that dies mid-upload would be.
"""
from __future__ import annotations

import sys
import threading
from typing import Iterator

from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from tests.reapi.reapi_client import Reapi

CHUNK = 256 * 1024


def main(argv: list[str]) -> None:
    port, resource, path, stop_at = int(argv[0]), argv[1], argv[2], int(argv[3])
    with open(path, "rb") as f:
        data = f.read()
    client = Reapi.connect(port)

    def requests() -> Iterator[bs_pb2.WriteRequest]:
        for offset in range(0, stop_at, CHUNK):
            yield bs_pb2.WriteRequest(resource_name=resource if offset == 0 else "",
                                      write_offset=offset, data=data[offset:min(offset + CHUNK, stop_at)])
        print(f"sent {stop_at}", flush=True)
        threading.Event().wait()  # the call stays open until this process is killed

    client.bytestream.Write(requests())


if __name__ == "__main__":
    main(sys.argv[1:])
