"""gunicorn configuration: ``gunicorn -c gunicorn.conf.py`` starts a whole kura-py node.

Plain Python read by the gunicorn master at start. It imports nothing heavy at the
top (no LMDB, no gevent, no grpc, no prometheus_client): the master forks the HTTP
workers, which build their own app (``app.http:create_app()``) after gevent has
patched them, and it spawns the REAPI and replicator processes.

Processes:
- master (this file's hooks): data-directory lock, shared node state, drain, and
  supervision of the child processes below;
- HTTP workers: ``app.http_worker.KuraGeventWorker`` (gevent), one Flask app each;
- ``python -m app.reapi``: the REAPI gRPC servers (threads, never gevent), KURA_GRPC_WORKERS
  of them sharing the gRPC port (``app.port_guard``);
- ``python -m app.replication``: replicator, internal API, housekeeping.
"""
import math
import os
import shutil
import signal
import sys
import time

from app.run_dir import default_run_dir, prometheus_dir
from app.settings import ConfigError, Settings

try:
    _settings = Settings.from_env()
except ConfigError as _exc:
    sys.stderr.write(f"kura: invalid configuration: {_exc}\n")
    sys.exit(1)

# Everything the node memory-maps lives in the per-run directory, on a memory filesystem,
# never on the data disk (see app/run_dir.py). Every process of the node gets it from here.
_run_dir = _settings.run_dir or default_run_dir(_settings.data_dir)
_run_dir_prepared = False
os.environ["KURA_RUN_DIR"] = _run_dir
_settings = _settings.with_overrides(run_dir=_run_dir)
# prometheus_client picks multiprocess mode at import, so this must be in the
# environment before any worker or child imports it.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = prometheus_dir(_run_dir)

wsgi_app = "app.http:create_app()"
bind = [f"{_settings.bind_host}:{_settings.port}"]
if _settings.public_tls:
    # The worker terminates TLS on this listener only (app/public_tls.py).
    bind.append(f"{_settings.bind_host}:{_settings.https_port}")
# HTTP/2 on the public port: h2c by prior knowledge or by Upgrade on KURA_PORT, h2 by ALPN
# on KURA_HTTPS_PORT. 128 concurrent streams per connection, like Kura.
http_protocols = "h2,h1"
http2_cleartext = "both"
http2_max_concurrent_streams = 128
workers = _settings.resolved_http_workers
worker_class = "app.http_worker.KuraGeventWorker"
worker_connections = _settings.worker_connections
keepalive = 75
timeout = 120
# A worker told to stop (by the master after its drain, or by a signal sent to the whole
# process group) lets its in-flight requests finish for as long as a drain may take.
graceful_timeout = max(1, math.ceil(_settings.drain_completion_timeout_ms / 1000))
limit_request_line = 8190
# sendfile: leave unset; gunicorn treats any value of this setting as "disabled".
proc_name = "kura"
accesslog = None
errorlog = "-"
loglevel = _settings.log_level
preload_app = False
control_socket_disable = True

_lock = None
_node_state = None
_drain = None
_children = []


