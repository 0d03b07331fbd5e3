"""Outputs: what each job printed, kept by a process apart from the server.

A job's stdout and stderr go into a pipe.  Where file descriptors can be
passed between processes (POSIX), one output keeper (``capture.py --serve``)
reads every job's pipe and writes the end of it to ``<jobnumber>.out``;
elsewhere a capture process runs beside each job (``capture.py``).  Either
way the reader holds the pipe before the job starts, so that a job never
writes into a pipe only the server reads, and a server that dies loses no
output.  ``Outputs`` makes that choice once.

Whatever kept it, a job's output is a capture with the same face:
``done()``, ``wait(timeout)``, ``error`` (None, ``LOST`` or why it could not
be kept) and ``text()``.  The kinds: ``Kept`` (by the keeper),
``CaptureProcess`` (its own process), ``KeptBefore`` (by a keeper from
before a restart, known by its pid), ``FileComing`` (from before a restart,
keeper unknown: the file is waited for).
"""
import os
import socket
import subprocess
import sys
import threading
import time

from .botslog import printable
from .processes import is_alive, wait_for_pid
from .store import patiently

LIVE = '.live'          # beside a running job's output file: what it printed so far (see capture.py)
LOST = 'lost'           # the error of an output whose keeper died before it wrote the file
CAPTURE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'capture.py')


class Capture:
    """The output of one job, written to ``path`` by whoever keeps it."""

    error = None
    relay_pid = None       # the process that writes it, as the store keeps it for a restart

    def __init__(self, path):
        self.path = path

    def done(self):
        """True once the file is written (or will never be)."""
        return True

    def wait(self, timeout):
        """Block until done, at most ``timeout`` seconds; ``done()``."""
        return self.done()

    def job_ended(self):
        """The job has ended: the server lets go of what it held for it."""

    def text(self):
        """What the job printed (its end, within ``output_limit``), with a note when it was lost."""
        output = read_output(self.path)
        if self.error == LOST:
            output = read_output(self.path + LIVE)
            return output + '\n[... the output keeper stopped before it wrote this output: only its last snapshot ' \
                'is kept ...]\n' if output else '[the output keeper stopped before it wrote this output: it is lost]'
        if self.error:
            return '[the output could not be kept: %s]' % self.error
        return output

    def discard(self):
        """Remove the files, once the output is stored."""
        remove_output(self.path)


class Kept(Capture):
    """An output the output keeper writes; ``finish`` is its word that it did."""

    def __init__(self, path, keeper):
        super().__init__(path)
        self._keeper = keeper
        self._written = threading.Event()
        self.relay_pid = keeper.process.pid

    def finish(self, error):
        self.error = error
        self._written.set()

    def done(self):
        return self._written.is_set()

    def wait(self, timeout):
        return self._written.wait(timeout)

    def job_ended(self):
        self._keeper.release(self.path)


class CaptureProcess(Capture):
    """An output written by a capture process of its own (where pipes cannot be handed over)."""

    def __init__(self, path, process):
        super().__init__(path)
        self.process = process
        self.relay_pid = process.pid

    def done(self):
        return self.process.poll() is not None

    def wait(self, timeout):
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.done()


class KeptBefore(Capture):
    """An output of a job from before a restart, written by the keeper of then (``pid``), which
    ends once it has written every output it holds."""

    def __init__(self, path, pid):
        super().__init__(path)
        self.pid = pid

    def done(self):
        return not is_alive(self.pid, '')

    def wait(self, timeout):
        return wait_for_pid(self.pid, '', timeout=timeout)


class FileComing(Capture):
    """An output of a job from before a restart whose keeper is not known: the file comes, or
    not at all when that keeper died too, so it is waited for ``PATIENCE`` seconds at most."""

    PATIENCE = 5

    def done(self):
        return os.path.exists(self.path)

    def wait(self, timeout):
        deadline = time.monotonic() + min(timeout, self.PATIENCE)
        while not self.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.done()


