"""kura-py's gunicorn worker: gunicorn's gevent worker with these changes.

1. Zero-copy downloads. gevent's ``socket.sendfile`` copies through user space in
   small reads; here a file response is sent with ``os.sendfile`` on the
   non-blocking socket, waiting cooperatively for writability on EAGAIN, for
   exactly Content-Length bytes from the file's current offset.
   Plain artifact hits skip Flask entirely (``app.http.fast_reads``), and their request
   heads skip gunicorn's parser (``app.http1_parser``).
2. Fairness. The worker yields to other greenlets between two requests of one
   keep-alive connection, so one busy connection cannot starve the others.
3. Errors raised below Flask (over-long request line, bad headers, broken chunked
   framing) are answered with the JSON ``{"message": ...}`` shape like every other
   error, always with a 4xx status (501 only for a Transfer-Encoding gunicorn does not
   implement, as RFC 9112 asks); a draining node closes each connection after its answer.
4. Slow clients cannot starve the worker: request heads have a timeout, and past the
   connection limit idle and slow connections make room and probes keep answering
   (``app.http_connections``).
5. Clean stop. When the worker is told to exit, keep-alive connections that sit idle
   between requests are closed at once instead of holding the worker for the
   keep-alive timeout (clients such as ``requests`` keep chunked-upload connections).
   SIGINT stops a worker gracefully like SIGTERM (gunicorn would exit mid-request;
   SIGQUIT stays the quick stop). A worker starts with its stop signals held pending
   until its own handlers are in place (:func:`spawning_with_stop_signals_held`).
6. HTTP/2. gunicorn 27 serves h2c (prior knowledge, Upgrade) to every client and h2 over
   TLS; this worker terminates TLS itself on the ``KURA_HTTPS_PORT`` listener
   (``app.public_tls``) and runs each HTTP/2 connection with the rules above: bounded and
   evictable waits for a new stream, GOAWAY when draining or stopping, reserve refusals,
   the JSON error shape, and the fast path on every stream (:meth:`KuraGeventWorker.handle_http2`).
"""
from __future__ import annotations

import errno
import os
import signal
import ssl
from http import HTTPStatus
from typing import Any, Callable, Iterable, Mapping

import gevent
from gevent.socket import wait_write
from gunicorn import http as gunicorn_http
from gunicorn import util as gunicorn_util
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.http.errors import ConfigurationProblem
from gunicorn.http2 import negotiation
from gunicorn.http2.errors import HTTP2ConnectionError, HTTP2ProtocolError
from gunicorn.workers.ggevent import GeventWorker

from app import tracing
from app.http1_parser import KuraRequestParser, LightRequest
from app.http2_connection import KuraHTTP2Connection, error_body, send_json_error
from app.http_connections import REFUSAL_MESSAGE, Admission, HeadWait
from app.stop_signals import STOP_SIGNALS, held, ignore, release

# The master imports this module to load the worker class: nothing here may import
# prometheus_client (multiprocess files) or the app before the fork (app.tracing imports
# nothing of OpenTelemetry until a worker starts tracing).
_served: Any = None  # app.metrics.served, bound in the worker (after the fork)
ANALYTICS_FLUSH_S = 2.0


def sendfile_all(sock: Any, file_fd: int, offset: int, nbytes: int) -> None:
    """Send ``nbytes`` of ``file_fd`` from ``offset`` with ``os.sendfile`` on the gevent
    socket's non-blocking descriptor, yielding to other greenlets while it is full."""
    sock_fd = sock.fileno()
    sent = 0
    while sent < nbytes:
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, nbytes - sent)
        except BlockingIOError:
            wait_write(sock_fd)
            continue
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        if n == 0:  # file shorter than promised: never send a short body silently
            raise OSError(errno.EIO, "segment ended before Content-Length")
        sent += n


