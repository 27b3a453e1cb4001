"""Lua extension hooks (SPEC section 7), compatible with Kura's hook API.

Public API for the transports
-----------------------------
``Extensions.from_settings(settings, *, on_abandoned_limit=request_restart) -> Extensions | None``
    None unless ``KURA_EXTENSION_ENABLED=true`` or ``KURA_EXTENSION_SCRIPT_PATH``
    is set. Loads the script into the first Lua state (more are created on
    demand, each loading the script once, each on its own thread); a script
    that cannot be read or fails to load raises ``app.settings.ConfigError``
    naming ``KURA_EXTENSION_SCRIPT_PATH``. Build it inside the process that uses
    it: in an HTTP worker after gevent has patched (``create_app``), in the REAPI
    process in its ``main()``. Nothing here runs at import time.
    ``on_abandoned_limit`` is what happens when too many hook calls are stuck
    (see below); ``Extensions.close()`` ends the idle Lua threads.

``HookContext(transport, route, method, operation, server_tenant_id, tenant_id,
namespace_id, producer, artifact_key, artifact_hash, headers, query)``
    ``headers``: lower-case names (HTTP headers or gRPC metadata).

``Extensions.check(ctx) -> Principal | None``
    authenticate + authorize through the decision caches; returns the
    principal (None when anonymous). On deny raises the ``app.errors`` type for
    the status: 401 ``Unauthenticated``, 403 ``Forbidden``, 429
    ``BudgetExhausted`` (``retry_after_s``), 503
    ``app.extensions.errors.ExtensionUnavailable`` (``retry_after_s``), 400
    ``BadRequest``, 404 ``NotFound``, other statuses
    ``app.extensions.errors.ExtensionDenied`` (``http_status`` = the status). All
    are ``KuraError`` with ``http_status`` and ``message``. A hook that fails or
    times out: 401 "Authentication failed" / 403 "Forbidden" (fail closed).

``Extensions.response_headers(ctx, principal, status_code) -> dict[str, str]``
    Lower-case header names; ``{}`` when the hook is absent or fails.

``app.extensions.grpc_interceptor.ExtensionsInterceptor(extensions, server_tenant_id)``
    The gRPC server interceptor (the only module here that imports grpc). The
    ``ctx`` of a REAPI call comes from the servicers' own parsers
    (``app.reapi.hook_targets``, ``app.reapi.tenancy``); ``response_headers``
    of a successful call are sent as initial metadata with ``status_code`` 200.

Hooks (Lua)
-----------
``authenticate(ctx)`` → ``{principal={id=,kind=,attributes={}}, ttl_seconds=}`` |
``{anonymous=true}`` | ``{deny={status=,message=}, ttl_seconds=}``; absent → anonymous.
``authorize(ctx, principal)`` → ``{allow=true}`` | ``{allow=false}`` (403 Forbidden) |
``{deny=...}``; absent → allow. ``response_headers(ctx, principal)`` →
``{headers={...}, sign={header=, signer=, payload=}}``; ``ctx.status_code`` is set.
Host functions: ``kura.sign_hmac_base64``, ``kura.jwt_verify``, ``kura.http_json``,
``kura.env`` (see ``host_api.py``).

Decision caches
---------------
Allow results are cached for the hook's ``ttl_seconds`` or
``KURA_EXTENSION_AUTH_CACHE_ALLOW_TTL_SECONDS`` (600), denials for
``ttl_seconds`` or ``KURA_EXTENSION_AUTH_CACHE_DENY_TTL_SECONDS`` (3);
``ttl_seconds = 0`` caches nothing, and an authorize decision never outlives
the authenticate result it used. Hook failures are never cached. Keys: a hash
of the credential headers only (``authorization``, ``proxy-authorization``,
``cookie``, ``x-api-key`` + ``KURA_EXTENSION_CREDENTIAL_HEADERS``) plus the
bounded request target (transport, route, method, operation, producer,
server_tenant_id, tenant_id, namespace_id, and the tenant/namespace query
aliases); authorize also keys on the principal. Unlike Kura, authenticate is
keyed on the target too, because tuist.lua's authenticate decides per target.
``artifact_key``, ``artifact_hash``, other headers and query parameters are not in
the key: a hook whose decision depends on them must return ``ttl_seconds = 0``.
Each cache holds at most ``KURA_EXTENSION_CACHE_MAX_ENTRIES`` (LRU). Identical
concurrent misses run the hook once (single-flight).

Where hooks run, and their timeout
----------------------------------
Every Lua state lives on an OS thread of its own (``runner.py``); a request
hands its hook call to an idle one and waits (cooperatively in an HTTP worker),
so a busy hook never freezes the worker's other greenlets, and lupa releases
the GIL while Lua runs. ``KURA_EXTENSION_HOOK_TIMEOUT_MS`` (25) is CPU time of
that thread: a hook is charged for its own execution only, never for the other
requests that ran meanwhile. Lua code is cut by an instruction-count hook (the
state is then discarded). A call stuck inside one C function (``string.find``
on a backtracking pattern) never reaches that hook: once its thread has used
the timeout (+10 ms), the waiter abandons it and fails closed; the thread
discards its state when the C call ends. At most
``KURA_EXTENSION_MAX_ABANDONED_HOOKS`` (2) such threads may exist in a process;
then hooks fail at once and the process asks to be replaced (SIGTERM to
itself: a gunicorn worker finishes its requests and the master starts a new
one; the REAPI process drains and the supervisor restarts it), because a
thread stuck in C only ends with its process. Time blocked inside
``kura.http_json`` is not CPU time; it is bounded by the client's
``CONNECT_TIMEOUT_MS``/``REQUEST_TIMEOUT_MS`` (one retry after 100 ms on
transport errors) and, per hook call, by ``KURA_EXTENSION_HOOK_IO_BUDGET_MS``
(5000); a call is also abandoned after that budget + 2 s of wall-clock time.
(Kura wraps the whole call, I/O included, in the 25 ms timeout, so its
HTTP-backed hooks rely on the cache.)

Memory
------
``KURA_EXTENSION_MEMORY_LIMIT_BYTES`` (64 MiB) is the Lua memory of one
process, all its states together (``memory.py``): each of the
``KURA_EXTENSION_RUNTIME_POOL_SIZE`` slots is guaranteed 1/(2 × pool size) of
it, one call may use what else is free (about half), a call that runs out of
memory before any I/O is retried once alone with all of that, and a call
short of memory fails closed like any hook failure. After a call that grew its
state the state is collected; a state that keeps more than its guaranteed
share is closed; an idle state is closed after 60 s (one stays); freed pages
are given back to the OS (glibc ``malloc_trim``).

Variables (Kura's names unless marked kura-py)
----------------------------------------------
KURA_EXTENSION_ENABLED, KURA_EXTENSION_SCRIPT_PATH, KURA_EXTENSION_HOOK_TIMEOUT_MS,
KURA_EXTENSION_AUTH_CACHE_ALLOW_TTL_SECONDS, KURA_EXTENSION_AUTH_CACHE_DENY_TTL_SECONDS,
KURA_EXTENSION_FAIL_CLOSED_AUTHENTICATE, KURA_EXTENSION_FAIL_CLOSED_AUTHORIZE,
KURA_EXTENSION_FAIL_OPEN_RESPONSE_HEADERS (false: adds ``x-kura-extension-error``),
KURA_EXTENSION_CACHE_MAX_ENTRIES (100000),
KURA_EXTENSION_SIGNER_<ID>_ALGORITHM (hmac-sha256) / _SECRET (base64 of the raw key),
KURA_EXTENSION_JWT_VERIFIER_<ID>_ALGORITHM (HS256|HS384|HS512) / _SECRET / _ISSUER /
_AUDIENCES (comma-separated),
KURA_EXTENSION_HTTP_CLIENT_<ID>_BASE_URL / _CONNECT_TIMEOUT_MS (500) / _REQUEST_TIMEOUT_MS (1500);
kura-py: KURA_EXTENSION_HTTP_CLIENT_<ID>_HEADERS_<NAME> (default request header,
``_`` → ``-``), KURA_EXTENSION_RUNTIME_POOL_SIZE (32 Lua states per process),
KURA_EXTENSION_MEMORY_LIMIT_BYTES (64 MiB per process, all states together; at
least 1 MiB per state of the pool), KURA_EXTENSION_MAX_ABANDONED_HOOKS (2),
KURA_EXTENSION_HOOK_IO_BUDGET_MS (5000), KURA_EXTENSION_CREDENTIAL_HEADERS (extra
cache-key headers).
``kura.env(key)`` sees every ``KURA_*`` variable (Kura: the whole environment), so
tuist.lua's ``KURA_CONTROL_PLANE_CLIENT_ID``/``_SECRET`` work unchanged.
"""
from __future__ import annotations

from app.extensions.context import HookContext, Principal
from app.extensions.engine import Extensions

__all__ = ["Extensions", "HookContext", "Principal"]
