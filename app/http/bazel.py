"""Bazel's HTTP remote cache (``--remote_cache=http://...``): ``/ac/{sha256}`` and
``/cas/{sha256}``, GET/HEAD/PUT, as bazel-remote serves them.

An instance prefix names the namespace (``/{namespace_id}/ac/{sha256}``, ``_`` being the
tenant-wide one); without one it is ``bazel``. Bazel sends no tenant: the hooks see the
node's tenant, as for Nx and Metro. A CAS body must hash to its name: a mismatch is 400
and nothing is stored. An action-cache entry is opaque (Bazel stores an ``ActionResult``).

Storage: producer ``bazel``, keys ``ac/{sha256}`` and ``cas/{sha256}``. These are not the
REAPI process's entries (producer ``reapi``, ``blob/{hash}/{size}``): REAPI names every
blob and action by hash *and size*, an HTTP GET names it by hash alone, so sharing would
need a second index by hash; Bazel clients use one protocol or the other against a cache.
"""
from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, Response

from app.http.artifacts import empty, store_upload
from app.http.routes import WRITE, download, route
from app.http.targets import (NODE_TENANT, KeyRead, PathNamespace, QueryNamespace, Sources, Target,
                              Targets, decode)
from app.storage.keys import validate_sha256_hex

bp = Blueprint("bazel", __name__)
PRODUCER = "bazel"
DEFAULT_NAMESPACE = "bazel"
MAX_BYTES = 2 * 1024 * 1024 * 1024
CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class Sha256Key:
    """``{store}/{sha256}``: the path segment must be a SHA-256 in hex (upper case is read
    as lower case)."""

    store: str
    var: str = "hash"

    def read(self, s: Sources) -> KeyRead:
        digest = validate_sha256_hex(decode(s.path_args[self.var], "sha256"), "sha256")
        return KeyRead(f"{self.store}/{digest}", digest)


AC = "/ac/{hash}"
CAS = "/cas/{hash}"
PREFIXED_AC = "/{namespace_id}/ac/{hash}"
PREFIXED_CAS = "/{namespace_id}/cas/{hash}"
AC_KEY, CAS_KEY = Sha256Key("ac"), Sha256Key("cas")
AC_TARGET = Targets(NODE_TENANT, QueryNamespace(DEFAULT_NAMESPACE), AC_KEY)
CAS_TARGET = Targets(NODE_TENANT, QueryNamespace(DEFAULT_NAMESPACE), CAS_KEY)
PREFIXED_AC_TARGET = Targets(NODE_TENANT, PathNamespace(), AC_KEY)
PREFIXED_CAS_TARGET = Targets(NODE_TENANT, PathNamespace(), CAS_KEY)


@route(bp, AC, methods=["PUT"], operation=WRITE, producer=PRODUCER, target=AC_TARGET)
@route(bp, PREFIXED_AC, methods=["PUT"], operation=WRITE, producer=PRODUCER,
       target=PREFIXED_AC_TARGET, name="put_ac_in_namespace")
def put_ac(target: Target) -> Response:
    store_upload(PRODUCER, target.namespace_id, target.key or "", MAX_BYTES,
                 "Payload exceeds 2GB limit", content_type=CONTENT_TYPE)
    return empty(200)


@route(bp, CAS, methods=["PUT"], operation=WRITE, producer=PRODUCER, target=CAS_TARGET)
@route(bp, PREFIXED_CAS, methods=["PUT"], operation=WRITE, producer=PRODUCER,
       target=PREFIXED_CAS_TARGET, name="put_cas_in_namespace")
def put_cas(target: Target) -> Response:
    store_upload(PRODUCER, target.namespace_id, target.key or "", MAX_BYTES,
                 "Payload exceeds 2GB limit", expected_sha256=target.artifact_hash,
                 content_type=CONTENT_TYPE)
    return empty(200)


download(bp, AC, producer=PRODUCER, target=AC_TARGET, name="get_ac")
download(bp, PREFIXED_AC, producer=PRODUCER, target=PREFIXED_AC_TARGET, name="get_ac_in_namespace")
download(bp, CAS, producer=PRODUCER, target=CAS_TARGET, name="get_cas")
download(bp, PREFIXED_CAS, producer=PRODUCER, target=PREFIXED_CAS_TARGET, name="get_cas_in_namespace")
