"""Domain errors raised where they happen.

Each transport maps them in exactly one place: ``app.http.errors`` for HTTP
status + ``{"message": ...}``, ``app.reapi.errors`` for gRPC status codes.
"""
from __future__ import annotations


class KuraError(Exception):
    """Base class; ``http_status`` is the status the HTTP layer answers with."""

    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(KuraError):
    http_status = 400


class NotFound(KuraError):
    http_status = 404


class TooLarge(KuraError):
    http_status = 413


class Unprocessable(KuraError):
    http_status = 422


class DigestMismatch(BadRequest):
    """The body's size or sha256 does not match the digest it was stored under."""


class TruncatedBody(BadRequest):
    """The client sent fewer bytes than it announced (disconnect mid-upload)."""


class BudgetExhausted(KuraError):
    """A capacity budget is full: tmp staging, outbox depth, disk, file descriptors.

    Answered with 429 + Retry-After (HTTP) or RESOURCE_EXHAUSTED (gRPC); the write
    can be retried later and nothing partial was kept.
    """

    http_status = 429

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Draining(KuraError):
    http_status = 503

    def __init__(self, message: str = "server is draining") -> None:
        super().__init__(message)


class Forbidden(KuraError):
    http_status = 403


class Unauthenticated(KuraError):
    http_status = 401


class RangeNotSatisfiable(KuraError):
    """A Range read that starts at or past the end of the body (HTTP 416)."""

    http_status = 416

    def __init__(self, size: int) -> None:
        super().__init__("Range not satisfiable")
        self.size = size
