"""The XML-RPC front of the job queue server.

The Bots methods keep their names and answers (``addjob``, ``listjobs``,
``clearjobq``); ``status``, ``history``, ``showjob`` and ``removejob`` are
added for operators.  Bad input gets an XML-RPC fault or an HTTP error and
changes nothing.

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
"""
import collections
import contextvars
import email.utils
import queue
import ipaddress
import logging
import selectors
import socket
import sys
import threading
import time
import xmlrpc.client
from xmlrpc.server import SimpleXMLRPCDispatcher

from . import jobqueue
from .jobqueue import task_size
from .store import StoreBusy, patiently
from .botslog import RateLimited

ISUP_TASK = ['isup']
# Who sent the request being answered (the address), for the log; a schedule is 'this server'.
CLIENT = contextvars.ContextVar('client', default='this server')


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


# What one answer of listjobs, status or history carries at most, counted as the bytes of its
# tasks and outputs: escaped as XML that stays well below what the clients read (16 MB).
ANSWER_BUDGET = 2 * 1024 * 1024


def check_task(task, max_size, max_args):
    """Refuse (with a Fault) anything but a list of strings of bounded count and size."""
    if not isinstance(task, list) or not all(isinstance(arg, str) for arg in task):
        raise xmlrpc.client.Fault(1, 'task should be a list of strings (the program and its arguments)')
    if len(task) > max_args:
        raise xmlrpc.client.Fault(1, 'task has %d arguments; at most %d are accepted ([jobqueue] max_task_args)'
                                  % (len(task), max_args))
    if task_size(task) > max_size:
        raise xmlrpc.client.Fault(1, 'task is longer than %d bytes ([jobqueue] max_task_size)' % max_size)
    if any('\0' in arg for arg in task):
        raise xmlrpc.client.Fault(1, 'task arguments cannot contain NUL characters')


def check_priority(priority):
    """Refuse (with a Fault) anything but a whole number 1..9 (a bool or float is not one)."""
    if type(priority) is not int or not 1 <= priority <= 9:
        raise xmlrpc.client.Fault(1, 'priority should be a whole number from 1 (most urgent) to 9, not %r'
                                  % (priority,))