def cooperative_sendfile(self: gunicorn_wsgi.Response, respiter: Any) -> bool:
    """Replacement for ``gunicorn.http.wsgi.Response.sendfile`` (see module docstring)."""
    if (isinstance(self.sock, ssl.SSLSocket) or not self.can_sendfile()
            or not gunicorn_util.has_fileno(respiter.filelike)):
        return False
    file_fd = respiter.filelike.fileno()
    try:
        offset = os.lseek(file_fd, 0, os.SEEK_CUR)
        nbytes = (self.response_length if self.response_length is not None
                  else os.fstat(file_fd).st_size - offset)
    except OSError:
        return False
    self.send_headers()
    if getattr(self, "_omits_body", False) or nbytes <= 0:
        return True
    chunked = self.is_chunked()
    if chunked:
        self.sock.sendall(b"%X\r\n" % nbytes)
    sendfile_all(self.sock, file_fd, offset, nbytes)
    self.sent += nbytes
    if chunked:
        self.sock.sendall(b"\r\n")
    _served("sendfile")
    return True


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str,
                     headers: Mapping[str, str] | None = None) -> None:
    """Replacement for ``gunicorn.util.write_error``: the JSON error shape, always, with the
    status's own reason phrase (gunicorn says "Bad Request" for its 501)."""
    try:
        reason = HTTPStatus(status_int).phrase
    except ValueError:
        pass
    body = error_body(mesg or reason)
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n{extra}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin1")
    gunicorn_util.write_nonblock(sock, head + body)


def _write_file_counting_fallback(self: gunicorn_wsgi.Response, respiter: Any) -> None:
    if not self.sendfile(respiter):
        # Over TLS the file is read and encrypted in user space, as for HTTP/2 (app.http.fast_reads).
        _served("read" if isinstance(self.sock, ssl.SSLSocket) else "copy")
        for item in respiter:
            self.write(item)


# The signals that stop a worker (gunicorn's SIGQUIT too), held from fork to init_signals.
WORKER_STOP_SIGNALS = (*STOP_SIGNALS, signal.SIGQUIT)


def spawning_with_stop_signals_held(spawn_worker: Callable[[], Any]) -> Callable[[], Any]:
    """Master: wrap ``Arbiter.spawn_worker`` so that each worker is forked with its stop
    signals held. Between fork and ``init_signals`` a worker still runs the master's
    handlers, which queue the signal for a master loop that never runs in the worker: a
    SIGTERM landing there was lost, and the worker served on until the master's
    graceful timeout ran out and it was SIGKILLed. Held, the signal waits for the
    worker's own handler (:meth:`KuraGeventWorker.init_signals` releases it)."""

    def spawn() -> Any:
        with held(WORKER_STOP_SIGNALS):
            return spawn_worker()

    return spawn


# Until the app's settings are loaded (``load_wsgi``): KURA_HTTP_HEADER_TIMEOUT_MS's default.
DEFAULT_HEADER_TIMEOUT_S = 60.0


def probe_paths(app: Any) -> frozenset[str]:
    """The paths of the probe routes (``app.http.probes.PROBE_ENDPOINTS``) of ``app``."""
    from app.http.probes import PROBE_ENDPOINTS

    return frozenset(rule.rule for rule in app.url_map.iter_rules() if rule.endpoint in PROBE_ENDPOINTS)


