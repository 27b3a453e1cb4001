"""The one mapping from domain errors to gRPC status codes (SPEC §4).

Servicers raise ``app.errors`` exceptions (or ``OutOfRange`` below) and never
call ``context.abort`` themselves; nor does the extensions interceptor, whose
hook denials are ``KuraError`` too. ``app.reapi.observer`` turns whatever they
raise into a status with :func:`status_for`.
"""
from __future__ import annotations

import grpc

from app.errors import (BadRequest, BudgetExhausted, Draining, Forbidden, KuraError, NotFound,
                        TooLarge, Unauthenticated, Unprocessable)
from app.storage.partial_uploads import UploadBusy


class OutOfRange(KuraError):
    """A ByteStream read_offset past the end of the blob."""

    http_status = 416


class UndecodableRequest(BadRequest):
    """A request message that is not a valid protobuf of its type (random bytes, invalid
    UTF-8 in a string field): INVALID_ARGUMENT, where grpcio would answer INTERNAL."""


# Checked in order: subclasses (DigestMismatch, TruncatedBody are BadRequest) come first
# where they need a different code.
_CODES: tuple[tuple[type[KuraError], grpc.StatusCode], ...] = (
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Unprocessable, grpc.StatusCode.INVALID_ARGUMENT),
    (TooLarge, grpc.StatusCode.INVALID_ARGUMENT),
    (BudgetExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Draining, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (UploadBusy, grpc.StatusCode.ABORTED),
)

_BY_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and client-facing message for an exception raised by a servicer or a hook."""
    if isinstance(exc, KuraError):
        for kind, code in _CODES:
            if isinstance(exc, kind):
                return code, exc.message
        # Extension hooks deny with an HTTP-style status (SPEC §4: 401/403/429/503). Any
        # other status maps as Kura's grpc_status_from_http_status: 4xx PERMISSION_DENIED,
        # 5xx INTERNAL.
        status = exc.http_status
        default = grpc.StatusCode.PERMISSION_DENIED if 400 <= status < 500 else grpc.StatusCode.INTERNAL
        return _BY_HTTP_STATUS.get(status, default), exc.message
    return grpc.StatusCode.INTERNAL, "internal error"
