"""Streaming request bodies to staging and artifact bodies back out.

Uploads: the body is read in chunks from ``wsgi.input`` into a staged temp file
(never whole in memory). Under gunicorn a client that disconnects mid-upload
looks like an early end of body, so the byte count is compared with
Content-Length (and the digest, where the key is one) before anything commits.

Downloads: inline bodies come from LMDB; segment bodies are handed to the server
as a file positioned at the artifact's offset with an exact Content-Length, so
the gunicorn worker sends them with a cooperative ``os.sendfile``
(see ``app.http.worker``).
"""
from __future__ import annotations

from typing import BinaryIO, Iterator

from flask import Response, request

from app import metrics
from app.errors import TooLarge, TruncatedBody
from app.http.services import store
from app.storage.staging import StagedBody
from app.storage.store import Located

CHUNK = 1024 * 1024
SMALL_BODY = 64 * 1024


def receive_body(limit: int, too_large_message: str = "Payload too large",
                 expected_sha256: str | None = None) -> StagedBody:
    """Stream the request body into a staged temp file and verify it. Caller closes it."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise TooLarge(too_large_message)
    target = store()
    target.check_write_budget()
    stream = request.environ["wsgi.input"]
    staged = target.stage(limit, too_large_message, hashing=expected_sha256 is not None)
    try:
        remaining = declared
        while remaining is None or remaining > 0:
            want = CHUNK if remaining is None else min(CHUNK, remaining)
            try:
                chunk = stream.read(want)
            except Exception as exc:  # a reset socket, or gunicorn's NoMoreData / chunk errors
                raise TruncatedBody(f"Incomplete body: {exc.__class__.__name__}") from exc
            if not chunk:
                break
            staged.write(chunk)
            if remaining is not None:
                remaining -= len(chunk)
        staged.finish(expected_size=declared, expected_sha256=expected_sha256)
    except BaseException:
        staged.close()
        raise
    return staged


def _bounded_reader(fh: BinaryIO, length: int) -> Iterator[bytes]:
    """User-space fallback (test client, TLS): exactly ``length`` bytes, then close."""
    try:
        remaining = length
        while remaining > 0:
            chunk = fh.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
    finally:
        fh.close()


def artifact_response(located: Located, content_type: str | None = None,
                      status: int = 200) -> Response:
    manifest = located.manifest
    mimetype = content_type or manifest.content_type or "application/octet-stream"
    producer = manifest.producer
    if request.method == "HEAD":
        response = Response(b"", status=status, content_type=mimetype)
        response.headers["Content-Length"] = str(manifest.size)
        return response
    metrics.ARTIFACT_READ_BYTES.labels(producer).inc(manifest.size)
    if located.inline_body is not None:
        metrics.SERVING_PATHS.labels("inline").inc()
        return Response(located.inline_body, status=status, content_type=mimetype)
    if manifest.size <= SMALL_BODY:
        # One pread beats a sendfile set-up for small bodies, and lets headers and body
        # leave in one write.
        metrics.SERVING_PATHS.labels("pread").inc()
        return Response(store().read_bytes(located), status=status, content_type=mimetype)
    fh = store().open_body(located)
    wrapper = request.environ.get("wsgi.file_wrapper")
    if "gunicorn.socket" in request.environ and wrapper is not None:
        # gunicorn's worker sends this with os.sendfile from the current offset,
        # for exactly Content-Length bytes (serving-path metric counted there).
        body = wrapper(fh, CHUNK)
    else:
        metrics.SERVING_PATHS.labels("copy").inc()
        body = _bounded_reader(fh, manifest.size)
    response = Response(body, status=status, content_type=mimetype, direct_passthrough=True)
    response.headers["Content-Length"] = str(manifest.size)
    return response

