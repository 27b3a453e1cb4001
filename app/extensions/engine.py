"""``Extensions``: authenticate + authorize through the decision caches, and response headers."""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable

from app.errors import Forbidden, Unauthenticated
from app import metrics
from app.extensions.config import ExtensionConfig
from app.extensions.context import HookContext, Principal
from app.extensions.decision_cache import DecisionCache, SingleFlight
from app.extensions.errors import HookFailed, deny_error
from app.extensions.host_api import HostApi, HostError
from app.extensions.outcomes import (
    AuthenticateOutcome, AuthorizeOutcome, parse_authenticate, parse_authorize, parse_response_headers)
from app.extensions.memory import MemoryBudget
from app.extensions.pool import RuntimePool, request_restart
from app.extensions.sandbox import LuaSandbox
from app.settings import ConfigError, Settings

log = logging.getLogger("kura.extensions")

# Query parameters that name the request target (tuist.lua falls back to them
# when ctx.tenant_id / ctx.namespace_id are empty), so they are part of the key.
TARGET_QUERY_PARAMS = ("tenant_id", "account_handle", "namespace_id", "project_handle")
SCRIPT_LOAD_TIMEOUT_S = 1.0  # CPU time to load the script into a new state
WALL_SLACK_S = 2.0  # a hook call is abandoned after its I/O budget + this much wall-clock time


