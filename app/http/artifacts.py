"""The read and write steps every protocol blueprint shares: look up and serve, receive and store."""
from __future__ import annotations

from flask import Response, request

from app import metrics
from app.errors import NotFound
from app.http import routes
from app.http.bodies import artifact_response, is_small_upload, receive_body, receive_small_body
from app.http.services import services, store
from app.storage.store import WriteResult


def serve_artifact(producer: str, namespace_id: str, key: str,
                   not_found: str = "Artifact not found", content_type: str | None = None) -> Response:
    located = store().lookup(producer, namespace_id, key)
    if located is None:
        metrics.artifact_read(producer, metrics.NOT_FOUND)
        raise NotFound(not_found)
    response = artifact_response(located, content_type)  # counts the read (the range's bytes)
    if request.method == "GET":
        _report("download", producer, namespace_id, key, located.size)
    return response


def _report(action: str, producer: str, namespace_id: str, key: str, size: int) -> None:
    """An analytics event (``app.analytics``), when analytics are on; never blocks."""
    analytics = services().analytics
    if analytics is not None:
        analytics.record(producer, routes.current_target().tenant_id, namespace_id, key, action, size)


def store_upload(producer: str, namespace_id: str, key: str, limit: int,
                 too_large: str = "Payload too large", expected_sha256: str | None = None,
                 content_type: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> WriteResult:
    """Receive the request body, verify it and publish it as one artifact (with ``headers``
    to send back on its downloads: ``Manifest.headers``)."""
    mimetype = content_type or request.mimetype or "application/octet-stream"
    try:
        if is_small_upload():
            data = receive_small_body(limit, too_large, expected_sha256)
            result = store().put_bytes(producer, namespace_id, key, data, mimetype, inline=False,
                                       headers=headers)
            size = len(data)
        else:
            with receive_body(limit, too_large, expected_sha256) as staged:
                result = store().put_staged(producer, namespace_id, key, staged, mimetype,
                                            headers=headers)
                size = staged.size
    except Exception as exc:
        metrics.artifact_write(producer, metrics.failed_write_result(exc))
        raise
    metrics.artifact_write(producer, metrics.OK, size)
    _report("upload", producer, namespace_id, key, size)
    return result


def store_document(producer: str, namespace_id: str, key: str, data: bytes,
                   content_type: str = "application/json") -> WriteResult:
    """Small documents (keyvalue entries) are kept inline in LMDB."""
    target = store()
    try:
        target.check_write_budget()
        result = target.put_bytes(producer, namespace_id, key, data, content_type, inline=True)
    except Exception as exc:
        metrics.artifact_write(producer, metrics.failed_write_result(exc))
        raise
    metrics.artifact_write(producer, metrics.OK, len(data))
    return result


def empty(status: int) -> Response:
    return Response(b"", status=status)