class Outputs:
    """Where jobs' outputs go, and who keeps them: the keeper where it can run, else a capture
    process per job.  Chosen once."""

    def __init__(self, directory, limit, logger):
        self.directory = directory
        self.limit = limit
        self.logger = logger
        os.makedirs(directory, exist_ok=True)
        self.keeper = OutputKeeper(limit, logger) if OutputKeeper.available() else None

    def path(self, jobnumber):
        return os.path.join(self.directory, '%d.out' % jobnumber)

    def capture(self, read_fd, path, jobnumber):
        """Have the output of the pipe ``read_fd`` kept at ``path`` (before the job starts);
        ``read_fd`` is the capture's now.  Its Capture."""
        if self.keeper is not None:
            return self.keeper.keep(read_fd, path)
        try:
            try:
                output_file = open(path, 'wb')
            except OSError as exc:
                self.logger.warning('The output of job %s cannot be kept: %s', jobnumber, exc)
                output_file = subprocess.DEVNULL
            try:
                process = subprocess.Popen([sys.executable, '-I', '-S', CAPTURE_SCRIPT, str(self.limit)],
                                           stdin=read_fd, stdout=output_file, stderr=subprocess.DEVNULL,
                                           close_fds=True, start_new_session=True)
            finally:
                if output_file is not subprocess.DEVNULL:
                    output_file.close()
        finally:
            os.close(read_fd)
        return CaptureProcess(path, process)

    def from_before(self, stored):
        """The capture of a job stored as running before a restart."""
        path = stored.output or self.path(stored.jobnumber)
        return KeptBefore(path, stored.relay_pid) if stored.relay_pid else FileComing(path)

    def recover(self, store):
        """Store the outputs of jobs recorded as finished just before the server died, before
        their output was collected (their files are still here).  Returns their numbers."""
        found = {}
        for name in os.listdir(self.directory):
            number, dot, extension = name.partition('.')
            if number.isdigit() and extension in ('out', 'out' + LIVE):
                found.setdefault(int(number), os.path.join(self.directory, number + '.out'))
        recovered = store.without_output(found)
        for jobnumber in recovered:
            path = found[jobnumber]
            output = read_output(path) if os.path.exists(path) else read_output(path + LIVE)
            patiently(store.set_output, jobnumber, output or '[no output was kept: the server stopped at its end]')
            remove_output(path)
        return recovered

    def close(self):
        if self.keeper is not None:
            self.keeper.close()


class OutputKeeper:
    """The capture process (``capture.py --serve``) that keeps the end of every job's output.

    One process for all jobs: starting one beside each job would cost every dispatch time.
    The server keeps its own read end of each running job's pipe until the job ends: should
    the keeper die, a new one gets every pipe again, and no job ever meets a pipe without a
    reader (a broken pipe would kill it).
    """

    def __init__(self, limit, logger):
        self.limit = limit
        self.logger = logger
        self._lock = threading.Lock()
        self._done = {}              # output file -> its Kept capture, until the keeper has written it
        self._open = {}              # output file -> the server's read end of the job's pipe
        self._socket = None
        self._closing = False
        self.process = None
        self._start()

    @staticmethod
    def available():
        return hasattr(socket, 'send_fds') and hasattr(socket, 'AF_UNIX')

    def _start(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, '-I', '-S', CAPTURE_SCRIPT, '--serve', str(theirs.fileno()), str(self.limit)],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self._socket = ours
        threading.Thread(target=self._listen, args=(ours,), name='output-keeper', daemon=True).start()

    def keep(self, read_fd, path):
        """Hand a job's output pipe to the keeper (``read_fd`` is the keeper's now: see ``release``);
        return its ``Kept`` capture, done once ``path`` is written."""
        done = Kept(path, self)
        with self._lock:
            self._done[path] = done
            self._open[path] = read_fd
            try:
                self._send(path, read_fd)
            except OSError:
                self._replace()
        return done

    def release(self, path):
        """The job of ``path`` has ended: the server's read end of its pipe is closed."""
        with self._lock:
            read_fd = self._open.pop(path, None)
        if read_fd is not None:
            os.close(read_fd)

    def _send(self, path, read_fd, taken_over=False):
        socket.send_fds(self._socket, [(b'+' if taken_over else b'') + path.encode('utf-8', 'surrogateescape')],
                        [read_fd])

    def _replace(self):
        """(With the lock held.)  The keeper is gone: a new one gets the pipes of all running jobs
        at once (what the old one had read is lost but for its last snapshot, and the kept output
        says so); the outputs of jobs that had ended and were not written yet are lost, and said
        to be, so that nobody waits for them."""
        self.logger.warning('The output keeper (pid %s) is gone; starting a new one.', self.process.pid)
        self.process.poll()
        self._socket.close()
        self._start()
        for path, read_fd in self._open.items():
            self._send(path, read_fd, taken_over=True)
        for path in [path for path in self._done if path not in self._open]:
            self._done.pop(path).finish(None if os.path.exists(path) else LOST)

    def _listen(self, sock):
        while True:
            try:
                message = sock.recv(4096)
            except OSError:
                message = b''
            if not message:
                with self._lock:
                    if sock is self._socket and not self._closing:
                        self._replace()
                return
            error = None
            if message.startswith(b'!'):           # the file could not be written: why, then which
                error, _, message = message[1:].partition(b'\0')
                error = error.decode('utf-8', 'replace')
            with self._lock:
                done = self._done.pop(message.decode('utf-8', 'surrogateescape'), None)
            if done is not None:
                done.finish(error)

    def close(self):
        """No more outputs: the keeper writes what it holds and ends."""
        with self._lock:
            self._closing = True
            self._socket.close()


def read_tail(path, size):
    """The last ``size`` bytes of the file ``path`` as text; '' when there is none."""
    try:
        with open(path, 'rb') as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return printable(handle.read().decode('utf-8', 'replace'))
    except OSError:
        return ''


def read_output(path):
    if not path:
        return ''
    try:
        with open(path, 'rb') as handle:
            return printable(handle.read().decode('utf-8', 'replace'))
    except OSError:
        return ''


def remove_output(path):
    """Remove a job's output file and its snapshot."""
    for leftover in (path, path + LIVE):
        try:
            os.remove(leftover)
        except OSError:
            pass