class JobQueueService:
    """The methods clients call (``METHODS``, and no other).  Each returns what Bots' clients expect."""

    METHODS = ('addjob', 'listjobs', 'clearjobq', 'status', 'history', 'showjob', 'removejob', 'schedules',
               'pause', 'resume')

    def __init__(self, queue, launcher, store, authorizer, settings, logger, scheduler=None, metrics=None):
        self.scheduler = scheduler       # set once the schedules are read
        self.metrics = metrics
        self._queue = queue
        self._launcher = launcher
        self._store = store
        self._authorizer = authorizer
        self._settings = settings
        self._logger = logger
        self.refusals = RateLimited(logger)
        self._full = False               # the queue was full at the last add (said once)
        self.stopping = None             # while the server stops: (deadline on the monotonic clock, its jobs)

    def reconfigure(self, settings, authorizer):
        """A reload: new limits and authorized tasks.  (Only ``METHODS`` are served.)"""
        self._settings = settings
        self._authorizer = authorizer
        self._queue.max_bytes = settings.max_queue_bytes

    # ---- Bots
    def addjob(self, task, priority=5):
        """Queue ``task`` (argv list) at ``priority`` 1..9.  0 added, 2 no task, 3 not authorized, 4 duplicate."""
        check_task(task, self._settings.max_task_size, self._settings.max_task_args)
        check_priority(priority)
        if task == ISUP_TASK:
            return 0
        if self.stopping is not None:
            raise xmlrpc.client.Fault(1, 'the server is %s: the job is not added; send it again when a server '
                                         'runs' % self.stopping_text())
        return self.add(task, priority)[0]

    def stopping_text(self):
        """'stopping, waits for job 3 for up to 42 s' (or '... no job runs'), while the server stops."""
        deadline, jobs = self.stopping
        if not jobs:
            return 'stopping, no job runs'
        return 'stopping, waits for job%s %s for up to %d s' % ('s' if len(jobs) > 1 else '', ', '.join(map(str, jobs)),
                                                              max(0, deadline - time.monotonic()))

    def add(self, task, priority, schedule=None):
        """Queue a checked task; ``(code, jobnumber)`` (jobnumber None when nothing was queued).
        ``schedule``: the name of the schedule that fired it, for the log and the history."""
        origin = '' if schedule is None else ' (schedule [%s])' % schedule
        if not task:
            self._logger.info('No task to add%s.', origin)
            self._count('no task')
            return jobqueue.NO_TASK, None
        if not self._authorizer.allows(task):
            client = CLIENT.get()
            self.refusals.log(logging.WARNING, 'not authorized', client, 'Refused job%s from %s, not an authorized '
                              'task: %s', origin, client, shortened(task))
            self._count('not authorized')
            return jobqueue.NOT_AUTHORIZED, None
        try:
            code, jobnumber, previous = self._queue.add(task, priority)
        except jobqueue.QueueFull:
            self._count('queue full')
            if not self._full:
                self._full = True
                self._logger.error('The queue is full: its waiting jobs take %d bytes of tasks ([jobqueue] '
                                   'max_queue_bytes = %d); new jobs are refused until jobs have left it.',
                                   self._queue.size(), self._queue.max_bytes)
            raise xmlrpc.client.Fault(1, 'the queue is full ([jobqueue] max_queue_bytes = %d); the job is not '
                                         'stored, try again later' % self._queue.max_bytes)
        if self._full:
            self._full = False
            self._logger.log(25, 'The queue takes new jobs again.')
        self._count('duplicate' if code == jobqueue.DUPLICATE else None)
        if code == jobqueue.DUPLICATE:
            self._logger.info('Duplicate job%s not added: %s', origin, task)
        elif previous is not None:
            self._logger.info('Priority of waiting job %s changed from %s to %s%s: %s',
                              jobnumber, previous, priority, origin, task)
        else:
            if schedule is not None:
                patiently(self._store.set_scheduled, jobnumber, schedule, patience=30)   # the scheduler's thread
            self._logger.info('Added job %s, priority %s%s: %s', jobnumber, priority, origin, task)
        return code, jobnumber

    def _count(self, refusal):
        if self.metrics is not None:
            if refusal is None:
                self.metrics.added.inc()
            else:
                self.metrics.answered.labels(refusal).inc()

    def pause(self):
        """Start no new job until ``resume``; running jobs finish, addjob goes on.  Survives a restart."""
        if not self._queue.paused:
            self._store.set_setting('paused', str(time.time()))
            self._queue.pause(True)
            self._logger.log(25, 'Queue paused: no new job starts until it is resumed; running jobs finish, '
                                 'new jobs are accepted and kept.')
        return 0

    def resume(self):
        """Start jobs again after ``pause``."""
        if self._queue.paused:
            self._store.set_setting('paused', '')
            self._queue.pause(False)
            self._logger.log(25, 'Queue resumed: jobs start again.')
        return 0

    def health(self):
        """The state ``/health`` and ``/metrics`` tell (not an XML-RPC method)."""
        oldest = self._store.oldest_waiting()
        last = self._store.history(1, with_output=False)
        state = {'accepting': self.stopping is None, 'paused': self._queue.paused, 'running': len(self._launcher.status()),
                 'waiting': len(self._queue), 'runners_alive': self._launcher.runners_alive(),
                 'oldest_waiting_age': max(0.0, time.time() - oldest) if oldest and len(self._queue) else None,
                 'last_finished': None}
        if last:
            state['last_finished'] = {key: last[0].get(key) for key in ('jobnumber', 'exitcode', 'status', 'ended')}
        return state

    def listjobs(self, offset=0):
        """The waiting jobs in launch order, each ``[priority, jobnumber, task]``.

        One answer is bounded (``ANSWER_BUDGET``); a longer queue is read in pages: the next
        page starts at ``offset`` = the number of jobs read so far."""
        if type(offset) is not int or offset < 0:
            raise xmlrpc.client.Fault(1, 'offset should be a whole number, 0 or more')
        jobs = self._queue.waiting()[offset:]
        return [job.as_list() for job in bounded(jobs, lambda job: task_size(job.task))]

    def clearjobq(self):
        """Remove every waiting job (running ones go on).  Returns 0."""
        count = self._queue.clear()
        self._logger.log(25, 'Job queue cleared: %d waiting job(s) removed.', count)
        return 0

    # ---- operators
    def status(self, limit=100):
        """``{'running': [...], 'waiting': [first `limit` of listjobs()], 'waiting_count': n,
        'retry_at': {jobnumber: time}}``; fewer waiting jobs than ``limit`` when their tasks would
        make the answer too large.  ``retry_at`` gives when each delayed job waits again."""
        if type(limit) is not int or limit < 0:
            raise xmlrpc.client.Fault(1, 'limit should be a whole number, 0 or more')
        running = self._launcher.status()
        budget = ANSWER_BUDGET - sum(task_size(job['task']) for job in running)
        # Delayed jobs (the engine found its database locked) come last, each with its retry time.
        answer = {'running': running, 'waiting_count': len(self._queue), 'paused': self._queue.paused,
                  'waiting': [job.as_list() for job in bounded(self._queue.first(limit),
                                                               lambda job: task_size(job.task), budget)],
                  'retry_at': {str(number): when for number, when in self._queue.retry_times().items()}}
        upcoming = self.scheduler.first() if self.scheduler is not None else None
        if upcoming and self.stopping is None:
            answer['next_schedule'] = {'schedule': upcoming[1], 'at': upcoming[0]}
        if self.stopping is not None:
            answer['stopping'] = self.stopping_text()
        return answer

    def schedules(self):
        """Each ``[scheduleN]`` of bots.ini: section, when, task, priority, enabled, next and last
        run, and the job it last queued with its state or result."""
        if self.scheduler is None:
            return []
        upcoming = self.scheduler.next_times()
        answer = []
        for name, schedule in sorted(self.scheduler.schedules.items()):
            entry = {'schedule': name, 'when': schedule.when, 'task': list(schedule.task),
                     'priority': schedule.priority, 'enabled': schedule.enabled, 'timezone': str(schedule.tz),
                     'catchup': schedule.catchup}
            if name in upcoming:
                entry['next_run'] = upcoming[name]
            last = self._store.last_fired(name)
            if last is not None:
                entry['last_run'] = last
                jobnumber = self._store.last_job(name)
                if jobnumber is not None:
                    entry['last_job'] = jobnumber
                    job = self.showjob(jobnumber)
                    entry['last_result'] = (job.get('state', 'unknown') if job.get('state') != 'finished' else
                                            '%s, exit code %s' % (job.get('status'), job.get('exitcode', '-')))
            answer.append(entry)
        return answer

    def history(self, limit=20):
        """The newest finished jobs, newest first (fewer when their outputs would make the
        answer too large; ``showjob`` gives each one whole)."""
        if type(limit) is not int or limit < 1:
            raise xmlrpc.client.Fault(1, 'limit should be a positive whole number')
        records = self._store.history(min(limit, 10000))
        return [_xmlrpc_safe(record) for record in bounded(
            records, lambda record: task_size(record['task']) + len(record.get('output') or ''))]

    def showjob(self, jobnumber):
        """One job, waiting, running or finished, as a dict with its ``state``; {} when unknown."""
        if type(jobnumber) is not int:
            raise xmlrpc.client.Fault(1, 'jobnumber should be a whole number')
        for running in self._launcher.status():
            if running['jobnumber'] == jobnumber:
                return dict(running, state='running')
        job = self._queue.get(jobnumber)
        if job is not None:
            return {'state': 'waiting', 'jobnumber': jobnumber, 'priority': job.priority, 'task': list(job.task)}
        record = self._store.finished(jobnumber)
        if record:
            return dict(_xmlrpc_safe(record), state='finished')
        return self._launcher.between(jobnumber) or {}

    def removejob(self, jobnumber):
        """Remove one waiting job.  0 removed, 1 no such waiting job."""
        if type(jobnumber) is not int:
            raise xmlrpc.client.Fault(1, 'jobnumber should be a whole number')
        job = self._queue.remove(jobnumber)
        if job is None:
            return 1
        self._logger.log(25, 'Removed waiting job %s: %s', jobnumber, list(job.task))
        return 0


