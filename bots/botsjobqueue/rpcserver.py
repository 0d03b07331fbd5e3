"""The HTTP server in front of the job queue service: XML-RPC by POST, the status pages by GET.

One thread serves every connection (an event loop over non-blocking
sockets): it gathers each request whole, then answers it at once - the
calls are quick, and a thread-per-connection server is exactly what slow
clients exhaust.  What a client can hold is bounded:

- a request must arrive whole within ``request_timeout`` seconds of the
  connection's opening or of the previous answer (not per read): a client
  that sends a byte now and then is closed all the same;
- its request line and headers at most 64 KB, its body at most
  ``max_request_size`` (refused before it is read), all connections'
  unanswered bytes together at most ``BUFFER_BUDGET`` (past it the largest
  is closed);
- at most ``max_connections`` connections (fitted to the open-files limit):
  one more closes the one that has waited longest for its request, once that
  one has waited a second; until then new clients wait in the listen backlog.
  So a client that sends its request at once is served even while thousands
  of slow ones are open, and a crowd of quick clients is served in turn.

Connections are kept open between calls (HTTP/1.1 keep-alive).

Each connection is in one of four states, and the selector calls its
handler: ``reading`` a request, ``writing`` an answer that did not fit at
once, ``waiting`` for a call the store kept busy (the retry thread answers
it), ``closing`` once its last answer is out.  What a request head may say is
``httphead.py``; what a call does is ``rpcservice.py``.  The loop, the
connections and the retries of calls that met a busy store stay in this one
module (about 450 lines): only the loop's thread may change a connection, and
every part here does.
"""
import collections
import logging
import queue
import selectors
import socket
import sqlite3
import sys
import threading
import time
import xmlrpc.client
from xmlrpc.server import SimpleXMLRPCDispatcher

from .admission import CLIENT
from .botslog import RateLimited
from .configuration import ConfigError
from .httphead import (PAGE_HEADERS, BrowserRules, Refusal, SecretRule, body_length, head_end, http_answer,
                       parse_head)
from .store import StoreBusy, patiently

BUFFER_BUDGET = 64 * 1024 * 1024  # unanswered request bytes of all connections together
SWEEP = 0.25                      # seconds between looks for connections past their deadline
MAKE_ROOM_AFTER = 1.0             # a connection this young is not closed to make room for another


class RPCSettings:
    """What the RPC front needs from bots.ini."""

    def __init__(self, environment):
        ini = environment.ini
        self.host = ini.get('jobqueue', 'host', '127.0.0.1') or '127.0.0.1'
        self.port = environment.port
        self.max_connections = max(1, ini.getint('jobqueue', 'max_connections', 1024))
        self.request_timeout = ini.getfloat('jobqueue', 'request_timeout', 10)
        self.max_request_size = ini.getint('jobqueue', 'max_request_size', 1048576)
        self.max_task_size = ini.getint('jobqueue', 'max_task_size', 65536)
        self.max_task_args = ini.getint('jobqueue', 'max_task_args', 256)
        self.max_queue_bytes = max(65536, ini.getint('jobqueue', 'max_queue_bytes', 64 * 1024 * 1024))
        loopback = self.host in ('127.0.0.1', 'localhost', '::1')
        # The status page, /health and /metrics: on by default only where only this machine reaches them.
        self.status_page = ini.getboolean('jobqueue', 'status_page', loopback)
        self.client_timeout = environment.client_timeout
        self.secret = environment.secret
        self.require_secret = ini.get('jobqueue', 'require_secret', 'remote').strip().lower() or 'remote'
        if self.require_secret not in ('remote', 'always'):
            raise ConfigError('Error: [jobqueue] require_secret is remote (clients of other machines give the '
                              'secret) or always (every client does), not "%s".' % self.require_secret)
        if self.require_secret == 'always' and not self.secret:
            raise ConfigError('Error: [jobqueue] require_secret = always needs a secret ([jobqueue] secret or '
                              'secret_file).')


