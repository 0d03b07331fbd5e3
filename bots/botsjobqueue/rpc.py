"""The XML-RPC front of the job queue server.

The Bots methods keep their names and answers (``addjob``, ``listjobs``,
``clearjobq``); ``status``, ``history``, ``showjob`` and ``removejob`` are
added for operators.  Bad input gets an XML-RPC fault or an HTTP error and
changes nothing.

Connections are served by threads, at most ``max_connections`` at once, and
kept open between calls (HTTP/1.1), so a client that makes many calls pays
for one connection.  Request bodies are bounded and refused before they are
read; an idle connection is closed after ``request_timeout`` seconds.
"""
import socketserver
import threading
import xmlrpc.client
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

from . import jobqueue

ISUP_TASK = ['isup']


class RPCSettings:
    """What the RPC front needs from bots.ini."""

    def __init__(self, environment):
        ini = environment.ini
        self.host = ini.get('jobqueue', 'host', '127.0.0.1') or '127.0.0.1'
        self.port = environment.port
        self.max_connections = max(1, ini.getint('jobqueue', 'max_connections', 256))
        self.request_timeout = ini.getfloat('jobqueue', 'request_timeout', 10)
        self.max_request_size = ini.getint('jobqueue', 'max_request_size', 1048576)
        self.max_task_size = ini.getint('jobqueue', 'max_task_size', 65536)
        self.max_task_args = ini.getint('jobqueue', 'max_task_args', 256)


# What one answer of listjobs, status or history carries at most, counted as the bytes of its
# tasks and outputs: escaped as XML that stays well below what the clients read (16 MB).
ANSWER_BUDGET = 2 * 1024 * 1024


def task_size(task):
    """The bytes a task takes as a command line: its arguments in UTF-8, each with its end."""
    return sum(len(arg.encode('utf-8', 'surrogatepass')) + 1 for arg in task)


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
    """The methods clients call.  Each returns what Bots' clients expect."""

    def __init__(self, queue, launcher, store, authorizer, settings, logger):
        self._queue = queue
        self._launcher = launcher
        self._store = store
        self._authorizer = authorizer
        self._settings = settings
        self._logger = logger

    # ---- Bots
    def addjob(self, task, priority=5):
        """Queue ``task`` (argv list) at ``priority`` 1..9.  0 added, 2 no task, 3 not authorized, 4 duplicate."""
        check_task(task, self._settings.max_task_size, self._settings.max_task_args)
        check_priority(priority)
        if not task:
            self._logger.info('No task to add.')
            return jobqueue.NO_TASK
        if task == ISUP_TASK:
            return 0
        if not self._authorizer.allows(task):
            self._logger.warning('Refused job, not an authorized task: %s', task)
            return jobqueue.NOT_AUTHORIZED
        code, jobnumber = self._queue.add(task, priority)
        if code == jobqueue.DUPLICATE:
            self._logger.info('Duplicate job not added: %s', task)
        else:
            self._logger.info('Added job %s, priority %s: %s', jobnumber, priority, task)
        return code

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
        """``{'running': [...], 'waiting': [first `limit` of listjobs()], 'waiting_count': n}``;
        fewer waiting jobs than ``limit`` when their tasks would make the answer too large."""
        if type(limit) is not int or limit < 0:
            raise xmlrpc.client.Fault(1, 'limit should be a whole number, 0 or more')
        running = self._launcher.status()
        budget = ANSWER_BUDGET - sum(task_size(job['task']) for job in running)
        return {'running': running, 'waiting_count': len(self._queue),
                'waiting': [job.as_list() for job in bounded(self._queue.first(limit),
                                                             lambda job: task_size(job.task), budget)]}

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
        return dict(_xmlrpc_safe(record), state='finished') if record else {}

    def removejob(self, jobnumber):
        """Remove one waiting job.  0 removed, 1 no such waiting job."""
        if type(jobnumber) is not int:
            raise xmlrpc.client.Fault(1, 'jobnumber should be a whole number')
        job = self._queue.remove(jobnumber)
        if job is None:
            return 1
        self._logger.log(25, 'Removed waiting job %s: %s', jobnumber, list(job.task))
        return 0


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


class Headers(dict):
    """Request headers by lower-case name; what the handlers ask of them (``get``, ``[]``)."""

    def __getitem__(self, name):
        return dict.get(self, name.lower())

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)


class RequestHandler(SimpleXMLRPCRequestHandler):
    """HTTP/1.1 with keep-alive, a bounded body and no compressed requests."""

    MAX_HEADER_LINES = 100
    MAX_LINE = 65536

    protocol_version = 'HTTP/1.1'
    default_request_version = 'HTTP/1.0'  # so that an answer to a garbled request has a status line
    disable_nagle_algorithm = True    # headers and body go out in two writes: do not hold the second
    rpc_paths = ()            # Bots clients post to '/RPC2'; any path is accepted

    def setup(self):
        self.timeout = self.server.settings.request_timeout
        super().setup()

    def parse_request(self):
        """Read the request line and headers (HTTP/1.0 and 1.1).

        The standard handler parses headers with the e-mail package, which costs more than the
        whole addjob behind it; XML-RPC requests carry a handful of plain headers.
        """
        self.command = None
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, 'iso-8859-1').rstrip('\r\n')
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ('HTTP/1.0', 'HTTP/1.1'):
            self.send_error(400 if len(words) != 3 else 505, 'Bad request line %r' % self.requestline[:100])
            return False
        self.command, self.path, self.request_version = words
        headers = Headers()
        for _ in range(self.MAX_HEADER_LINES + 1):
            line = self.rfile.readline(self.MAX_LINE + 1)
            if len(line) > self.MAX_LINE:
                self.send_error(431, 'Header line too long')
                return False
            if line in (b'\r\n', b'\n', b''):
                break
            name, colon, value = line.decode('iso-8859-1').partition(':')
            if not colon or not name.strip():
                self.send_error(400, 'Bad header line')
                return False
            headers[name.strip().lower()] = value.strip()
        else:
            self.send_error(431, 'Too many headers')
            return False
        self.headers = headers
        connection = headers.get('connection', '').lower()
        self.close_connection = connection == 'close' or (
            self.request_version == 'HTTP/1.0' and connection != 'keep-alive')
        if headers.get('expect', '').lower() == '100-continue' and self.request_version == 'HTTP/1.1':
            return self.handle_expect_100()
        return True

    def do_POST(self):
        try:
            length = int(self.headers.get('content-length', ''))
        except ValueError:
            length = -1
        if length < 0:
            self._refuse(411, 'a Content-Length is required')
        elif length > self.server.settings.max_request_size:
            self._refuse(413, 'request larger than %d bytes' % self.server.settings.max_request_size)
        elif self.headers.get('content-encoding', 'identity').lower() != 'identity':
            self._refuse(415, 'compressed requests are not accepted')
        else:
            super().do_POST()

    def _refuse(self, code, reason):
        self.send_error(code, reason)
        self.close_connection = True

    def log_message(self, format, *args):
        self.server.logger.debug('RPC %s: ' + format, self.client_address[0], *args)


class JobQueueRPCServer(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    """A thread per connection, at most ``max_connections`` connections at once."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(self, settings, logger):
        self.settings = settings
        self.logger = logger
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        super().__init__((settings.host, settings.port), requestHandler=RequestHandler,
                         logRequests=False, allow_none=True)

    def process_request(self, request, client_address):
        # A burst of clients waits a moment for a free slot; past that, a quick refusal beats a hang.
        if not self._slots.acquire(timeout=1.0):
            try:
                request.sendall(b'HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n'
                                b'Connection: close\r\n\r\n')
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