def shortened(task, size=500):
    """A task as the log shows it: its start, when it is long."""
    text = repr(list(task))
    return text if len(text) <= size else '%s... (%d characters)' % (text[:size], len(text))


def bounded(items, size, budget=ANSWER_BUDGET):
    """The first of ``items`` whose sizes add up to at most ``budget`` (the first one always)."""
    chosen = []
    for item in items:
        budget -= size(item)
        if budget < 0 and chosen:
            break
        chosen.append(item)
    return chosen


def _xmlrpc_safe(record):
    """XML-RPC has no None: leave such fields out."""
    return {key: value for key, value in record.items() if value is not None}


MAX_HEAD = 65536                 # request line and headers, bytes
MAX_HEADER_LINES = 100
BUFFER_BUDGET = 64 * 1024 * 1024  # unanswered request bytes of all connections together
SWEEP = 0.25                      # seconds between looks for connections past their deadline
MAKE_ROOM_AFTER = 1.0             # a connection this young is not closed to make room for another

REASONS = {100: 'Continue', 200: 'OK', 400: 'Bad Request', 403: 'Forbidden', 404: 'Not Found',
           408: 'Request Timeout', 411: 'Length Required',
           413: 'Content Too Large', 415: 'Unsupported Media Type', 431: 'Request Header Fields Too Large',
           500: 'Internal Server Error', 501: 'Not Implemented', 503: 'Service Unavailable',
           505: 'HTTP Version Not Supported'}


