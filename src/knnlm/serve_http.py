"""The HTTP side of `knnlm serve`: connections, capacity, streaming and the graceful stop.

Robustness: every malformed request gets a 4xx JSON error (bad JSON, non-UTF-8 bodies, NaN/Infinity, nesting too deep,
wrong types, a missing, invalid or lying Content-Length).

Connections and workers: one thread (``serve_forever``) accepts connections and watches every idle one with a selector;
only a connection with data to read is handed to one of ``--workers`` threads, for one request, and then handed back.
So an idle keep-alive connection (the ``openai`` client keeps one) or a connection that never sends anything holds no
worker, and is closed after ``--request_timeout_s`` of silence. Up to ``--max_queue`` requests wait for a worker,
behind a listen backlog of ``REQUEST_QUEUE_SIZE``; a request beyond that capacity is answered 503 with ``Retry-After``
(read first, so the client sees the answer rather than a reset).

Graceful stop (:meth:`CompletionServer.stop`, what SIGTERM and SIGINT do): the listening socket is closed (new
connections are refused), idle connections are closed at once, requests in flight finish within ``shutdown_grace_s``
(their answers say ``Connection: close``); what is still running then is cut (generation ends at its next token, its
socket is shut). Worker threads are daemons, so nothing keeps the process alive after that.
"""
from __future__ import annotations

import json
import logging
import queue
import selectors
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from .serve import ApiError, CompletionEngine, ServeArgs, bind_error, parse_body

log = logging.getLogger(__name__)

REQUEST_QUEUE_SIZE = 256  # listen backlog: connections the kernel holds before accept (http.server's default is 5)
MAX_BODY_BYTES = 8 << 20  # a larger Content-Length is refused with 413
MAX_IDLE_CONNECTIONS = 4096  # beyond this many silent connections the longest-silent one is closed
RETRY_AFTER_S = 1
POLL_S = 0.5  # the connection loop wakes at least this often (to close connections silent too long)


