"""Hook denials as typed errors.

A ``deny = {status=, message=}`` decision becomes the ``app.errors`` type for
that status, so each transport maps it in its one usual place. Two statuses
have no fitting type there, so they are defined here:

- ``ExtensionUnavailable`` (503): the hook says its backend is down (tuist.lua
  answers ``503 Authentication backend unavailable``). ``app.errors.Draining``
  is not used because it means "this node is shutting down" and the HTTP layer
  closes the connection for it.
- ``ExtensionDenied``: any other status a script picks (402, 409, 500, ...);
  ``http_status`` is that status.
"""
from __future__ import annotations

from app.errors import BadRequest, BudgetExhausted, Forbidden, KuraError, NotFound, Unauthenticated


class ExtensionUnavailable(KuraError):
    """503 from a hook: the auth backend is unavailable; retry shortly."""

    http_status = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ExtensionDenied(KuraError):
    """A hook denial with a status no other error type covers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


class HookFailed(Exception):
    """A hook raised, timed out, or returned something malformed (internal; never reaches clients)."""

    def __init__(self, hook: str, reason: str, line: int | None = None, *, retryable: bool = False) -> None:
        super().__init__(f"{hook} hook failed: {reason}")
        self.hook = hook
        self.reason = reason
        self.line = line
        # Ran out of memory before doing any I/O: running it again has no effect
        # outside the Lua state, so it may be retried with more memory.
        self.retryable = retryable


def deny_error(status: int, message: str, retry_after_s: int = 1) -> KuraError:
    """The typed error for a hook's ``deny`` decision."""
    message = message or _DEFAULT_MESSAGES.get(status, "Request denied")
    if status == 401:
        return Unauthenticated(message)
    if status == 403:
        return Forbidden(message)
    if status == 429:
        return BudgetExhausted(message, retry_after_s=max(1, retry_after_s))
    if status == 503:
        return ExtensionUnavailable(message, retry_after_s=max(1, retry_after_s))
    if status == 400:
        return BadRequest(message)
    if status == 404:
        return NotFound(message)
    return ExtensionDenied(status, message)


_DEFAULT_MESSAGES = {401: "Unauthorized", 403: "Forbidden", 429: "Too many requests",
                     503: "Service unavailable"}