def on_starting(server):
    """Master, before anything else: take the data directory and reset per-run state."""
    global _lock, _node_state, _run_dir_prepared
    import logging

    from app import run_dir
    from app.datadir_lock import DataDirLock, DataDirLocked
    from app.node_state import NodeState, state_path

    logging.basicConfig(level=_settings.log_level.upper(),
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s %(message)s")
    os.makedirs(_settings.data_dir, exist_ok=True)
    _lock = DataDirLock(_settings.data_dir)
    try:
        _lock.acquire()
    except DataDirLocked as exc:
        sys.stderr.write(f"kura: {exc}\n")
        sys.exit(1)
    # The REAPI processes share the gRPC port (SO_REUSEPORT): only if nothing else has it.
    from app.port_guard import describe, foreign_listeners

    taken = foreign_listeners(_settings.bind_host, _settings.grpc_port, os.getpid())
    if taken:
        sys.stderr.write(f"kura: KURA_GRPC_PORT {_settings.grpc_port} is already in use "
                         f"({describe(taken)}); another process must not share it\n")
        _lock.release()
        sys.exit(1)
    # Nothing of this node runs yet: per-run state and staged temp files are garbage.
    shutil.rmtree(os.path.join(_settings.resolved_tmp_dir, "staging"), ignore_errors=True)
    try:
        # The workers, the REAPI processes, the replicator and this master (extension metrics).
        run_dir.prepare(_run_dir, processes=workers + _settings.resolved_grpc_workers + 2,
                        data_dir=_settings.data_dir,
                        tmp_dir=_settings.resolved_tmp_dir)
    except run_dir.RunDirError as exc:
        sys.stderr.write(f"kura: {exc}\n")
        sys.exit(1)
    _run_dir_prepared = True
    # Fail at start, naming the variables, rather than in every child's boot. Loading the
    # hooks records metrics in this process too: their files reserve their pages.
    from app import metric_files

    metric_files.install()
    try:
        if _settings.extensions_active:
            from app.extensions import Extensions

            Extensions.from_settings(_settings).close()
        from app.replication.peer_tls import PeerTls

        PeerTls.from_settings(_settings)
        from app.public_tls import server_context

        server_context(_settings)
    except ConfigError as exc:
        sys.stderr.write(f"kura: invalid configuration: {exc}\n")
        run_dir.remove(_run_dir)  # gunicorn does not call on_exit for a start that failed
        sys.exit(1)
    _node_state = NodeState.reset(state_path(_run_dir))
    _node_state.set("started_ms", int(time.time() * 1000))
    _node_state.set("master_pid", os.getpid())
    _node_state.set("writer_lock", 1)  # held since acquire() above, until on_exit


def when_ready(server):
    """Master, once the HTTP sockets are bound: start children, take over the stop signals."""
    global _drain
    from app.drain import STOP_GRACE_S, DrainController
    from app.http_worker import spawning_with_stop_signals_held
    from app.supervisor import ChildProcess, python_module

    grpc_workers = _settings.resolved_grpc_workers
    reapi_argv = python_module("app.reapi") + (["--share-port"] if grpc_workers > 1 else [])
    for child in [ChildProcess(f"reapi_{index}", reapi_argv, on_exit=forget_child)
                  for index in range(grpc_workers)] + [
            ChildProcess("replicator", python_module("app.replication"), on_exit=forget_child)]:
        child.start()
        _children.append(child)

    graceful_stop = server.handle_term

    def stop_master():
        # The drain is over: what a worker still serves is overdue, so the master's own
        # wait for its workers is short (workers keep their forked copy of the setting).
        server.cfg.set("graceful_timeout", STOP_GRACE_S)
        os.kill(os.getpid(), signal.SIGTERM)

    _drain = DrainController(_node_state, _settings.drain_completion_timeout_ms,
                             children=_children, stop_master=stop_master)

    def on_stop_signal(name):
        def handle():
            if _drain.stop_sent:
                graceful_stop()  # raises StopIteration: gunicorn's graceful stop
            else:
                _drain.begin(exit_after=True, reason=name)
        return handle

    # SIGINT drains like SIGTERM (gunicorn would stop at once, cutting requests off).
    server.handle_term = on_stop_signal("SIGTERM")
    server.handle_int = on_stop_signal("SIGINT")
    # SIGUSR1 drains without exiting (preStop); gunicorn's log reopening moves to SIGHUP's reload.
    server.handle_usr1 = lambda: _drain.begin(exit_after=False)
    # Once the node stops, a worker that exits (the whole group was signalled) stays down.
    manage_workers = server.manage_workers
    server.manage_workers = lambda: None if _drain.exiting else manage_workers()
    server.spawn_worker = spawning_with_stop_signals_held(server.spawn_worker)
    server.log.info("event=node_ready http_port=%s grpc_port=%s grpc_workers=%d data_dir=%s",
                    _settings.port, _settings.grpc_port, grpc_workers,
                    os.path.abspath(_settings.data_dir))


def post_request(worker, req, environ, resp):
    """HTTP worker, after gunicorn wrote a response or gave up on it: count the artifact
    body it carried (``kura_artifact_egress_*``). The download fast path counts its own."""
    from app.http.bodies import record_egress

    record_egress(environ, resp.sent if resp is not None else 0)


def child_exit(server, worker):
    """Master: a worker exited; forget its slot and its live metrics."""
    forget_child(worker.pid)


def forget_child(pid):
    """Master: a process of the node exited (a worker, a REAPI process, the replicator);
    forget its slot and its live metrics."""
    from prometheus_client import multiprocess

    if _node_state is not None:
        _node_state.release_pid(pid)
    multiprocess.mark_process_dead(pid)


def on_exit(server):
    """Master, last: stop the children (SIGKILL past a short deadline), wait for workers that
    gunicorn had to SIGKILL, remove the per-run directory, release the data directory."""
    from app.drain import STOP_GRACE_S
    from app.stop_signals import STOP_SIGNALS, ignore
    from app.supervisor import reap

    # The node is stopping: a later SIGTERM/SIGINT (a second `kill`, the group signal after
    # the master's) must not end it with -15 while Python tears down, when it has put the
    # default actions back.
    ignore(STOP_SIGNALS)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in _children:
        child.terminate()
    reap(server.WORKERS, deadline)
    for child in _children:
        child.stop(deadline)
    if _run_dir_prepared:
        from app import run_dir

        run_dir.remove(_run_dir)
    if _lock is not None:
        _lock.release()
