"""Streaming request bodies to staging and artifact bodies back out, and the one reader
of small JSON request documents.

Uploads: the body is read in chunks from ``wsgi.input`` into a staged temp file
(never whole in memory). Under gunicorn a client that disconnects mid-upload
looks like an early end of body, so the byte count is compared with
Content-Length (and the digest, where the key is one) before anything commits.
Every read of a request body goes through :func:`read_body_chunk`: a reset socket or
broken chunked framing is the client's fault (400), never a 500.

Documents (keyvalue entries, module ``complete``): :func:`read_document` reads a body
whole up to a size limit, and :func:`decode_json` decodes it: UTF-8 only, nesting depth
bounded before decoding (:data:`MAX_JSON_DEPTH`), and any number or string Python cannot
hold as a value (integers past its digit limit, lone surrogates, NaN) refused as 400.

Downloads: inline bodies come from LMDB; segment bodies are handed to the server
as a file positioned at the artifact's offset (plus the start of a requested range,
``app.http.ranges``) with an exact Content-Length, so
the gunicorn worker sends them with a cooperative ``os.sendfile``
(see ``app.http_worker``). What actually left is counted once the server is done
with the response (:func:`record_egress`).
"""
from __future__ import annotations

import json
import os
from typing import Any, BinaryIO, Iterator

from flask import Response, request
from gunicorn.http.errors import ParseException

from app import metrics
from app.errors import BadRequest, TooLarge, TruncatedBody
from app.http import ranges
from app.http.services import store
from app.storage.content_digests import SHA256, hexdigest
from app.storage.segments import SMALL_WRITE_BYTES
from app.storage.staging import StagedBody, verify_body
from app.storage.store import Located

CHUNK = 1024 * 1024
# SERVER_PROTOCOL of a request that came on an HTTP/2 stream (gunicorn's HTTP/2 requests).
HTTP2_PROTOCOL = "HTTP/2.0"
SMALL_BODY = 64 * 1024
# Uploads up to this size are received in memory and copied into a segment by the
# receiving greenlet (``SegmentWriter.write_bytes``), without a staging file.
SMALL_UPLOAD_BYTES = SMALL_WRITE_BYTES
MAX_JSON_DEPTH = 32  # Kura's documents nest 3 deep; json.loads recurses once per level

_BRACKETS = b"[]{}"
_AS_PARENS = bytes.maketrans(_BRACKETS, b"()()")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)


def read_body_chunk(stream: Any, size: int) -> bytes:
    """Up to ``size`` bytes of the request body (``b""`` at its end)."""
    try:
        return stream.read(size)
    except ParseException as exc:  # gunicorn: bad chunk size, extension, terminator or trailer
        raise BadRequest(f"Malformed chunked body: {exc.__class__.__name__}") from exc
    except Exception as exc:  # a reset socket, gunicorn's NoMoreData
        raise TruncatedBody(f"Incomplete body: {exc.__class__.__name__}") from exc


def read_document(limit: int, too_large: str) -> bytes:
    """The request body whole, at most ``limit`` bytes (``TooLarge(too_large)`` beyond)."""
    declared = _declared_length(limit, too_large)
    raw = read_body_chunk(request.stream, limit + 1)
    if len(raw) > limit:
        raise TooLarge(too_large)
    if declared is not None and len(raw) != declared:
        raise TruncatedBody(f"Incomplete body: received {len(raw)} of {declared} bytes")
    return raw


def nests_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether the JSON in ``raw`` nests arrays and objects deeper than ``limit``, decided
    without decoding it (exact for valid JSON; for invalid JSON, true at least when a
    decoder would get that deep before failing). Built from C loops only: a worker must not
    run a Python loop per byte of a megabyte body."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    # Drop escaped backslashes, then escaped quotes: every quote left delimits a string,
    # and the even pieces between them are what lies outside strings.
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    parens = b"".join(unescaped.split(b'"')[::2]).translate(_AS_PARENS, _NOT_BRACKETS)
    too_deep = b"(" * (limit + 1)
    for _ in range(limit):  # each pass removes the innermost level of every nest
        if too_deep in parens:
            return True
        shorter = parens.replace(b"()", b"")
        if len(shorter) == len(parens):
            break
        parens = shorter
    return b"(" in parens


def decode_json(raw: bytes, invalid: str) -> Any:
    """The JSON document in ``raw``; ``BadRequest(f"{invalid}: ...")`` for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{invalid}: not valid UTF-8") from None
    if nests_deeper_than(raw, MAX_JSON_DEPTH):
        raise BadRequest(f"{invalid}: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # ValueError: also integers over 4,300 digits
        raise BadRequest(f"{invalid}: malformed JSON ({exc.__class__.__name__})") from None
    if "\\u" in text and not _all_text(doc):
        raise BadRequest(f"{invalid}: a string is not valid Unicode (lone surrogate)")
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _all_text(doc: Any) -> bool:
    """Whether every string in ``doc`` (keys too) encodes as UTF-8 (no lone surrogate)."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
    return True