class Refusal(Exception):
    """A request answered with an HTTP error, after which the connection is closed."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Connection:
    """One client connection: what it sent so far, what it is still to receive."""

    __slots__ = ('sock', 'inbuf', 'outbuf', 'deadline', 'body_length', 'head_end', 'keep_alive', 'closing',
                 'address', 'method', 'path', 'waiting')

    def __init__(self, sock, address, deadline):
        self.sock = sock
        self.address = address
        self.inbuf = bytearray()
        self.outbuf = b''
        self.deadline = deadline
        self.body_length = None          # known once the head has been read
        self.head_end = 0
        self.keep_alive = True
        self.closing = False             # close once the answer is out
        self.method = self.path = None
        self.waiting = False             # its call waits for a busy store (see JobQueueRPCServer._retry)


# Headers whose second copy would make two servers read one request in two ways (smuggling).
SINGLE_HEADERS = frozenset(('host', 'content-length', 'transfer-encoding', 'content-type', 'origin'))


def own_names(host):
    """The names of this server a Host header may give: ``localhost``, the configured host, and
    where other machines reach it, this machine's own names."""
    names = {'localhost', host.lower()}
    if host not in ('127.0.0.1', 'localhost', '::1'):
        names.update(name.lower() for name in (socket.gethostname(), socket.getfqdn()) if name)
    return names


def split_host(value):
    """``(name, port)`` of ``host:port``, ``[v6]:port`` or a bare name (port 80)."""
    if value.startswith('['):
        name, _, rest = value[1:].partition(']')
        port = rest[1:] if rest.startswith(':') else ''
    else:
        name, colon, port = value.rpartition(':')
        if not colon:
            name, port = value, ''
    if not port:
        return name, 80
    return name, int(port) if port.isdigit() and port.isascii() else -1


def parse_head(data):
    """``(method, path, version, headers dict, keep_alive)`` of a request head.  Raises Refusal."""
    lines = bytes(data).decode('iso-8859-1').split('\n')
    request_line = lines[0].rstrip('\r')
    words = request_line.split()
    if len(words) != 3:
        raise Refusal(400, 'Bad request line %r' % request_line[:100])
    method, path, version = words
    if version not in ('HTTP/1.0', 'HTTP/1.1'):
        raise Refusal(505, 'HTTP version %r is not served' % version[:20])
    if len(lines) > MAX_HEADER_LINES + 3:
        raise Refusal(431, 'Too many headers')
    headers = {}
    for line in lines[1:]:
        line = line.rstrip('\r')
        if not line:
            continue
        name, colon, value = line.partition(':')
        if not colon or not name.strip():
            raise Refusal(400, 'Bad header line')
        name = name.strip().lower()
        if name in headers and name in SINGLE_HEADERS:
            raise Refusal(400, 'header %s given twice' % name)
        headers[name] = value.strip()
    connection = headers.get('connection', '').lower()
    keep_alive = connection != 'close' and (version == 'HTTP/1.1' or connection == 'keep-alive')
    return method, path, version, headers, keep_alive