def raise_open_files_limit(wanted, logger):
    """Make room for ``wanted`` open files (POSIX); return how many connections fit.

    The server keeps up to 256 files for itself (the database, logs, job pipes and lock files),
    but never more than half of a small limit: with 128 files allowed, 64 connections fit."""
    if sys.platform == 'win32':
        return min(wanted, 500)           # select() on Windows watches at most 512 sockets
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        fits = max(1, soft - min(256, soft // 2))
        if fits < wanted:
            logger.warning('max_connections = %d, but this process may open only %d files: at most %d '
                           'connections are served at once.', wanted, soft, fits)
            return fits
    return wanted


def listen(settings):
    """The server's listening socket.  Raises OSError (port taken, say)."""
    return socket.create_server((settings.host, settings.port), backlog=1024)


class Connection:
    """One client connection: its state, what it sent so far, what it is still to receive."""

    __slots__ = ('sock', 'address', 'state', 'inbuf', 'outbuf', 'deadline', 'body_length', 'head_end',
                 'keep_alive', 'method', 'path', 'handler')

    def __init__(self, sock, address, deadline):
        self.sock = sock
        self.address = address
        self.state = 'reading'           # reading, writing, waiting (a busy store), closing
        self.inbuf = bytearray()
        self.outbuf = b''
        self.deadline = deadline
        self.body_length = None          # known once the head has been read
        self.head_end = 0
        self.keep_alive = True
        self.method = self.path = None
        self.handler = None              # what the selector calls when the socket is ready


class JobQueueRPCServer:
    """The server: an event loop over every connection, XML-RPC answers made by the dispatcher
    of the standard library (``register_service``), pages from ``pages``."""

    def __init__(self, settings, logger, listener=None):
        self.settings = settings
        self.logger = logger
        self.max_connections = raise_open_files_limit(settings.max_connections, logger)
        self.dispatcher = SimpleXMLRPCDispatcher(allow_none=True, encoding=None)
        self.socket = listener or listen(settings)
        self.socket.setblocking(False)
        self._wakeup_read, self._wakeup_write = socket.socketpair()
        self._wakeup_read.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._connections = collections.OrderedDict()     # by deadline, the earliest first
        self._buffered = 0
        self._stopping = False
        self._accept_on = False          # the listening socket is in the selector
        self._stopped = threading.Event()
        self.pages = {}      # GET path -> function(query) returning (status, content type, body bytes)
        self.refusals = RateLimited(logger)
        self.rules = BrowserRules(settings.host, settings.port)
        self.secrets = SecretRule(settings.secret, settings.require_secret)
        self._store_busy = False         # the call just dispatched met a busy store: it is retried
        self._retries = queue.SimpleQueue()   # (connection, request body, deadline, client) to retry
        self._retrying = 0               # calls handed to it and not answered yet
        self._answers = collections.deque()   # (connection, answer bytes) from it, sent by the loop
        threading.Thread(target=self._retry_loop, name='rpc-retry', daemon=True).start()

    def register_service(self, service):
        """Serve the ``METHODS`` of ``service``: only those, never its other methods."""
        for name in service.METHODS:
            self.dispatcher.register_function(getattr(service, name), name)

    # ---- the loop
    def serve_forever(self):
        selector = self._selector
        self._accepting(True)
        selector.register(self._wakeup_read, selectors.EVENT_READ, self._answer_retried)
        next_sweep = time.monotonic() + SWEEP
        try:
            while not self._stopping:
                for key, events in selector.select(SWEEP):
                    key.data(events)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP
                    self._accepting(True)
                elif not self._accept_on and len(self._connections) < self.max_connections:
                    self._accepting(True)
        finally:
            self._stopped.set()

    def shutdown(self):
        """Stop the loop (from another thread) and wait until it has stopped."""
        self._stopping = True
        try:
            self._wakeup_write.send(b'x')
        except OSError:
            pass
        self._stopped.wait(10)

    def server_close(self):
        for connection in list(self._connections):
            self._close(connection)
        self._selector.close()
        self.socket.close()
        self._wakeup_read.close()
        self._wakeup_write.close()

    # ---- connections
    def _accept(self, events=None):
        for _ in range(64):
            if not self._room():
                self._accepting(False)       # new clients wait in the listen backlog meanwhile
                return
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:           # out of files, for one: the others are served on
                self.refusals.log(logging.WARNING, 'accept', '', 'Cannot accept a connection: %s', exc)
                self._accepting(False)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = Connection(sock, address, time.monotonic() + self.settings.request_timeout)
            connection.handler = lambda events, connection=connection: self._ready(connection, events)
            self._connections[connection] = None
            self._selector.register(sock, selectors.EVENT_READ, connection.handler)

    def _room(self):
        """True when one more connection may be taken: below ``max_connections``, or after closing
        the one that has waited longest - if it has waited ``MAKE_ROOM_AFTER`` seconds (one that
        has just connected is about to send its request)."""
        if len(self._connections) < self.max_connections:
            return True
        oldest = next(iter(self._connections))
        if time.monotonic() - (oldest.deadline - self.settings.request_timeout) < MAKE_ROOM_AFTER:
            return False
        self.logger.debug('RPC %s: closed to make room (max_connections = %d)', oldest.address[0],
                          self.max_connections)
        self._close(oldest)
        return True

    def _accepting(self, accept):
        """Watch the listening socket (True) or leave new connections in its backlog (False)."""
        if accept != self._accept_on:
            self._accept_on = accept
            if accept:
                self._selector.register(self.socket, selectors.EVENT_READ, self._accept)
            else:
                self._selector.unregister(self.socket)

    def _close(self, connection):
        if connection not in self._connections:
            return                       # closed already
        del self._connections[connection]
        self._buffered -= len(connection.inbuf)
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        connection.sock.close()

    def _restart_deadline(self, connection):
        connection.deadline = time.monotonic() + self.settings.request_timeout
        self._connections.move_to_end(connection)

    def _sweep(self, now):
        """Close the connections past their deadline (they are first in the order)."""
        while self._connections:
            connection = next(iter(self._connections))
            if connection.deadline > now:
                return
            if connection.inbuf and not connection.outbuf:
                self._send_now(connection, http_answer(408, b'request not received in time\n', 'text/plain', True))
            self._close(connection)

    # ---- one connection, as its state says
    def _ready(self, connection, events):
        if connection.state in ('writing', 'closing'):
            if not self._write(connection) and connection.state == 'reading':
                self._selector.modify(connection.sock, selectors.EVENT_READ, connection.handler)
                self._serve(connection)             # a request sent before the answer was out
        else:
            self._read(connection)                  # reading, or waiting: its data waits its turn

    def _read(self, connection):
        """Take what arrived; answer each request once it is whole (``reading``)."""
        try:
            data = connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if not data:
            self._close(connection)
            return
        connection.inbuf += data
        self._buffered += len(data)
        if self._buffered > BUFFER_BUDGET:
            largest = max(self._connections, key=lambda c: len(c.inbuf))
            self._refuse(largest, Refusal(503, 'the server holds too much unanswered data'))
            if largest is connection:
                return
        self._serve(connection)

    def _serve(self, connection):
        """Answer every request of the connection that has arrived whole, while it is ``reading``;
        a request that breaks a rule is refused and the connection closed."""
        try:
            while connection.state == 'reading':
                request = self._next_request(connection)
                if request is None:
                    return
                self._answer(connection, request)
        except Refusal as refusal:
            self._refuse(connection, refusal)

    def _next_request(self, connection):
        """The body of the next whole request (its head read into the connection), or None while
        it has not all arrived.  Raises Refusal."""
        inbuf = connection.inbuf
        if connection.body_length is None:
            found = head_end(inbuf)
            if found is None:
                return None
            end, size = found
            method, path, version, headers, keep_alive = parse_head(inbuf[:end])
            if not self.secrets.admits(headers, connection.address[0]):
                self.rules.check(method, headers)
            connection.method, connection.path = method, path
            connection.keep_alive = keep_alive
            connection.head_end = end + size
            connection.body_length = body_length(method, headers, self.settings.max_request_size)
            if headers.get('expect', '').lower() == '100-continue' and version == 'HTTP/1.1':
                self._send_now(connection, b'HTTP/1.1 100 Continue\r\n\r\n')
        request_end = connection.head_end + connection.body_length
        if len(inbuf) < request_end:
            return None
        body = bytes(inbuf[connection.head_end:request_end])
        del inbuf[:request_end]
        self._buffered -= request_end
        connection.body_length = None
        return body

    def _answer(self, connection, body):
        """Answer one request: an XML-RPC call (POST) or a page (GET, HEAD)."""
        close = not connection.keep_alive
        if connection.method != 'POST':
            self._send(connection, self._page(connection.method, connection.path, close), close)
            return
        CLIENT.set(connection.address[0])
        self._store_busy = False
        answer = self.dispatcher._marshaled_dispatch(body, self._call)
        if self._store_busy:
            self._retry_later(connection, body)
        else:
            self._send(connection, http_answer(200, answer, close=close), close)

    def _page(self, method, target, close):
        """The answer to a GET (or HEAD) of the status page, /health or /metrics."""
        path, _, query = target.partition('?')
        page = self.pages.get(path) if self.settings.status_page else None
        if page is None:
            code, content_type, body = 404, 'text/plain; charset=utf-8', b'no such page\n'
            if not self.settings.status_page:
                code, body = 403, b'the status page is off here ([jobqueue] status_page)\n'
        else:
            try:
                code, content_type, body = page(query)
            except Exception as exc:          # a page must not take the server down; it is logged
                self.logger.exception('Error making page %s', path)
                code, content_type, body = 500, 'text/plain; charset=utf-8', ('error: %s\n' % exc).encode('utf-8')
        return http_answer(code, b'' if method == 'HEAD' else body, content_type, close, PAGE_HEADERS, len(body))

    def _refuse(self, connection, refusal):
        client = connection.address[0]
        self.refusals.log(logging.WARNING, refusal.code, client, 'Refused a request from %s: %d %s',
                          client, refusal.code, refusal.reason)
        self._buffered -= len(connection.inbuf)
        connection.inbuf = bytearray()
        connection.outbuf = b''
        self._send(connection, http_answer(refusal.code, (refusal.reason + '\n').encode('utf-8', 'replace'),
                                           'text/plain', close=True), close=True)

    def _send_now(self, connection, data):
        """Send what fits now, without waiting (a short interim or last word)."""
        try:
            connection.sock.send(data)
        except OSError:
            pass

    def _send(self, connection, data, close):
        """Send an answer: what does not fit now is ``writing``; the connection is ``closing`` after
        its last answer, else ``reading`` again."""
        self._restart_deadline(connection)          # a slow reader gets request_timeout too
        connection.outbuf = data
        connection.state = 'closing' if close else 'writing'
        if self._write(connection):
            self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection.handler)

    def _write(self, connection):
        """Send what fits of the answer; True while some is left (the selector says when more fits)."""
        try:
            sent = connection.sock.send(connection.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(connection)
            return False
        connection.outbuf = connection.outbuf[sent:]
        if connection.outbuf:
            return True
        if connection.state == 'closing':
            self._close(connection)
            return False
        connection.state = 'reading'
        self._restart_deadline(connection)
        return False

    # ---- calls that meet a busy store (another process holds its lock)
    def _call(self, method, params):
        """Dispatch one call; one that finds the store busy is left to the retry thread (the loop
        must answer everyone else meanwhile).  While calls wait there, adds join them, in order."""
        if self._retrying and method == 'addjob':
            self._store_busy = True
            return 0                                # not sent: the retry thread answers
        try:
            return self.dispatcher._dispatch(method, params)
        except StoreBusy:
            self._store_busy = True
            return 0
        except (sqlite3.Error, OSError) as exc:
            raise self._store_fails(method, CLIENT.get(), exc) from exc

    def _store_fails(self, method, client, exc):
        """The Fault of a call whose store failed (a full disk, a database out of reach): logged,
        and said in words, not as an exception's class.  Sent again, an add that was stored after
        all meets the duplicate rule."""
        self.refusals.log(logging.ERROR, 'store', client, 'The job store fails: %s from %s is not done (%s).',
                          method, client, exc)
        return xmlrpc.client.Fault(1, 'the job store fails (%s): not done, try again' % exc)

    def _retry_later(self, connection, body):
        connection.state = 'waiting'
        self._retrying += 1
        patience = min(self.settings.client_timeout / 2, self.settings.request_timeout)
        self._restart_deadline(connection)
        self._retries.put((connection, body, time.monotonic() + patience, connection.address[0]))

    def _retry_loop(self):
        """Answer each request left here as the loop would have, its call tried again while the
        store is busy until the client's patience (half of ``client_timeout``) has run out: then
        a Fault says it was not stored."""
        while True:
            connection, body, deadline, client = self._retries.get()
            CLIENT.set(client)
            answer = self.dispatcher._marshaled_dispatch(
                body, lambda method, params: self._call_patiently(method, params, deadline, client))
            self._answers.append((connection, answer))
            try:
                self._wakeup_write.send(b'a')
            except OSError:
                pass

    def _call_patiently(self, method, params, deadline, client):
        try:
            return patiently(self.dispatcher._dispatch, method, params,
                             patience=max(0.0, deadline - time.monotonic()))
        except (sqlite3.Error, OSError) as exc:
            raise self._store_fails(method, client, exc) from exc
        except StoreBusy:
            self.refusals.log(logging.WARNING, 'busy', client, 'The job store is locked by another process: %s '
                              'from %s is not stored; the client is told to try again.', method, client)
            raise xmlrpc.client.Fault(1, 'the job store is locked by another process: not stored, try again')

    def _answer_retried(self, events=None):
        """(Woken up by the retry thread, or to stop.)  Send the answers of retried calls."""
        try:
            self._wakeup_read.recv(4096)
        except OSError:
            pass
        while self._answers:
            connection, answer = self._answers.popleft()
            self._retrying -= 1
            if connection not in self._connections:
                continue                            # it went away meanwhile
            connection.state = 'reading'
            close = not connection.keep_alive
            self._send(connection, http_answer(200, answer, close=close), close)
            if connection.state == 'reading' and connection.inbuf:
                self._serve(connection)             # a request sent before this answer came
