"""Validation of what the hooks return (Kura's untagged result shapes)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from app.extensions.context import Principal
from app.extensions.errors import HookFailed


@dataclass(frozen=True)
class Deny:
    status: int
    message: str


@dataclass(frozen=True)
class AuthenticateOutcome:
    """Exactly one of principal / anonymous / deny; ``ttl_s`` None means "use the default"."""

    principal: Principal | None = None
    deny: Deny | None = None
    ttl_s: float | None = None
    principal_key: str | None = None  # fingerprint of the principal, part of the authorize key


@dataclass(frozen=True)
class AuthorizeOutcome:
    allow: bool
    deny: Deny | None = None
    ttl_s: float | None = None


def parse_authenticate(result: Any) -> AuthenticateOutcome:
    """``{principal={id=,kind=,attributes=}} | {anonymous=true} | {deny={status=,message=}}`` (+ ttl_seconds)."""
    data = _table("authenticate", result)
    ttl = _ttl("authenticate", data)
    if data.get("principal") is not None:
        raw = data["principal"]
        if not isinstance(raw, dict):
            raise HookFailed("authenticate", "invalid_result")
        pid, kind = raw.get("id"), raw.get("kind")
        attributes = raw.get("attributes")
        if attributes is None or attributes == []:
            attributes = {}
        if not _scalar(pid) or not _scalar(kind) or not isinstance(attributes, dict):
            raise HookFailed("authenticate", "invalid_result")
        principal = Principal(str(pid), str(kind), attributes)
        key = hashlib.sha256(json.dumps(principal.to_lua_data(), sort_keys=True, default=str).encode()).hexdigest()
        return AuthenticateOutcome(principal=principal, ttl_s=ttl, principal_key=key)
    if data.get("deny") is not None:
        return AuthenticateOutcome(deny=_deny("authenticate", data["deny"]), ttl_s=ttl)
    if data.get("anonymous") is True:
        return AuthenticateOutcome(ttl_s=ttl)
    raise HookFailed("authenticate", "invalid_result")


def parse_authorize(result: Any) -> AuthorizeOutcome:
    """``{allow=true} | {allow=false} | {deny={status=,message=}}`` (+ ttl_seconds)."""
    data = _table("authorize", result)
    ttl = _ttl("authorize", data)
    if data.get("deny") is not None:
        return AuthorizeOutcome(allow=False, deny=_deny("authorize", data["deny"]), ttl_s=ttl)
    if isinstance(data.get("allow"), bool):
        return AuthorizeOutcome(allow=data["allow"], ttl_s=ttl)
    raise HookFailed("authorize", "invalid_result")


@dataclass(frozen=True)
class SignInstruction:
    header: str
    signer: str
    payload: str


def parse_response_headers(result: Any) -> tuple[dict[str, str], SignInstruction | None]:
    """``{headers={...}, sign={header=, signer=, payload=}}``; ``nil`` means nothing to add."""
    if result is None:
        return {}, None
    data = _table("response_headers", result)
    raw_headers = data.get("headers") or {}
    if raw_headers == []:
        raw_headers = {}
    if not isinstance(raw_headers, dict):
        raise HookFailed("response_headers", "invalid_result")
    headers: dict[str, str] = {}
    for name, value in raw_headers.items():
        if not _scalar(value):
            raise HookFailed("response_headers", "invalid_result")
        headers[_header_name(name)] = _header_value(str(value))
    sign = None
    if data.get("sign") is not None:
        raw = data["sign"]
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) for k in ("header", "signer")) \
                or not _scalar(raw.get("payload")):
            raise HookFailed("response_headers", "invalid_result")
        sign = SignInstruction(_header_name(raw["header"]), raw["signer"], str(raw["payload"]))
    return headers, sign


def _table(hook: str, result: Any) -> dict[str, Any]:
    if result == []:
        return {}
    if not isinstance(result, dict):
        raise HookFailed(hook, "invalid_result")
    return result


def _ttl(hook: str, data: dict[str, Any]) -> float | None:
    ttl = data.get("ttl_seconds")
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl < 0:
        raise HookFailed(hook, "invalid_result")
    return float(ttl)


def _deny(hook: str, raw: Any) -> Deny:
    if not isinstance(raw, dict):
        raise HookFailed(hook, "invalid_result")
    status = raw.get("status")
    if isinstance(status, float) and status.is_integer():
        status = int(status)
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise HookFailed(hook, "invalid_result")
    message = raw.get("message")
    return Deny(status, str(message) if _scalar(message) else "")


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _header_name(name: Any) -> str:
    text = str(name).strip().lower()
    if not text or any(not (c.isalnum() or c in "-_.!#$%&'*+^`|~") for c in text) or not text.isascii():
        raise HookFailed("response_headers", "invalid_header")
    return text


def _header_value(value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise HookFailed("response_headers", "invalid_header")
    return value