# Every page answer: no guessing of types, no framing by other sites, scripts only from the server.
PAGE_HEADERS = ('X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nCache-Control: no-store\r\n'
                "Content-Security-Policy: default-src 'self'; style-src 'self' 'unsafe-inline'\r\n")


def http_answer(code, body, content_type='text/xml', close=False, extra='', length=None):
    head = ('HTTP/1.1 %d %s\r\nServer: bots-jobqueueserver\r\nDate: %s\r\nContent-Type: %s\r\n'
            'Content-Length: %d\r\n%s%s\r\n' % (code, REASONS.get(code, ''), email.utils.formatdate(usegmt=True),
                                                 content_type, len(body) if length is None else length, extra,
                                                 'Connection: close\r\n' if close else ''))
    return head.encode('ascii') + body


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


class JobQueueRPCServer:
    """The XML-RPC server: an event loop over every connection, answers made by the dispatcher
    of the standard library (``register_service``)."""

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
        self._own_names = own_names(settings.host)
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
        selector.register(self._wakeup_read, selectors.EVENT_READ, False)
        next_sweep = time.monotonic() + SWEEP
        try:
            while not self._stopping:
                for key, events in selector.select(SWEEP):
                    if key.data is None:
                        self._accept()
                    elif key.data is False:
                        self._answer_retried()      # woken up: answers of retried calls, or to stop
                    elif events & selectors.EVENT_WRITE:
                        self._write(key.data)
                    else:
                        self._read(key.data)
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
    def _accept(self):
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
            self._connections[connection] = None
            self._selector.register(sock, selectors.EVENT_READ, connection)

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
                self._selector.register(self.socket, selectors.EVENT_READ, None)
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

    def _read(self, connection):
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
        try:
            self._serve(connection)
        except Refusal as refusal:
            self._refuse(connection, refusal)

    def _serve(self, connection):
        """Answer every request that has arrived whole.  Raises Refusal."""
        while not connection.outbuf and not connection.closing and not connection.waiting:
            inbuf = connection.inbuf
            if connection.body_length is None:
                end = inbuf.find(b'\r\n\r\n', 0, MAX_HEAD + 4)
                size = 4
                if end < 0:
                    end, size = inbuf.find(b'\n\n', 0, MAX_HEAD + 2), 2
                if end < 0:
                    if len(inbuf) > MAX_HEAD:
                        raise Refusal(431, 'request line and headers larger than %d bytes' % MAX_HEAD)
                    return
                method, path, version, headers, keep_alive = parse_head(inbuf[:end])
                self._check_browser_rules(method, headers)
                connection.method, connection.path = method, path
                connection.keep_alive = keep_alive
                connection.head_end = end + size
                connection.body_length = self._body_length(method, headers)
                if headers.get('expect', '').lower() == '100-continue' and version == 'HTTP/1.1':
                    self._send_now(connection, b'HTTP/1.1 100 Continue\r\n\r\n')
            request_end = connection.head_end + connection.body_length
            if len(inbuf) < request_end:
                return
            body = bytes(inbuf[connection.head_end:request_end])
            del inbuf[:request_end]
            self._buffered -= request_end
            connection.body_length = None
            if connection.method == 'POST':
                CLIENT.set(connection.address[0])
                self._store_busy = False
                answer = self.dispatcher._marshaled_dispatch(body, self._call)
                if self._store_busy:
                    self._retry_later(connection, body)
                    return
                answer = http_answer(200, answer, close=not connection.keep_alive)
            else:
                answer = self._page(connection.method, connection.path, not connection.keep_alive)
            self._send(connection, answer, close=not connection.keep_alive)

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

    def _retry_later(self, connection, body):
        connection.waiting = True
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
        except StoreBusy:
            self.refusals.log(logging.WARNING, 'busy', client, 'The job store is locked by another process: %s '
                              'from %s is not stored; the client is told to try again.', method, client)
            raise xmlrpc.client.Fault(1, 'the job store is locked by another process: not stored, try again')

    def _answer_retried(self):
        try:
            self._wakeup_read.recv(4096)
        except OSError:
            pass
        while self._answers:
            connection, answer = self._answers.popleft()
            self._retrying -= 1
            connection.waiting = False
            if connection in self._connections:
                self._send(connection, http_answer(200, answer, close=not connection.keep_alive),
                           close=not connection.keep_alive)
            if connection in self._connections and not connection.outbuf and connection.inbuf:
                try:
                    self._serve(connection)           # a request sent before this answer came
                except Refusal as refusal:
                    self._refuse(connection, refusal)

    def _check_browser_rules(self, method, headers):
        """Keep web pages of other sites out (SPEC 7).  Raises Refusal.

        A page of another origin in the operator's browser can send a form or a ``fetch`` to
        loopback: such a POST cannot say ``Content-Type: text/xml`` without a CORS preflight,
        which is never granted, and it says where it comes from in ``Origin``.  DNS rebinding
        (a site's name that comes to point at 127.0.0.1) shows in the ``Host`` header."""
        host = headers.get('host')
        if host is not None and not self._is_own_host(host):
            raise Refusal(403, 'Host %r is not this server' % host[:100])
        origin = headers.get('origin')
        if origin is not None and not (origin.startswith('http://') and self._is_own_host(origin[7:])):
            raise Refusal(403, 'a request from the web page of another site (Origin %r) is refused' % origin[:100])
        if method == 'POST':
            content_type = headers.get('content-type', '').partition(';')[0].strip().lower()
            if content_type != 'text/xml':
                raise Refusal(415, 'an XML-RPC request says Content-Type: text/xml')
            if headers.get('sec-fetch-site', 'same-origin') not in ('same-origin', 'none'):
                raise Refusal(403, 'a request from the web page of another site is refused')

    def _is_own_host(self, value):
        """True if ``value`` (a Host header, or an Origin without its scheme) names this server:
        an address, ``localhost`` or the configured host, with this server's port.  A name of
        another site is what DNS rebinding sends; an address cannot be rebound."""
        name, port = split_host(value.strip().lower())
        if port != self.settings.port:
            return False
        if name in self._own_names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def _body_length(self, method, headers):
        if method in ('GET', 'HEAD'):
            if headers.get('content-length', '0') not in ('', '0') or 'transfer-encoding' in headers:
                raise Refusal(400, 'a GET has no body')
            return 0
        if method != 'POST':
            raise Refusal(501, 'Unsupported method (%r): XML-RPC is served by POST' % method[:20])
        if 'transfer-encoding' in headers:
            raise Refusal(400, 'Transfer-Encoding is not accepted; send a Content-Length')
        given = headers.get('content-length')
        if given is None:
            raise Refusal(411, 'a Content-Length is required')
        if not given.isdigit() or not given.isascii():
            raise Refusal(400, 'Content-Length %r is not a number of bytes' % given[:40])
        length = int(given)
        if length > self.settings.max_request_size:
            raise Refusal(413, 'request larger than %d bytes' % self.settings.max_request_size)
        if headers.get('content-encoding', 'identity').lower() != 'identity':
            raise Refusal(415, 'compressed requests are not accepted')
        return length

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
        connection.closing = close
        self._restart_deadline(connection)          # a slow reader gets request_timeout too
        connection.outbuf = data
        self._write(connection, first=True)

    def _write(self, connection, first=False):
        try:
            sent = connection.sock.send(connection.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(connection)
            return
        connection.outbuf = connection.outbuf[sent:]
        if connection.outbuf:
            if first:
                self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
            return
        if connection.closing:
            self._close(connection)
            return
        self._restart_deadline(connection)
        if first:
            return                                  # _serve goes on with what else has arrived
        self._selector.modify(connection.sock, selectors.EVENT_READ, connection)
        if connection.inbuf:                        # a request sent before the answer came
            try:
                self._serve(connection)
            except Refusal as refusal:
                self._refuse(connection, refusal)
