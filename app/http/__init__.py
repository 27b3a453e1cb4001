"""HTTP frontend: ``create_app`` is the composition root of every HTTP worker process.

gunicorn calls ``create_app()`` in each worker after the fork and after gevent has
patched the process, so LMDB is opened here and never crosses a fork.
"""
from __future__ import annotations

import logging

from flask import Flask

from app.analytics import Analytics
from app.extensions import Extensions
from app.http import errors, instrumentation, node_metrics, routes
from app.http.services import NodeServices
from app.node_state import KIND_HTTP, NodeState, state_path
from app.settings import Settings
from app.storage.multipart import MultipartUploads
from app.storage.segments import cooperative_offload
from app.storage.store import ArtifactStore


def create_app(settings: Settings | None = None, *, store: ArtifactStore | None = None) -> Flask:
    settings = settings or Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    node_state = store.node_state if store else NodeState(state_path(settings.resolved_run_dir))
    node_state.claim_slot(KIND_HTTP)
    store = store or ArtifactStore(settings, node_state=node_state, offload=cooperative_offload())

    app = Flask("kura", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = None
    routes.install(app)
    app.extensions["kura"] = NodeServices(settings=settings, store=store,
                                          uploads=MultipartUploads(store), node_state=node_state,
                                          extensions=Extensions.from_settings(settings),
                                          analytics=Analytics.from_settings(settings))
    errors.register_error_handlers(app)
    instrumentation.install(app)

    from app.http import (bazel, gradle, keyvalue, metro, module_cache, namespaces, nx, probes,
                          turbo, xcode_cas)
    for module in (probes, xcode_cas, keyvalue, module_cache, gradle, nx, metro, turbo, bazel,
                   namespaces):
        app.register_blueprint(module.bp)
    node_metrics.install(app, store, node_state)
    return app