class KuraGeventWorker(GeventWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admission = Admission(limit=self.cfg.worker_connections,
                                    header_timeout_s=DEFAULT_HEADER_TIMEOUT_S,
                                    keepalive_s=self.cfg.keepalive, write_error=write_json_error)
        self.worker_connections = self._admission.pool_size  # gunicorn's pool: limit + reserve
        self._probe_paths: frozenset[str] = frozenset()
        self._fast_reads: Any = None
        self._node_state: Any = None
        self._tls: ssl.SSLContext | None = None
        self._https_port = 0

    def timeout_ctx(self) -> HeadWait:
        return self._admission.head_wait()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        conn = self._admission.accept(client)
        try:
            if self._tls is not None and listener.getsockname()[1] == self._https_port:
                client = self._tls_handshake(client)
                if client is None:
                    return
                conn.sock = client
            super().handle(listener, client, addr)
        finally:
            self._admission.close()

    def _tls_handshake(self, client: Any) -> Any:
        """``client`` wrapped in the public TLS context (ALPN picks h2 or HTTP/1.1), or None
        when the handshake fails or does not finish within the header timeout."""
        tls = self._tls.wrap_socket(client, server_side=True,  # type: ignore[union-attr]
                                    do_handshake_on_connect=False)
        timer = gevent.Timeout(self._admission.header_timeout_s)
        try:
            with timer:
                tls.do_handshake()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self.log.debug("TLS handshake timed out")
        except (ssl.SSLError, OSError) as exc:
            self.log.debug("TLS handshake failed: %s", exc)
        else:
            return tls
        gunicorn_util.close(tls)
        return None

    def handle_http2(self, listener: Any, client: Any, addr: Any, preface: bytes = b"",
                     upgrade: Any = None) -> None:
        """One HTTP/2 connection: gunicorn 27's loop (``AsyncWorker.handle_http2``: one
        stream served at a time) on :class:`KuraHTTP2Connection`, with kura's rules on top:

        - waiting for a new stream is waiting for a request head: bounded as a whole (frames
          trickling in do not extend it) by the header timeout on a new connection and by
          the keep-alive timeout later, and evictable by admission like an idle HTTP/1
          connection;
        - a draining node, a reserve connection and a stopping worker end the connection
          with GOAWAY naming the last stream served, after serving every stream already
          received (the client retries any later one elsewhere);
        - every answer, including refusals, uses the JSON error shape.
        """
        listener_name = listener.getsockname()
        conn = self._admission.current()
        h2_conn = None
        try:
            h2_conn = KuraHTTP2Connection(self.cfg, client, addr)
            batch = []
            if upgrade is not None:
                settings, http1_req, body = upgrade
                batch.append(h2_conn.initiate_upgrade(settings, http1_req, body))
            else:
                h2_conn.initiate_connection()
            if preface:  # bytes read while negotiating: the preface alone completes no request
                h2_conn.receive_data(preface)
            last_served = 0
            while True:
                for req in batch:
                    self._serve_http2_stream(listener_name, req, client, addr, h2_conn)
                    last_served = req.stream.stream_id
                if h2_conn.is_closed:
                    return
                if not self.alive or self._node_state.draining or (conn is not None and conn.reserve):
                    while h2_conn.pending_requests:  # received already: served, then GOAWAY
                        for req in h2_conn.receive_data():
                            self._serve_http2_stream(listener_name, req, client, addr, h2_conn)
                            last_served = req.stream.stream_id
                    h2_conn.close(last_stream_id=last_served)
                    return
                # A new connection's first request must come within the header timeout;
                # later ones may idle up to the keep-alive timeout first.
                wait_s = self._admission.header_timeout_s if not last_served else self.cfg.keepalive
                batch = self._next_streams(h2_conn, wait_s)
                if batch is None:
                    h2_conn.close(last_stream_id=last_served)
                    return
        except (HTTP2ConnectionError, HTTP2ProtocolError) as exc:
            self.log.debug("HTTP/2 connection ended: %s", exc)
        except (ssl.SSLError, OSError) as exc:
            self.log.debug("HTTP/2 connection lost: %s", exc)

    def _next_streams(self, h2_conn: Any, wait_s: float) -> list[Any] | None:
        """The next requests of an idle HTTP/2 connection; None when ``wait_s`` passed, the
        wait was evicted or interrupted by the worker's stop, or the client went away."""
        idle = gevent.Timeout(wait_s or None)
        try:
            with self._admission.waiting_for_request(idle), idle:
                while True:
                    requests = h2_conn.receive_data()
                    if requests or h2_conn.is_closed:
                        return requests
        except gevent.Timeout as exc:
            if exc is not idle:
                raise
            return None
        except gunicorn_http.errors.NoMoreData:
            return None

    def handle_http2_request(self, listener_name: Any, req: Any, sock: Any, addr: Any,
                             h2_conn: Any) -> None:
        conn = self._admission.current()
        if conn is not None and conn.reserve and not self._admission.admits(conn, self._is_probe(req)):
            send_json_error(h2_conn, req.stream.stream_id, 503, REFUSAL_MESSAGE,
                               headers={"Retry-After": "1"})
            return
        gevent.sleep(0)  # fairness between the connections of this worker, as for HTTP/1
        fast = self._fast_reads
        if fast is not None and fast.serve_h2(req, h2_conn):
            return
        super().handle_http2_request(listener_name, req, sock, addr, h2_conn)

    def _is_probe(self, req: Any) -> bool:
        return req.method in ("GET", "HEAD") and req.path in self._probe_paths

    def init_signals(self) -> None:
        super().init_signals()
        signal.signal(signal.SIGINT, self.handle_exit)
        signal.siginterrupt(signal.SIGINT, False)
        release(WORKER_STOP_SIGNALS)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        ignore(STOP_SIGNALS)  # already stopping; see app.stop_signals.StopRequest
        gevent.spawn(self._admission.stop)

    def init_process(self) -> None:
        global _served
        from app import metrics

        _served = metrics.served
        gunicorn_wsgi.Response.sendfile = cooperative_sendfile
        gunicorn_wsgi.Response.write_file = _write_file_counting_fallback
        gunicorn_util.write_error = write_json_error
        # gunicorn offers h2c only to peers in forwarded_allow_ips (it expects a TLS proxy
        # in front); kura's public port is the edge and serves h2c to every client, as Kura.
        negotiation.peer_trusted_for_h2c = lambda cfg, peer_addr: True
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        from app.http.fast_reads import FastReads

        services = self.wsgi.extensions["kura"]
        settings = services.settings
        tracing.start(settings, "http")  # this worker's own tracer provider (off by default)
        self._analytics = services.analytics
        if self._analytics is not None:
            self._analytics.start()  # this worker owns its analytics sender
        self._admission.header_timeout_s = settings.http_header_timeout_ms / 1000
        self._node_state = services.node_state
        from app.public_tls import server_context

        self._tls = server_context(settings)
        self._https_port = settings.https_port
        self._probe_paths = probe_paths(self.wsgi)
        self._fast_reads = FastReads.for_app(self.wsgi, sendfile_all)
        if self._fast_reads is not None:
            # Plain GET/HEAD heads are read by the light parser (app.http1_parser), for the
            # fast path; gunicorn creates one parser per connection through this function.
            gunicorn_http.get_parser = _light_heads_first
        self.wsgi = _close_when_draining(self.wsgi)

    def run(self) -> None:
        try:
            super().run()
        finally:
            analytics = getattr(self, "_analytics", None)
            if analytics is not None:
                analytics.stop(timeout_s=ANALYTICS_FLUSH_S)  # best effort: what is queued
            tracing.shutdown()  # exports the spans still queued (bounded)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
        conn = self._admission.current()
        if conn is not None:
            conn.last_request = req
            if conn.reserve:
                if not self._admission.admits(conn, self._is_probe(req)):
                    write_json_error(sock, 503, "Service Unavailable", REFUSAL_MESSAGE,
                                     headers={"Retry-After": "1"})
                    raise StopIteration()  # gunicorn closes the connection
                req.force_close()  # a reserve connection serves one request
        if conn is None or not conn.waited:
            gevent.sleep(0)  # fairness between keep-alive connections of this worker
        fast = self._fast_reads
        if fast is not None and fast.serve(req, sock, self.alive and bool(self.cfg.keepalive)):
            return True
        if isinstance(req, LightRequest):  # not a hit: gunicorn parses the same head itself
            req = req.parser.full_request(req)
            if conn is not None:
                conn.last_request = req
        return super().handle_request(listener_name, req, sock, addr)

    def _try_h2c_upgrade(self, listener: Any, req: Any, parser: Any, client: Any, addr: Any) -> bool:
        if isinstance(req, LightRequest):
            return False  # the light parser leaves every head with Upgrade to gunicorn
        return super()._try_h2c_upgrade(listener, req, parser, client, addr)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        conn = self._admission.current()
        previous = conn.last_request if conn is not None else None
        if req is None and previous is not None and getattr(previous.body, "failed", False):
            # gunicorn was discarding the unread body of a request it has already answered,
            # and that body broke its chunked framing: a second answer now would be read as
            # the answer to the client's next request. The connection just closes.
            self.log.debug("Closing connection after a malformed unread body: %s", exc)
            return
        if isinstance(exc, ConfigurationProblem):
            # A trusted peer's SCRIPT_NAME header that the request path does not start
            # with: the request's fault, not the server's (gunicorn answers 500).
            self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
            write_json_error(client, 400, "Bad Request", str(exc))
            return
        super().handle_error(req, client, addr, exc)


_gunicorn_get_parser = gunicorn_http.get_parser


def _light_heads_first(cfg: Any, source: Any, source_addr: Any, http2_connection: bool = False) -> Any:
    """gunicorn's ``http.get_parser`` with :class:`KuraRequestParser` for HTTP/1."""
    if http2_connection or getattr(cfg, "protocol", "http") != "http":
        return _gunicorn_get_parser(cfg, source, source_addr, http2_connection=http2_connection)
    return KuraRequestParser(cfg, source, source_addr)


def _close_when_draining(app: Any) -> Callable[..., Iterable[bytes]]:
    """While the node drains, every answer ends its connection (clients reconnect to a node
    that is not leaving). gunicorn drops hop-by-hop headers an app sets, so this asks
    gunicorn's own response to close; a serving node pays one flag read per request."""
    node_state = app.extensions["kura"].node_state

    def wsgi(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if node_state.draining:
            response = getattr(start_response, "__self__", None)
            if response is not None:
                response.force_close()  # gunicorn then sends Connection: close
        return app(environ, start_response)

    return wsgi
