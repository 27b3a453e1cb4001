"""Resumable ByteStream writes on a real node (gunicorn master, supervised REAPI process)."""
from __future__ import annotations

import os
from pathlib import Path

from tests.e2e.test_node_reapi import wait_serving
from tests.reapi.test_resumable_writes import kill_resume_and_check


def test_upload_of_a_sigkilled_client_is_resumed_by_a_new_client(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = int(node.env["KURA_GRPC_PORT"])
    status_client, resume_client = wait_serving(port), wait_serving(port)
    try:
        run = kill_resume_and_check(port, resume_client, status_client, tmp_path, instance="proj")
    finally:
        status_client.close()
        resume_client.close()
    print(f"event=resume_run {run}")
    assert os.listdir(Path(node.env["KURA_DATA_DIR"]) / "tmp" / "uploads") == []