def _declared_length(limit: int, too_large_message: str) -> int | None:
    """The request's Content-Length (None: chunked), refused with ``TooLarge`` over ``limit``."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise TooLarge(too_large_message)
    return declared


def is_small_upload() -> bool:
    """Whether the request body is small enough to be received in memory
    (:func:`receive_small_body`): its length is declared and at most
    :data:`SMALL_UPLOAD_BYTES`."""
    declared = request.content_length
    return declared is not None and declared <= SMALL_UPLOAD_BYTES


def receive_small_body(limit: int, too_large_message: str = "Payload too large",
                       expected_sha256: str | None = None) -> bytes:
    """The request body of a small upload (:func:`is_small_upload`), read whole and verified
    as :func:`receive_body` verifies a staged one. No staging file: it is one chunk of
    memory either way, and it goes straight into a segment (``ArtifactStore.put_bytes``)."""
    declared = _declared_length(limit, too_large_message)
    if declared is None or declared > SMALL_UPLOAD_BYTES:
        raise ValueError("receive_small_body() is for small uploads (see is_small_upload)")
    store().check_write_budget(staged=False)
    stream = request.environ["wsgi.input"]
    pieces = []
    received = 0
    while received < declared:
        chunk = read_body_chunk(stream, declared - received)
        if not chunk:
            break
        pieces.append(chunk)
        received += len(chunk)
    data = b"".join(pieces)
    verify_body(len(data), declared, expected_sha256, SHA256,
                lambda: hexdigest(SHA256, data))
    return data


def receive_body(limit: int, too_large_message: str = "Payload too large",
                 expected_sha256: str | None = None) -> StagedBody:
    """Stream the request body into a staged temp file and verify it. Caller closes it."""
    declared = _declared_length(limit, too_large_message)
    target = store()
    target.check_write_budget()
    stream = request.environ["wsgi.input"]
    staged = target.stage(limit, too_large_message, hashing=expected_sha256 is not None)
    try:
        remaining = declared
        while remaining is None or remaining > 0:
            want = CHUNK if remaining is None else min(CHUNK, remaining)
            chunk = read_body_chunk(stream, want)
            if not chunk:
                break
            staged.write(chunk)
            if remaining is not None:
                remaining -= len(chunk)
        staged.finish(expected_size=declared, expected_hash=expected_sha256)
    except BaseException:
        staged.close()
        raise
    return staged


# The artifact body a response carries, ``(producer, size)``, for :func:`record_egress`.
EGRESS = "kura.egress"


def record_egress(environ: dict[str, Any], sent: int) -> None:
    """After the server wrote a response (gunicorn's ``post_request``, whether the write
    finished or the client went away): count the artifact body it carried, if any, as sent
    whole (``ok``) or ``aborted`` after ``sent`` body bytes."""
    carried = environ.get(EGRESS)
    if carried is not None:
        producer, size = carried
        metrics.artifact_egress(producer, metrics.OK if sent >= size else metrics.ABORTED, sent)


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


def artifact_response(located: Located, content_type: str | None = None) -> Response:
    """A hit: the whole body (200) or the one range the request asks for (206, see
    ``app.http.ranges``); ``RangeNotSatisfiable`` (416) for a range past its end."""
    manifest = located.manifest
    mimetype = content_type or manifest.content_type or "application/octet-stream"
    producer = manifest.producer
    byte_range = ranges.select(request.method, request.headers.get("Range"),
                               request.headers.get("If-Range"), manifest.size)
    start, length = ranges.extent(byte_range, manifest.size)
    status = ranges.status(byte_range)
    # Kept from the upload (Manifest.headers), then the range's own.
    headers = [*manifest.headers, *ranges.response_headers(byte_range)]
    if request.method == "HEAD":
        metrics.artifact_read(producer, metrics.OK)
        response = Response(b"", status=status, content_type=mimetype, headers=headers)
        response.headers["Content-Length"] = str(length)
        return response
    metrics.artifact_read(producer, metrics.OK, length)
    request.environ[EGRESS] = (producer, length)
    if located.inline_body is not None:
        metrics.served("inline")
        return Response(located.inline_body[start:start + length], status=status,
                        content_type=mimetype, headers=headers)
    if length <= SMALL_BODY:
        # One pread beats a sendfile set-up for small bodies, and lets headers and body
        # leave in one write.
        metrics.served("pread")
        return Response(store().read_bytes(located, start, length), status=status,
                        content_type=mimetype, headers=headers)
    fh = store().open_body(located)
    fh.seek(start, os.SEEK_CUR)
    wrapper = request.environ.get("wsgi.file_wrapper")
    if request.environ.get("SERVER_PROTOCOL") == HTTP2_PROTOCOL:
        # HTTP/2 frames the body itself: sendfile cannot apply, the stream gets segment reads.
        metrics.served("read")
        body = _bounded_reader(fh, length)
    elif "gunicorn.socket" in request.environ and wrapper is not None:
        # gunicorn's worker sends this with os.sendfile from the current offset,
        # for exactly Content-Length bytes (serving-path metric counted there).
        body = wrapper(fh, CHUNK)
    else:
        metrics.served("copy")
        body = _bounded_reader(fh, length)
    response = Response(body, status=status, content_type=mimetype, headers=headers,
                        direct_passthrough=True)
    response.headers["Content-Length"] = str(length)
    return response