class Extensions:
    """The Lua extension runtime of one process. Thread- and greenlet-safe.

    Build it with ``from_settings`` inside the process that uses it, after
    gevent has monkey-patched (HTTP worker) or in the REAPI process main.
    """

    def __init__(self, config: ExtensionConfig, *, clock: Callable[[], float] = time.monotonic,
                 on_abandoned_limit: Callable[[], None] = request_restart) -> None:
        self.config = config
        self._clock = clock
        try:
            with open(config.script_path, encoding="utf-8") as handle:
                self._source = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"KURA_EXTENSION_SCRIPT_PATH: cannot read {config.script_path!r}: {type(exc).__name__}") from None
        self._script_digest = hashlib.sha256(self._source.encode("utf-8")).hexdigest()
        self._host = HostApi(config)
        self._budget = MemoryBudget(config.memory_limit_bytes, config.runtime_pool_size)
        self._pool = RuntimePool(
            self._new_sandbox, self._budget, max_size=config.runtime_pool_size,
            acquire_timeout_s=self._wall_limit_s(), load_timeout_s=self._load_timeout_s(),
            wall_limit_s=self._wall_limit_s(), max_abandoned=config.max_abandoned_hooks,
            on_abandoned_limit=on_abandoned_limit)
        try:
            self.hooks = self._pool.start()
        except HookFailed as exc:
            self._pool.close()
            raise ConfigError(f"KURA_EXTENSION_SCRIPT_PATH: {config.script_path!r} failed to load: "
                              f"{exc.reason}") from None
        self._authn_cache: DecisionCache[AuthenticateOutcome] = DecisionCache(
            "authenticate", config.cache_max_entries, clock)
        self._authz_cache: DecisionCache[AuthorizeOutcome] = DecisionCache(
            "authorize", config.cache_max_entries, clock)
        self._flights = SingleFlight()
        log.info("event=extension_loaded script=%s sha256=%s hooks=%s pool_size=%d timeout_ms=%d "
                 "memory_limit_bytes=%d", config.script_path, self._script_digest[:12],
                 ",".join(sorted(self.hooks)) or "none", config.runtime_pool_size, int(config.hook_timeout_s * 1000),
                 config.memory_limit_bytes)

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.monotonic,
                      on_abandoned_limit: Callable[[], None] = request_restart) -> "Extensions | None":
        """The runtime, or None when extensions are not enabled. Raises ``ConfigError``.

        ``on_abandoned_limit``: called once when ``KURA_EXTENSION_MAX_ABANDONED_HOOKS``
        stuck hook calls exist at once (default: the process asks to be replaced).
        """
        if not (settings.extension_enabled or settings.extension_script_path):
            return None
        return cls(ExtensionConfig.from_settings(settings), clock=clock, on_abandoned_limit=on_abandoned_limit)

    # -- public API ----------------------------------------------------------
    def check(self, ctx: HookContext) -> Principal | None:
        """authenticate + authorize (cached, coalesced). Returns the principal (None: anonymous).

        Raises the ``app.errors`` type for a denial (see ``errors.deny_error``),
        ``Unauthenticated("Authentication failed")`` / ``Forbidden("Forbidden")``
        when a hook fails or times out (fail closed, the default).
        """
        creds = self._credentials_fingerprint(ctx.headers)
        target = self._target(ctx)
        authn = self._authenticate(ctx, (creds, target))
        if authn is None:  # hook failed, fail open
            principal = None
            authn_ttl: float | None = None
        else:
            if authn.deny is not None:
                raise deny_error(authn.deny.status, authn.deny.message, self._retry_after(authn.ttl_s))
            principal = authn.principal
            authn_ttl = authn.ttl_s
        principal_key = authn.principal_key if authn is not None else None
        authz = self._authorize(ctx, principal, (creds, target, principal_key), authn_ttl)
        if authz.deny is not None:
            raise deny_error(authz.deny.status, authz.deny.message, self._retry_after(authz.ttl_s))
        if not authz.allow:
            raise Forbidden("Forbidden")
        return principal

    def response_headers(self, ctx: HookContext, principal: Principal | None, status_code: int) -> dict[str, str]:
        """Extra response headers from ``response_headers`` (never cached). Fails open to ``{}``."""
        if "response_headers" not in self.hooks:
            return {}
        try:
            result = self._run("response_headers",
                               (ctx.to_lua_data(status_code), _principal_data(principal)))
            headers, sign = parse_response_headers(result)
            if sign is not None:
                try:
                    headers[sign.header] = self._host.sign_for_header(sign.signer, sign.payload)
                except HostError:
                    raise HookFailed("response_headers", "unknown_signer") from None
            return headers
        except HookFailed as exc:
            self._record_failure(exc)
            if self.config.fail_open_response_headers:
                return {}
            return {"x-kura-extension-error": "response_headers"}

    def clear_caches(self) -> int:
        """Drop every cached decision; returns how many there were."""
        return self._authn_cache.clear() + self._authz_cache.clear()

    def close(self) -> None:
        """End the idle Lua runners and close the HTTP sessions."""
        self._pool.close()
        self._host.close()

    # -- authenticate / authorize ---------------------------------------------
    def _authenticate(self, ctx: HookContext, key: tuple[Any, ...]) -> AuthenticateOutcome | None:
        if "authenticate" not in self.hooks:
            return AuthenticateOutcome()
        cached = self._authn_cache.get(key)
        if cached is not None:
            metrics.EXTENSION_AUTHN_HIT.inc()
            return cached

        def compute() -> AuthenticateOutcome:
            outcome = parse_authenticate(self._run("authenticate", (ctx.to_lua_data(),)))
            ttl = outcome.ttl_s
            if ttl is None:
                ttl = self.config.deny_ttl_s if outcome.deny is not None else self.config.allow_ttl_s
            self._authn_cache.put(key, outcome, ttl)
            return outcome

        try:
            outcome, shared = self._flights.do(("authenticate", key), compute, self._flight_wait_s())
        except (HookFailed, TimeoutError) as exc:
            self._record_failure(exc if isinstance(exc, HookFailed) else HookFailed("authenticate", "coalesce_timeout"))
            if self.config.fail_closed_authenticate:
                raise Unauthenticated("Authentication failed") from None
            return None
        metrics.EXTENSION_CACHE.labels(cache="authenticate", result="coalesced" if shared else "miss").inc()
        return outcome

    def _authorize(self, ctx: HookContext, principal: Principal | None, key: tuple[Any, ...],
                   authn_ttl: float | None) -> AuthorizeOutcome:
        if "authorize" not in self.hooks:
            return AuthorizeOutcome(allow=True)
        cached = self._authz_cache.get(key)
        if cached is not None:
            metrics.EXTENSION_AUTHZ_HIT.inc()
            return cached

        def compute() -> AuthorizeOutcome:
            outcome = parse_authorize(self._run("authorize", (ctx.to_lua_data(), _principal_data(principal))))
            ttl = outcome.ttl_s
            if ttl is None:
                ttl = self.config.allow_ttl_s if outcome.allow else self.config.deny_ttl_s
            if authn_ttl is not None:
                # A decision never outlives the principal it was made for
                # (authenticate ttl_seconds = 0 disables both caches).
                ttl = min(ttl, authn_ttl)
            self._authz_cache.put(key, outcome, ttl)
            return outcome

        try:
            outcome, shared = self._flights.do(("authorize", key), compute, self._flight_wait_s())
        except (HookFailed, TimeoutError) as exc:
            self._record_failure(exc if isinstance(exc, HookFailed) else HookFailed("authorize", "coalesce_timeout"))
            if self.config.fail_closed_authorize:
                raise Forbidden("Forbidden") from None
            return AuthorizeOutcome(allow=True)
        metrics.EXTENSION_CACHE.labels(cache="authorize", result="coalesced" if shared else "miss").inc()
        return outcome

    # -- running hooks ----------------------------------------------------------
    def _run(self, hook: str, args: tuple[Any, ...]) -> Any:
        started = time.perf_counter()
        result_label = "ok"
        timeout_s, io_budget_s = self.config.hook_timeout_s, self.config.hook_io_budget_s

        def attempt(exclusive: bool) -> Any:
            return self._pool.run(
                hook, lambda runner: runner.call_hook(hook, args, timeout_s, io_budget_s, exclusive), timeout_s)

        try:
            try:
                return attempt(False)
            except HookFailed as exc:
                if not exc.retryable:
                    raise
                failed = exc
            try:  # out of memory before any I/O: once more, with all the memory there is (memory.py)
                with self._budget.exclusive(self._wall_limit_s()):
                    return attempt(True)
            except TimeoutError:
                raise failed from None
        except HookFailed as exc:
            result_label = "timeout" if exc.reason == "timeout" else "error"
            raise
        finally:
            metrics.EXTENSION_HOOKS.labels(hook=hook, result=result_label).inc()
            metrics.EXTENSION_HOOK_DURATION.labels(hook=hook).observe(time.perf_counter() - started)
            metrics.EXTENSION_LUA_MEMORY.set(self._pool.lua_memory_used())
            metrics.EXTENSION_ABANDONED.set(self._pool.abandoned)

    def _new_sandbox(self, limit_bytes: int) -> LuaSandbox:
        """Runs on a runner's own thread (``runner.py``)."""
        return LuaSandbox(self._source, _chunkname(self.config.script_path), self._host,
                          limit_bytes=limit_bytes, load_timeout_s=self._load_timeout_s())

    def _record_failure(self, exc: HookFailed) -> None:
        if exc.reason == "invalid_result":
            metrics.EXTENSION_HOOKS.labels(hook=exc.hook, result="invalid").inc()
        line = f" line={exc.line}" if exc.line is not None else ""
        log.warning("event=extension_hook_failed hook=%s reason=%s%s", exc.hook, exc.reason, line)

    def _load_timeout_s(self) -> float:
        return max(SCRIPT_LOAD_TIMEOUT_S, self.config.hook_timeout_s)

    def _wall_limit_s(self) -> float:
        # A backstop only: calls are cut by their CPU time; I/O by the I/O budget.
        return self.config.hook_io_budget_s + WALL_SLACK_S

    def _flight_wait_s(self) -> float:
        # A leader needs at most: a pool slot (possibly a fresh runner), then the call.
        return 3 * self._wall_limit_s() + SCRIPT_LOAD_TIMEOUT_S

    def _retry_after(self, ttl_s: float | None) -> int:
        ttl = self.config.deny_ttl_s if ttl_s is None else ttl_s
        return max(1, int(round(ttl)))

    # -- cache keys -------------------------------------------------------------
    def _credentials_fingerprint(self, headers: dict[str, str]) -> bytes:
        # Header names are lower-case by contract (HookContext).
        material = "\0".join(f"{name}\0{headers[name]}" for name in self.config.credential_headers
                             if name in headers)
        return hashlib.sha256(material.encode("utf-8", "surrogatepass")).digest()

    @staticmethod
    def _target(ctx: HookContext) -> tuple[Any, ...]:
        # Everything a decision may legitimately depend on, all of bounded
        # cardinality. artifact_key/artifact_hash, non-credential headers and
        # other query parameters are NOT part of the key: a hook that decides on
        # them must return ttl_seconds = 0.
        query = tuple(ctx.query.get(p) for p in TARGET_QUERY_PARAMS)
        return (ctx.transport, ctx.route, ctx.method.upper(), ctx.operation, ctx.producer or None,
                ctx.server_tenant_id, ctx.tenant_id or None, ctx.namespace_id or None, query)


def _principal_data(principal: Principal | None) -> dict[str, Any] | None:
    return principal.to_lua_data() if principal is not None else None


def _chunkname(path: str) -> str:
    return path.rsplit("/", 1)[-1] or "hooks.lua"

