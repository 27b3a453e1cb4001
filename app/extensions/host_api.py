"""The ``kura`` table: host functions a script may call.

- ``kura.sign_hmac_base64(id, payload)``: base64(HMAC-SHA256(key of signer id, payload)).
- ``kura.jwt_verify(id, token)``: verified claims table (HS256/384/512, issuer,
  audiences, ``exp`` required with 60 s leeway as Kura's jsonwebtoken default);
  raises a Lua error when the token is invalid.
- ``kura.http_json(id, {method, path, headers, query, body})``: a JSON call to
  the client's base URL; ``{status=, headers=, body=}`` where ``body`` is the
  decoded JSON or nil. One retry after 100 ms on a transport error (connect
  failure, timeout, reset), never on an HTTP status.
- ``kura.env(key)``: a ``KURA_*`` variable or nil.

Each callable returns ``(ok, {value_or_message})``; the Lua wrapper in
``sandbox.py`` raises the message as a Lua string error. Messages never contain
tokens, secrets or response bodies. They run on the hook's own thread, except
the I/O of ``kura.http_json``, which runs where the caller waits
(``LuaSandbox.on_caller``): in an HTTP worker that is a greenlet, whose
sockets belong to the worker's event loop.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from typing import TYPE_CHECKING, Any, Callable

import jwt
import requests
from requests.adapters import HTTPAdapter

from app import metrics
from app.extensions.config import ExtensionConfig, HttpClientConfig, normalize_id
from app.extensions.sandbox import from_lua, to_lua

if TYPE_CHECKING:
    from app.extensions.sandbox import Deadline, LuaSandbox

log = logging.getLogger("kura.extensions")

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
RETRY_DELAY_S = 0.1
JWT_LEEWAY_S = 60

HostResult = tuple[bool, Any]


class HostError(Exception):
    """A host function refused the call; the message reaches the script as a Lua error."""


@dataclass
class BoundHost:
    """The four host callables bound to one Lua state."""

    sign_hmac_base64: Callable[..., HostResult]
    jwt_verify: Callable[..., HostResult]
    http_json: Callable[..., HostResult]
    env: Callable[..., HostResult]


class HostApi:
    """Host resources shared by every runtime of a process (HTTP sessions are pooled)."""

    def __init__(self, config: ExtensionConfig) -> None:
        self._config = config
        self._sessions: dict[str, requests.Session] = {}
        self._sessions_lock = threading.Lock()

    def bind(self, sandbox: "LuaSandbox") -> BoundHost:
        # The Lua side lifts the state's memory limit around these calls, so
        # building the answer's Lua values can never fail outside Lua.
        def guarded(name: str, fn: Callable[..., Any]) -> Callable[..., HostResult]:
            def call(*args: Any) -> HostResult:
                try:
                    return True, to_lua(sandbox.lua, [fn(*args)])
                except HostError as exc:
                    message = f"kura.{name}: {exc}"
                except Exception as exc:  # never let a Python exception object into Lua
                    log.warning("event=extension_host_error function=%s error=%s", name, type(exc).__name__)
                    message = f"kura.{name}: internal error"
                return False, to_lua(sandbox.lua, [message])
            return call

        def http_json(ident: Any, request: Any) -> dict[str, Any]:
            sandbox.io_calls += 1
            spec = from_lua(request)  # plain data, read on the hook's thread
            # The I/O runs where the caller waits (a greenlet of the HTTP worker).
            return sandbox.on_caller(lambda: self.http_json(sandbox.deadline, ident, spec))

        return BoundHost(
            sign_hmac_base64=guarded("sign_hmac_base64", self.sign_hmac_base64),
            jwt_verify=guarded("jwt_verify", self.jwt_verify),
            http_json=guarded("http_json", http_json),
            env=guarded("env", self.env),
        )

    # -- signers -------------------------------------------------------------
    def sign_hmac_base64(self, ident: Any, payload: Any) -> str:
        signer = self._config.signers.get(normalize_id(_string(ident, "signer id")))
        if signer is None:
            raise HostError(f"unknown signer {ident!r}")
        mac = hmac.new(signer.key, _string(payload, "payload").encode("utf-8"), getattr(hashlib, signer.digest))
        return base64.b64encode(mac.digest()).decode("ascii")

    def sign_for_header(self, ident: str, payload: str) -> str:
        """Used by ``response_headers`` ``sign = {...}`` instructions."""
        return self.sign_hmac_base64(ident, payload)

    # -- JWT -------------------------------------------------------------------
    def jwt_verify(self, ident: Any, token: Any) -> dict[str, Any]:
        verifier = self._config.jwt_verifiers.get(normalize_id(_string(ident, "verifier id")))
        if verifier is None:
            raise HostError(f"unknown JWT verifier {ident!r}")
        token = _string(token, "token")
        options: dict[str, Any] = {"require": ["exp"], "verify_aud": bool(verifier.audiences)}
        try:
            claims = jwt.decode(
                token, verifier.secret, algorithms=[verifier.algorithm], issuer=verifier.issuer,
                audience=list(verifier.audiences) or None, options=options, leeway=JWT_LEEWAY_S)
        except jwt.PyJWTError as exc:
            raise HostError(f"JWT verification failed for verifier {ident!r}: {type(exc).__name__}") from None
        if not isinstance(claims, dict):
            raise HostError("JWT claims are not an object")
        return claims

    # -- HTTP ----------------------------------------------------------------
    def http_json(self, deadline: "Deadline", ident: Any, spec: Any) -> dict[str, Any]:
        """``spec``: the request table as plain data."""
        client = self._config.http_clients.get(normalize_id(_string(ident, "client id")))
        if client is None:
            raise HostError(f"unknown HTTP client {ident!r}")
        if not isinstance(spec, dict):
            raise HostError("request must be a table")
        method = str(spec.get("method") or "GET").upper()
        if method not in HTTP_METHODS:
            raise HostError(f"unsupported method {method!r}")
        path = spec.get("path")
        if not isinstance(path, str) or not path or any(c in path for c in "\r\n\0"):
            raise HostError("request.path must be a non-empty string")
        url = client.base_url + (path if path.startswith("/") else "/" + path)
        headers = dict(client.default_headers)
        headers.update({str(k).lower(): str(v) for k, v in _mapping(spec.get("headers"), "headers").items()})
        query = {str(k): str(v) for k, v in _mapping(spec.get("query"), "query").items()}
        body = spec.get("body")
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode("utf-8")
            headers.setdefault("content-type", "application/json")
        headers.setdefault("accept", "application/json")
        session = self._session(client)
        label = client.id.lower()
        for attempt in (1, 2):
            if deadline.io_remaining_s <= 0:
                metrics.EXTENSION_HTTP_CLIENT_REQUESTS.labels(client=label, result="budget").inc()
                raise HostError("the hook's I/O budget is spent")
            read_timeout = min(client.request_timeout_s, deadline.io_remaining_s)
            connect_timeout = min(client.connect_timeout_s, read_timeout)
            try:
                with deadline.host_io():
                    response = session.request(
                        method, url, params=query or None, headers=headers, data=data,
                        timeout=(connect_timeout, read_timeout), stream=True, allow_redirects=False)
                    try:
                        raw = _read_capped(response)
                    finally:
                        response.close()
            except (requests.ConnectionError, requests.Timeout) as exc:
                metrics.EXTENSION_HTTP_CLIENT_REQUESTS.labels(client=label, result="transport_error").inc()
                log.warning("event=extension_http_error client=%s attempt=%d error=%s",
                            label, attempt, type(exc).__name__)
                if attempt == 1 and deadline.io_remaining_s > RETRY_DELAY_S:
                    with deadline.host_io():
                        time.sleep(RETRY_DELAY_S)
                    continue
                raise HostError(f"HTTP client {ident!r} request failed after {attempt} attempt(s): "
                                f"{type(exc).__name__}") from None
            metrics.EXTENSION_HTTP_CLIENT_REQUESTS.labels(client=label, result=f"{response.status_code // 100}xx").inc()
            try:
                decoded = json.loads(raw) if raw.strip() else None
            except ValueError:
                decoded = None
            return {
                "status": response.status_code,
                "headers": {k.lower(): v for k, v in response.headers.items()},
                "body": decoded,
            }
        raise HostError("unreachable")

    def _session(self, client: HttpClientConfig) -> requests.Session:
        with self._sessions_lock:
            session = self._sessions.get(client.id)
            if session is None:
                session = requests.Session()
                session.trust_env = False
                # Shared by concurrent hooks: never let one caller's cookies reach another.
                session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
                adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(4, self._config.runtime_pool_size))
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                self._sessions[client.id] = session
            return session

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()

    # -- env -------------------------------------------------------------------
    def env(self, key: Any) -> str | None:
        """``KURA_*`` variables are visible (Kura exposes the whole environment; the rest of
        the environment is not configuration of this node and stays out of scripts)."""
        return self._config.env.get(_string(key, "key"))


def _read_capped(response: requests.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(65536):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise HostError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _string(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise HostError(f"{what} must be a string")
    return value


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None or value == []:
        return {}
    if not isinstance(value, dict):
        raise HostError(f"request.{what} must be a table of strings")
    return value