class _Handler(BaseHTTPRequestHandler):
    """One connection's reader and writer. It lives as long as the connection; the server calls
    ``handle_one_request`` once per request (see :class:`CompletionServer`)."""

    server_version = "knnlm-serve"
    protocol_version = "HTTP/1.1"

    @classmethod
    def open(cls, sock, address, server) -> "_Handler":
        """A handler for ``sock`` without running a request (BaseHTTPRequestHandler's constructor would serve the
        whole connection)."""
        h = cls.__new__(cls)
        h.request, h.client_address, h.server = sock, address, server
        h.setup()
        h.close_connection = True
        return h

    def setup(self):
        self.timeout = self.server.request_timeout_s  # socket timeout: a request or body that stalls ends
        super().setup()

    def log_message(self, fmt, *args):  # route http.server's access log through logging
        log.debug("%s %s", self.address_string(), fmt % args)

    def _head(self, status: int, headers: dict) -> None:
        if self.server.stopping:  # the server is stopping: this is the connection's last answer
            self.close_connection = True
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self._head(status, {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})})
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, header too long, unknown method) as JSON bodies."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        try:
            self._send(code, ApiError(code, message or self.responses.get(code, ("error",))[0]).body())
        except OSError:
            pass

    def _error(self, e: ApiError, close: bool = False) -> None:
        if close:  # the rest of the connection cannot be parsed: answer, then close without a reset
            self.close_connection = True
        self._send(e.status, e.body())
        if close:
            _drain(self.connection)

    def _authorized(self) -> bool:
        key = self.server.api_key
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if key and (scheme.lower() != "bearer" or given.strip() != key):  # the scheme is case-insensitive (RFC 9110)
            self._send(401, ApiError(401, "missing or wrong API key", kind="authentication_error").body())
            return False
        return True

    def _read_body(self) -> bytes:
        """The request body by Content-Length; ApiError (411, 400, 413, 408, 415) when it is missing, invalid,
        short or compressed."""
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked bodies are not supported; send a Content-Length")
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # a compressed body would be read as JSON text and blamed on its bytes
            raise ApiError(415, f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed")
        values = set(self.headers.get_all("Content-Length") or [])
        if len(values) > 1:  # which one frames the body is ambiguous (RFC 9112 6.3: request smuggling)
            raise ApiError(400, f"{len(values)} different Content-Length headers; send one")
        value = self.headers.get("Content-Length")
        if value is None:
            raise ApiError(411, "a POST needs a Content-Length header")
        if not (value.strip().isascii() and value.strip().isdigit()):  # ('²'.isdigit(), but int('²') fails)
            raise ApiError(400, f"Content-Length {value[:40]!r} is not a non-negative integer")
        length = int(value)
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"the body ({length} bytes) exceeds {MAX_BODY_BYTES} bytes")
        chunks, got = [], 0
        try:
            while got < length:  # read1: what has arrived is kept when the socket times out
                chunk = self.rfile.read1(length - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except (TimeoutError, socket.timeout):
            pass
        raw = b"".join(chunks)
        if len(raw) != length:
            raise ApiError(408, f"the body ended after {len(raw)} of the {length} bytes its Content-Length announced")
        return raw

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok"})
        elif path == "/v1/models":
            if self._authorized():
                self._send(200, self.server.engine.models())
        else:
            self._send(404, ApiError(404, f"no route GET {path}", kind="not_found_error").body())

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            raw = self._read_body()
        except ApiError as e:
            self._error(e, close=True)
            return
        if not self._authorized():
            return
        if path != "/v1/completions":
            self._send(404, ApiError(404, f"no route POST {path}; this server offers /v1/completions",
                                     kind="not_found_error").body())
            return
        engine = self.server.engine
        try:
            req = engine.parse(parse_body(raw))
            if req.stream:
                self._stream(req)
            else:
                self._send(200, engine.response(req, engine.run(req)))
        except ApiError as e:
            self._send(e.status, e.body())
        except (ConnectionError, TimeoutError):  # the client went away or stalled (mid-stream): nothing to answer
            self.close_connection = True
        except Exception as e:  # a bug or an out-of-memory: answer 500 and keep serving
            log.exception("completion failed")
            self._send(500, ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").body())

    def _stream(self, req) -> None:
        """Server-sent events: one ``data: {chunk}`` per choice as its text grows, a usage chunk when asked for, then
        ``data: [DONE]``. HTTP/1.1 gets a chunked body (the connection stays usable); HTTP/1.0 a body ended by close."""
        engine, chunked = self.server.engine, self.request_version != "HTTP/1.0"
        head = engine.chunk_head()
        if not chunked:
            self.close_connection = True
        self._head(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                         **({"Transfer-Encoding": "chunked"} if chunked else {})})

        def event(payload: str) -> None:
            data = f"data: {payload}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

        def emit(choice) -> None:
            chunk = choice.chunk()
            if chunk is not None:
                event(json.dumps({**head, "choices": [chunk]}))

        try:
            choices = engine.run(req, emit)
            if req.include_usage:
                event(json.dumps({**head, "choices": [], "usage": engine.usage(req, choices)}))
        except (ConnectionError, TimeoutError):
            raise
        except Exception as e:  # the 200 is out: report in the stream (as vLLM does), then end it
            log.exception("streamed completion failed")
            self.close_connection = True
            event(json.dumps(ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").body()))
        event("[DONE]")
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _not_allowed(self):
        self.close_connection = True
        self._send(405, ApiError(405, f"method {self.command} is not allowed; use GET or POST").body(),
                   {"Allow": "GET, POST"})
        _drain(self.connection)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    def __getattr__(self, name: str):  # any other method (TRACE, CONNECT, FOO): 405 too, not the base class's 501
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)


class _BusyHandler(_Handler):
    """Answers any request with 503 + Retry-After, after reading it (closing on unread data would reset)."""

    def _busy(self):
        try:
            self._read_body() if self.command == "POST" else None
        except ApiError:
            pass
        self.close_connection = True
        self._send(503, ApiError(503, f"the server is at capacity ({self.server.workers} workers, "
                                      f"{self.server.max_queue} waiting); retry after {RETRY_AFTER_S} s",
                                 kind="server_overloaded").body(), {"Retry-After": str(RETRY_AFTER_S)})
        _drain(self.connection)

    do_GET = do_POST = _busy


def _drain(sock, limit: int = 1 << 20, wait_s: float = 0.5) -> None:
    """Half-closes ``sock`` and reads what the client still sends, so that closing it sends FIN, not RST."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(wait_s)
        got = 0
        while got < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += len(chunk)
    except OSError:
        pass


class _Conn:
    """A client connection between requests: its socket, its handler (buffered reader/writer), when it fell silent."""
    __slots__ = ("sock", "address", "handler", "since")

    def __init__(self, sock, address, handler):
        self.sock, self.address, self.handler, self.since = sock, address, handler, time.monotonic()


class CompletionServer(HTTPServer):
    """An HTTP server whose ``workers`` threads serve requests, not connections (module docstring): ``max_queue``
    requests may wait, 503 + Retry-After (from at most ``workers`` short-lived threads) beyond that, and a graceful
    :meth:`stop`."""

    request_queue_size = REQUEST_QUEUE_SIZE
    allow_reuse_address = True

    def __init__(self, engine: CompletionEngine, host: str, port: int, api_key: str | None = None, workers: int = 32,
                 max_queue: int = 64, request_timeout_s: float = 30.0, shutdown_grace_s: float = 10.0):
        self.engine, self.api_key = engine, api_key
        self.workers, self.max_queue, self.request_timeout_s = workers, max_queue, request_timeout_s
        self.shutdown_grace_s = shutdown_grace_s
        self._slots = threading.BoundedSemaphore(workers + max_queue)  # requests with a worker or waiting for one
        self._reject_slots = threading.BoundedSemaphore(workers)
        self.rejected = 0
        self.stopping = False  # set by stop(): answers close their connection
        self._stopped = False
        self._cond = threading.Condition()  # guards _active, _looping; notified when a request ends
        self._active: set[_Conn] = set()  # connections a worker (or a rejecter) owns
        self._idle: dict[_Conn, None] = {}  # connections the loop watches, oldest first (loop thread only)
        self._returned: queue.SimpleQueue = queue.SimpleQueue()  # connections workers hand back
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._looping = False
        self._loop_done = threading.Event()
        self._loop_done.set()
        self._force = False
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._threads: list[threading.Thread] = []  # before binding: a failed bind calls server_close -> stop
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            self._selector.close()
            raise bind_error(host, port, e) from None
        self._threads += [threading.Thread(target=self._work, name=f"knnlm-serve-{i}", daemon=True)
                          for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    # ------------------------------------------------------------------------------------------------ connection loop
    def serve_forever(self, poll_interval: float = POLL_S) -> None:
        """Accepts connections and hands each one with data to read to a worker, until :meth:`stop`."""
        with self._cond:
            if self.stopping:
                return
            self._looping = True
            self._loop_done.clear()
        sel = self._selector
        sel.register(self.socket, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self.stopping:
                for key, _ in sel.select(poll_interval):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        _recv_all(self._wake_r)
                    else:
                        self._unwatch(key.data)
                        self._dispatch(key.data)
                self._take_back()
                self._expire()
        finally:
            with self._cond:
                self._looping = False
            for key, _ in sel.select(0):  # requests that arrived before the stop are served, not dropped
                if isinstance(key.data, _Conn):
                    self._unwatch(key.data)
                    self._dispatch(key.data)
            for conn in list(self._idle):
                self._unwatch(conn)
                self._close(conn)
            self._take_back()
            sel.unregister(self._wake_r)
            sel.unregister(self.socket)
            self.socket.close()  # new connections are refused from here on
            self._loop_done.set()

    def _accept(self) -> None:
        try:
            sock, address = self.socket.accept()
        except OSError:  # the client reset before we got to it
            return
        try:
            conn = _Conn(sock, address, _Handler.open(sock, address, self))
        except OSError:
            sock.close()
            return
        self._watch(conn)

    def _watch(self, conn: _Conn) -> None:
        conn.since = time.monotonic()
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        self._idle[conn] = None
        if len(self._idle) > MAX_IDLE_CONNECTIONS:
            oldest = next(iter(self._idle))
            self._unwatch(oldest)
            self._close(oldest)

    def _unwatch(self, conn: _Conn) -> None:
        self._idle.pop(conn, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _take_back(self) -> None:
        """Watches again the keep-alive connections workers are done with; when stopping, serves the ones whose next
        request has already begun to arrive (a request sent before the stop is in flight) and closes the rest."""
        while True:
            try:
                conn = self._returned.get_nowait()
            except queue.Empty:
                return
            if not self.stopping:
                self._watch(conn)
            elif self._has_buffered(conn):
                self._dispatch(conn)
            else:
                self._close(conn)

    def _expire(self) -> None:
        """Closes connections silent for longer than request_timeout_s (the oldest come first)."""
        limit = time.monotonic() - self.request_timeout_s
        for conn in list(self._idle):
            if conn.since > limit:
                break
            self._unwatch(conn)
            self._close(conn)

    def _dispatch(self, conn: _Conn) -> None:
        if self._slots.acquire(blocking=False):
            self._begin(conn)
            self._tasks.put(conn)
        elif self._reject_slots.acquire(blocking=False):
            self.rejected += 1
            self._begin(conn)
            threading.Thread(target=self._reject, args=(conn,), daemon=True).start()
        else:  # even the rejecters are busy: close at once (the kernel may reset it)
            self.rejected += 1
            self._close(conn)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # ------------------------------------------------------------------------------------------------------ requests
    def _begin(self, conn: _Conn) -> None:
        with self._cond:
            self._active.add(conn)

    def _end(self, conn: _Conn) -> None:
        with self._cond:
            self._active.discard(conn)
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            conn = self._tasks.get()
            if conn is None:
                return
            try:
                keep = self._serve(conn)
            finally:
                self._slots.release()
                self._end(conn)  # before the hand-back: the loop may give the connection to another worker at once
            if keep:
                self._hand_back(conn)

    def _serve(self, conn: _Conn) -> bool:
        """Serves the requests that have arrived on ``conn``; True when it stays open (silent now), else closes it."""
        h = conn.handler
        try:
            while True:
                h.close_connection = True
                h.handle_one_request()
                if h.close_connection:
                    break
                if not self._has_buffered(conn):  # a pipelined request is served at once; else back to the loop
                    if self.stopping:
                        break
                    return True
        except Exception:
            self.handle_error(conn.sock, conn.address)
        self._close(conn)
        return False

    def _hand_back(self, conn: _Conn) -> None:
        with self._cond:
            if self._looping:
                self._returned.put(conn)
                self._wake()
                return
            pending = self._has_buffered(conn)  # a request that began to arrive as the loop ended: in flight
            if pending:
                self._active.add(conn)  # a stop still in its grace period waits for it
        if pending:
            try:
                if self._serve(conn):  # silent again, and no loop is left to watch it
                    self._close(conn)
            finally:
                self._end(conn)
        else:
            self._close(conn)

    def _has_buffered(self, conn: _Conn) -> bool:
        """Whether the next request is already in the handler's read buffer (the selector cannot see it there)."""
        try:
            conn.sock.setblocking(False)
            return bool(conn.handler.rfile.peek(1))
        except OSError:
            return False
        finally:
            try:
                conn.sock.settimeout(self.request_timeout_s)
            except OSError:
                pass

    def _reject(self, conn: _Conn) -> None:
        try:
            _BusyHandler.open(conn.sock, conn.address, self).handle_one_request()
        except Exception:
            self.handle_error(conn.sock, conn.address)
        finally:
            self._close(conn)
            self._reject_slots.release()
            self._end(conn)

    def _close(self, conn: _Conn) -> None:
        try:
            conn.handler.wfile.flush()
        except (OSError, ValueError):
            pass
        self.shutdown_request(conn.sock)

    def handle_error(self, request, client_address):  # a client that went away: not worth a traceback
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    # ------------------------------------------------------------------------------------------------------ stopping
    def stop(self, grace_s: float | None = None) -> int:
        """Graceful stop: refuses new connections, closes idle ones, lets requests in flight finish for up to
        ``grace_s`` (default: shutdown_grace_s) seconds, then cuts what is left. Returns the number of requests cut.
        :meth:`force` (e.g. from a second signal) ends the wait early."""
        grace = self.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        with self._cond:
            if self._stopped:
                return 0
            self.stopping = self._stopped = True
        self._wake()
        self._loop_done.wait()
        with self._cond:
            while self._active and not self._force and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            cut = list(self._active)
        if cut:
            waited = grace - max(0.0, deadline - time.monotonic())  # less than the grace after a second signal
            log.warning("%d request(s) still running after %.1f s of the %.1f s grace period%s: cut", len(cut), waited,
                        grace, " (a second signal ended it)" if self._force else "")
            self.engine.abort.set()
            for conn in cut:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._cond:  # the workers notice at their next read, write or token
                end = time.monotonic() + 2.0
                while self._active and time.monotonic() < end:
                    self._cond.wait(0.1)
        for _ in self._threads:
            self._tasks.put(None)
        return len(cut)

    def force(self) -> None:
        """Ends a running :meth:`stop`'s grace period now (safe to call from a signal handler)."""
        self._force = True

    def shutdown(self) -> None:
        """``socketserver``'s name for the stop: :meth:`stop` with the default grace period."""
        self.stop()

    def server_close(self) -> None:
        self.stop(0)
        super().server_close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def _recv_all(sock) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def start_server(lm, args: ServeArgs):
    """Starts serving ``lm`` in a background thread -> (server, thread); stop with ``server.stop()`` (graceful, then
    closed) or ``server.shutdown(); server.server_close()``."""
    engine = CompletionEngine(lm, args.served_model_name, args.max_logprobs, args.max_n)
    server = CompletionServer(engine, args.host, args.port, args.api_key, workers=args.workers,
                              max_queue=args.max_queue, request_timeout_s=args.request_timeout_s,
                              shutdown_grace_s=args.shutdown_grace_s)
    thread = threading.Thread(target=server.serve_forever, name="knnlm-serve", daemon=True)
    thread.start()
    log.info("serving %s at %s", engine.name, server.url)
    return server, thread
