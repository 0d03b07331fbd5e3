"""Runners: take the next job from the queue, start it, watch it, record how it ended.

Each runner is a thread that blocks in ``JobQueue.take()`` and starts the job
the moment it gets one, without a shell, with stdin from the null device, in
a session of its own (so a kill reaches the job's children, and a job outlives
a server that dies).  Its output goes through a pipe to the output keeper
(``capture.py``), one process for all jobs; the keeper holds the pipe before
the job is started, so a job never writes into a pipe only the server reads.

Each job also holds a lock file from the moment it is forked (``RunLocks``):
after a crash at any instant of a start, the restarted server sees whether
the job runs, and waits for it rather than start a second copy.
"""
import datetime
import heapq
import itertools
import logging
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

from .botslog import printable
from .jobqueue import Job, canonical_task
from .store import StoreBusy, patiently

LIVE = '.live'          # beside a running job's output file: what it printed so far (see capture.py)
LOST = 'lost'           # the error of an output whose keeper died before it wrote the file
CAPTURE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'capture.py')

# Test hook: the fault tests set this to kill the server at a chosen instant of a start.
KILL_AT = os.environ.get('BOTS_JOBQUEUE_TEST_KILL_AT', '')

ENGINE_OK, ENGINE_SYSTEM_ERROR, ENGINE_PROCESS_ERRORS, ENGINE_DATABASE_LOCKED = 0, 1, 2, 3
# Exit codes of a job ended by the shutdown signal itself (a Ctrl-C reaches a job still being spawned).
SHUTDOWN_EXITCODES = (-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT)


class LaunchSettings:
    """What the runners need from bots.ini."""

    def __init__(self, environment):
        ini = environment.ini
        self.nr_threads = max(1, ini.getint('jobqueue', 'nr_threads', 1))
        self.maxruntime = ini.getfloat('settings', 'maxruntime', 60)
        self.killjobsintimeout = ini.getboolean('jobqueue', 'killjobsintimeout', False)
        self.kill_grace = ini.getfloat('jobqueue', 'kill_grace', 10)
        self.output_limit = max(1024, ini.getint('jobqueue', 'output_limit', 65536))
        self.locked_retry_delay = ini.getfloat('jobqueue', 'locked_retry_delay', 60)
        self.locked_report_after = ini.getint('jobqueue', 'locked_report_after', 3)
        self.outputdir = os.path.join(environment.botssys, 'jobqueue', 'output')
        self.lockdir = os.path.join(environment.botssys, 'jobqueue', 'running')


def _proc_stat(pid):
    """The fields of /proc/<pid>/stat after the command name (Linux), or None."""
    try:
        with open('/proc/%d/stat' % pid, 'rb') as handle:
            return handle.read().rsplit(b')', 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_time(pid):
    """The start time of process ``pid`` as the kernel tells it (Linux), or '' if unknown."""
    fields = _proc_stat(pid)
    return fields[19].decode() if fields else ''


def is_alive(pid, start_time):
    """True if ``pid`` still runs and is the same process (not a zombie, not a reused pid)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return not os.path.isdir('/proc')     # no /proc: trust the kill test
    if fields[0] in (b'Z', b'X'):
        return False
    return not start_time or fields[19].decode() == start_time


def wait_for_pid(pid, start_time, timeout=None):
    """Block until process ``pid`` (not our child) has ended; False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pidfd = None
    if hasattr(os, 'pidfd_open'):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None
    try:
        if pidfd is not None and is_alive(pid, start_time):
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while is_alive(pid, start_time):
                remaining = None if deadline is None else max(0, deadline - time.monotonic())
                # A zombie (ended, not reaped by its parent) keeps the pidfd unreadable: re-check each second.
                wait_ms = 1000 if remaining is None else min(1000, int(remaining * 1000))
                poller.poll(wait_ms)
                if deadline is not None and time.monotonic() >= deadline:
                    return not is_alive(pid, start_time)
            return True
        while is_alive(pid, start_time):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def elapsed(seconds):
    return str(datetime.timedelta(seconds=max(0, int(round(seconds)))))


def signal_group(pid, signum):
    """Send ``signum`` to a job's whole process group (to the process only where there are none)."""
    if not pid:
        return
    try:
        if hasattr(os, 'killpg'):
            os.killpg(pid, signum)
        else:
            os.kill(pid, signal.SIGTERM)       # Windows: TerminateProcess
    except (ProcessLookupError, PermissionError, OSError):
        pass


class RunLocks:
    """A lock file for each running job, held by the job's own process (POSIX ``flock``).

    Before a runner starts a job it locks its file ``runner-<n>.lock`` and hands the locked file
    to the job: the lock lasts while the job (or a child that kept the file) runs, whoever else
    dies, and is gone the moment the job is.  So a restarted server knows, for a job stored as
    running by runner n, whether it runs - even when the server died between the fork and
    storing the job's pid.  The runners' files exist from the start (creating a file per job
    would cost every dispatch time); should a process of an earlier job still hold a runner's
    file, the job gets a file of its own, ``job-<jobnumber>.lock``.
    """

    def __init__(self, directory, runners):
        import fcntl
        self._fcntl = fcntl
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        for runner in range(1, runners + 1):
            os.close(os.open(self._runner_path(runner), os.O_RDWR | os.O_CREAT, 0o600))

    @staticmethod
    def available():
        try:
            import fcntl  # noqa: F401
        except ImportError:
            return False
        return True

    def _runner_path(self, runner):
        return os.path.join(self.directory, 'runner-%d.lock' % runner)

    def _job_path(self, jobnumber):
        return os.path.join(self.directory, 'job-%d.lock' % jobnumber)

    def take_runner(self, runner):
        """The runner's file, locked (a non-inheritable descriptor to pass to its next job); None
        while a process of an earlier job still holds it."""
        return self._take(self._runner_path(runner))

    def take_job(self, jobnumber):
        """The job's own file, locked: for a job whose runner's file is held."""
        fd = self._take(self._job_path(jobnumber))
        if fd is None:
            raise OSError('the lock file of job %d is held by another process' % jobnumber)
        return fd

    def _take(self, path, create=True):
        """``path`` opened and locked; None when another process holds its lock."""
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        try:
            self._fcntl.flock(fd, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _path(self, stored):
        """The lock file of a job stored as running, or None when it has none."""
        own = self._job_path(stored.jobnumber)
        if os.path.exists(own):
            return own
        return self._runner_path(stored.runner) if stored.runner else None

    def runs(self, stored):
        """True while a process holds the job's lock, False when none does; None without a lock file."""
        path = self._path(stored)
        if path is None:
            return None
        try:
            fd = self._take(path, create=False)
        except FileNotFoundError:
            return None
        if fd is None:
            return True
        os.close(fd)
        return False

    def wait(self, stored):
        """Block until no process holds the job's lock."""
        try:
            fd = os.open(self._path(stored), os.O_RDWR)
        except (OSError, TypeError):
            return
        try:
            self._fcntl.flock(fd, self._fcntl.LOCK_EX)
            self._fcntl.flock(fd, self._fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self, stored):
        """The pid of the job that holds the lock (Linux: the session leader among the processes
        that have the file open), or None."""
        try:
            wanted = os.stat(self._path(stored))
            pids = [int(name) for name in os.listdir('/proc') if name.isdigit()]
        except (OSError, TypeError):
            return None
        holders = []
        for pid in pids:
            try:
                fds = os.listdir('/proc/%d/fd' % pid)
            except OSError:
                continue
            for fd in fds:
                try:
                    found = os.stat('/proc/%d/fd/%s' % (pid, fd))
                except OSError:
                    continue
                if (found.st_dev, found.st_ino) == (wanted.st_dev, wanted.st_ino):
                    holders.append(pid)
                    break
        for pid in holders:
            fields = _proc_stat(pid)
            if fields is not None and fields[3] == str(pid).encode():
                return pid
        return holders[0] if holders else None

    def remove(self, jobnumber):
        """Remove the job's own lock file, if it had one."""
        try:
            os.remove(self._job_path(jobnumber))
        except OSError:
            pass


class StoreTrouble:
    """A runner whose store fails (a full disk, say) waits and tries again - 1 second, doubling
    up to a minute - rather than stop the queue; logged and reported once.  A store that another
    process holds locked is tried again every 0.1 s, so the queue goes on the moment it is free;
    reported only when that lasts a minute."""

    def __init__(self, logger, reporter):
        self.logger = logger
        self.reporter = reporter
        self.pause = 0
        self.busy_since = None

    def failed(self, exc):
        if isinstance(exc, StoreBusy):
            now = time.monotonic()
            if self.busy_since is None:
                self.busy_since = now
                self.logger.warning('The job store is locked by another process (%s); the queue waits for it.', exc)
            elif now - self.busy_since >= 60 and not self.pause:
                self.pause = 0.1
                self.reporter.report('[Bots Job Queue] - Job store locked',
                                     'Another process has held the job store locked for a minute: no job starts '
                                     'until it lets go.')
            time.sleep(0.1)
            return
        if not self.pause:
            self.logger.error('The job store fails (%s); the queue waits and tries again.', exc)
            self.reporter.report('[Bots Job Queue] - Job store fails',
                                 'The job queue cannot write its store: %s\nNo job starts until it can; '
                                 'it tries again every minute at most.' % exc)
        self.pause = min(60, max(1, self.pause * 2))
        time.sleep(self.pause)

    def recovered(self):
        if self.pause or self.busy_since is not None:
            self.logger.log(25, 'The job store works again; the queue goes on.')
            self.pause = 0
            self.busy_since = None


class Deadlines:
    """Calls a function when its deadline passes, from one thread for all jobs.

    A job's maxruntime and kill timers go here rather than in a thread each: starting and
    cancelling a thread per job would cost every dispatch time.  Cancelled deadlines are
    skipped when they come up.
    """

    def __init__(self):
        self._heap = []
        self._changed = threading.Condition()
        self._sequence = itertools.count()
        self._thread = None

    def add(self, seconds, function, *args):
        """Call ``function(*args)`` in ``seconds``; return a handle for ``cancel``."""
        entry = [time.monotonic() + seconds, next(self._sequence), function, args, True]
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name='deadlines', daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._changed.notify()
        return entry

    @staticmethod
    def cancel(entry):
        entry[4] = False

    def _loop(self):
        while True:
            with self._changed:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._changed.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                entry = heapq.heappop(self._heap)
            if entry[4]:
                entry[2](*entry[3])


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
        self._done = {}              # output file -> Event, set when the keeper has written it
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
        return an Event that is set once ``path`` is written."""
        done = threading.Event()
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
            done = self._done.pop(path)
            done.error = None if os.path.exists(path) else LOST
            done.set()

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
                done.error = error
                done.set()

    def close(self):
        """No more outputs: the keeper writes what it holds and ends."""
        with self._lock:
            self._closing = True
            self._socket.close()


class RunningJob:
    """A job that runs now: its process, output file and deadlines."""

    def __init__(self, job, pid, started, output):
        self.job = job
        self.pid = pid
        self.started = started
        self.output = output
        self.timed_out = False
        self.stopped_by_shutdown = False
        self.timers = []
        self.command = list(job.task)      # what was started for it (the configured paths)
        # Durations come from the monotonic clock: a wall clock stepped meanwhile changes none.
        self._since = time.monotonic() - max(0.0, time.time() - started)

    def duration(self):
        return time.monotonic() - self._since

    def ended(self):
        """When it ended, as wall time: its start plus how long it ran."""
        return self.started + self.duration()

    def as_dict(self):
        return {'jobnumber': self.job.jobnumber, 'priority': self.job.priority,
                'task': list(self.job.task), 'pid': self.pid, 'started': self.started,
                'running_for': self.duration()}


class Ended:
    """A job that has ended, until its log line, history record and output are done."""

    def __init__(self, job, started, ended, exitcode, output_file, relay):
        self.job = job
        self.started = started
        self.ended = ended
        self.exitcode = exitcode
        self.output_file = output_file
        self.relay = relay             # the keeper's Event, a capture Popen, or a keeper pid from before a restart
        self.leaves_queue = False      # False: it was put back in the queue
        self.status = None
        self.logged = False
        self.level = None              # of its 'Finished' line, when not the one of its exit code
        self.attempt = None            # its stored attempt, when it was queued again (exit code 3)
        self.stopped = False           # stopped by the shutdown: kept for the next start

    def as_dict(self):
        record = {'state': 'finished', 'jobnumber': self.job.jobnumber, 'priority': self.job.priority,
                  'task': list(self.job.task), 'started': self.started, 'ended': self.ended}
        if self.exitcode is not None:
            record['exitcode'] = self.exitcode
        if self.status:
            record['status'] = self.status
        return record


class Launcher:
    """Runs jobs from the queue, ``nr_threads`` at a time."""

    def __init__(self, queue, store, authorizer, settings, logger, reporter):
        self.queue = queue
        self.store = store
        self.authorizer = authorizer
        self.settings = settings
        self.logger = logger
        self.reporter = reporter
        self.running = {}              # jobnumber -> RunningJob, started here or adopted
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)      # notified when a job leaves ``running``
        self._threads = []
        self._stopping = False
        self.on_idle = None            # called (from any thread) when the last running job has ended
        self.metrics = None            # counts finished jobs, when the server has metrics
        self._between = {}             # jobnumber -> what showjob tells of a job being started or recorded
        self._deadlines = Deadlines()
        os.makedirs(settings.outputdir, exist_ok=True)
        self._locks = RunLocks(settings.lockdir, settings.nr_threads) if RunLocks.available() else None
        # Where file descriptors cannot be passed, a capture process runs beside each job.
        self._keeper = OutputKeeper(settings.output_limit, logger) if OutputKeeper.available() else None

    # ---- life cycle
    def start(self):
        for number in range(self.settings.nr_threads):
            thread = threading.Thread(target=self._run_loop, args=(number + 1,), name='runner-%d' % (number + 1),
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self):
        """Start no more jobs (the first step of a shutdown)."""
        self._stopping = True
        self.queue.close()

    def output_tail(self, jobnumber, size):
        """The end of a running job's output so far (the keeper writes it about once a second)."""
        with self._lock:
            running = self.running.get(jobnumber)
        return read_tail(running.output + LIVE, size) if running is not None and running.output else ''

    def runners_alive(self):
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def running_numbers(self):
        with self._lock:
            return sorted(self.running)

    def stop_running(self):
        """Stop the jobs that still run (SIGTERM, SIGKILL after ``kill_grace``) and keep them in the
        queue for the next start; then let the runners and the output keeper end."""
        self.close()
        left = self._running_after(0)
        for running in left:
            self.logger.warning('Stopping job %s: the server shuts down; it will run again at the next start.',
                                running.job.jobnumber)
            running.stopped_by_shutdown = True
            signal_group(running.pid, signal.SIGTERM)
        for running in self._running_after(self.settings.kill_grace, wait=bool(left)):
            signal_group(running.pid, getattr(signal, 'SIGKILL', signal.SIGTERM))
        deadline = time.monotonic() + 5
        for thread in self._threads:
            thread.join(max(0, deadline - time.monotonic()))
        if self._keeper is not None:
            self._keeper.close()

    def _running_after(self, seconds, wait=False):
        """The running jobs (all of them at once; with ``wait``, those still running after ``seconds``)."""
        deadline = time.monotonic() + seconds
        with self._idle:
            while wait and self.running and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
            return list(self.running.values())

    def _output_path(self, jobnumber):
        return os.path.join(self.settings.outputdir, '%d.out' % jobnumber)

    def _forget(self, jobnumber):
        """The job no longer runs: out of ``running`` (its lock file goes with its output)."""
        with self._idle:
            del self.running[jobnumber]
            self._idle.notify_all()
            idle = not self.running
        if idle and self.on_idle is not None:
            self.on_idle()

    def status(self):
        with self._lock:
            return [running.as_dict() for running in self.running.values()]

    # ---- one runner
    def _run_loop(self, runner):
        """Take a job, start it, then do the bookkeeping of the previous one, wait for the end.

        Between two jobs only what the next start needs happens: the store marks the next job
        running and drops the ended one in one commit.  The log lines and the output of the
        ended job (a file read, a database write) follow once the next job runs, or once there
        is none.
        """
        ended = []          # Ended jobs whose log line or output is still to come
        done = None         # the job that just ended, still stored as running
        trouble = StoreTrouble(self.logger, self.reporter)
        lock = None         # the runner's lock file, taken before the job is (see RunLocks)
        while True:
            if lock is None and self._locks is not None:
                lock = self._locks.take_runner(runner)
            try:
                job = self.queue.take(block=not ended, done=done, runner=runner)
            except (sqlite3.Error, OSError, StoreBusy) as exc:
                trouble.failed(exc)       # waits a while; the job is still first in the queue
                continue
            trouble.recovered()
            done = None
            if job is None:
                if not ended:
                    if lock is not None:
                        os.close(lock)
                    return                         # the queue is closed
                self._log_ends(ended)
                self._collect_outputs(ended, wait=True)
                continue
            try:
                held, lock = lock, None            # the job's now (closed by _start in any case)
                self._between[job.jobnumber] = {'state': 'starting', 'jobnumber': job.jobnumber,
                                                'priority': job.priority, 'task': list(job.task)}
                try:
                    started = self._start(job, held)
                finally:
                    self._between.pop(job.jobnumber, None)
                self._log_ends(ended)
                if started:
                    command = started[2].command
                    self.logger.info('Starting job %s: %s%s', job.jobnumber, list(job.task),
                                     '' if command[0] == job.task[0] else ' (runs %s)' % command[0])
                self._collect_outputs(ended, wait=False)
                if started:
                    end = self._wait(job, *started)
                    ended.append(end)
                    if end.leaves_queue:
                        done = end
                        self._between[job.jobnumber] = end.as_dict()
            except Exception:        # a bug here must not stop the queue; it is logged in full
                self.logger.exception('Unexpected error while running job %s', job.jobnumber)

    def _start(self, job, lock):
        """Start a job and its capture process; ``(process, relay, running)``, or None."""
        settings = self.settings
        command = self.authorizer.command(job.task)
        output = self._output_path(job.jobnumber)
        started = time.time()
        if command is None:
            if lock is not None:
                os.close(lock)
            self._cannot_start(job, started, 'not an authorized task any more (checked again at its start): %s'
                               % ' '.join(job.task[:2]))
            return None
        read_end, write_end = os.pipe()
        try:
            if self._keeper is not None:
                # The keeper reads the pipe before the job can write to it: should the server die
                # at any instant from here on, the job never meets a pipe without a reader.
                relay, relay_pid = self._keeper.keep(read_end, output), self._keeper.process.pid
            if lock is None and self._locks is not None:
                lock = self._locks.take_job(job.jobnumber)
            try:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                           stdout=write_end, stderr=write_end, close_fds=True,
                                           pass_fds=() if lock is None else (lock,), start_new_session=True)
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                if self._locks is not None:
                    self._locks.remove(job.jobnumber)
                if self._keeper is not None:
                    self._keeper.release(output)
                self._cannot_start(job, started, str(exc))
                return None
            if KILL_AT == 'spawned':
                os.kill(os.getpid(), signal.SIGKILL)
            os.close(write_end)
            write_end = None
            if self._keeper is None:
                try:
                    output_file = open(output, 'wb')
                except OSError as exc:
                    self.logger.warning('The output of job %s cannot be kept: %s', job.jobnumber, exc)
                    output_file = subprocess.DEVNULL
                try:
                    relay = subprocess.Popen([sys.executable, '-I', '-S', CAPTURE_SCRIPT, str(settings.output_limit)],
                                             stdin=read_end, stdout=output_file, stderr=subprocess.DEVNULL,
                                             close_fds=True, start_new_session=True)
                finally:
                    if output_file is not subprocess.DEVNULL:
                        output_file.close()
                relay_pid = relay.pid
        finally:
            for fd in (write_end, lock) if self._keeper is not None else (read_end, write_end, lock):
                if fd is not None:
                    os.close(fd)
        running = RunningJob(job, process.pid, started, output)
        running.command = command
        with self._lock:
            self.running[job.jobnumber] = running
        try:
            patiently(self.store.set_process, job.jobnumber, process.pid, process_start_time(process.pid), relay_pid,
                      output, patience=30)
        except (sqlite3.Error, OSError, StoreBusy) as exc:
            # The job is supervised all the same; after a crash its lock file tells that it runs.
            self.logger.error('Job %s (pid %s) runs, but its pid could not be stored: %s',
                              job.jobnumber, process.pid, exc)
        if settings.maxruntime > 0:
            running.timers.append(self._deadlines.add(settings.maxruntime * 60, self._maxruntime_exceeded, running))
        return process, relay, running

    def _wait(self, job, process, relay, running):
        """Wait for the job's end; return what is needed to collect its output."""
        exitcode = process.wait()
        if self._keeper is not None:
            self._keeper.release(running.output)
        for timer in running.timers:
            self._deadlines.cancel(timer)
        self._forget(job.jobnumber)
        return self._finished(job, running.started, running.ended(), exitcode, running, relay)

    def still_runs(self, stored):
        """True when a job stored as running (before a restart) still runs."""
        if self._locks is not None:
            runs = self._locks.runs(stored)
            if runs is not None:
                return runs
        # No lock file: the server died before it forked the job, or the job is older than locks.
        return bool(stored.pid) and is_alive(stored.pid, stored.pid_start)

    def adopt(self, stored):
        """Supervise a job that was started before a restart and still runs, like one started here
        (status, maxruntime, shutdown); hold the queue until it ends."""
        self.queue.hold()
        pid = stored.pid
        if not pid and self._locks is not None:
            # The server died before it stored the pid: the job is the process holding its lock.
            pid = self._locks.holder(stored)
            if pid:
                patiently(self.store.set_process, stored.jobnumber, pid, process_start_time(pid), None, stored.output)
        job = Job(stored.jobnumber, stored.priority, canonical_task(stored.task), stored.requeued, stored.locked)
        output = stored.output or self._output_path(stored.jobnumber)
        running = RunningJob(job, pid, stored.started or time.time(), output)
        with self._lock:
            self.running[job.jobnumber] = running
        if self.settings.maxruntime > 0:
            remaining = running.started + self.settings.maxruntime * 60 - time.time()
            running.timers.append(self._deadlines.add(max(0, remaining), self._maxruntime_exceeded, running))
        thread = threading.Thread(target=self._adopted, args=(stored, running), name='adopted-%d' % job.jobnumber,
                                  daemon=True)
        self._threads.append(thread)
        thread.start()

    def _adopted(self, stored, running):
        job = running.job
        try:
            self.logger.warning('Job %s (pid %s) still runs from before the restart; no job starts until it ends.',
                                job.jobnumber, running.pid or 'unknown')
            if self._locks is not None and self._locks.runs(stored) is not None:
                self._locks.wait(stored)
            else:
                wait_for_pid(running.pid, stored.pid_start)
            for timer in running.timers:
                self._deadlines.cancel(timer)
            self._forget(job.jobnumber)
            # The exit code of a process that is not our child cannot be known.
            end = self._finished(job, running.started, running.ended(), None, running, stored.relay_pid)
            if end.leaves_queue:
                patiently(self.store.finish_ended, end)
            self._log_ends([end])
            self._collect_outputs([end], wait=True)
        finally:
            self.queue.release()

    # ---- what happens after a job
    def _cannot_start(self, job, started, reason):
        self.logger.error('Error starting job %s: %s\n    task: %s', job.jobnumber, reason, list(job.task))
        self.reporter.report('[Bots Job Queue] - Error starting job',
                             'Error starting job %s:\n    %s\n\n%s' % (job.jobnumber, list(job.task), reason))
        patiently(self.store.finish, job, started, time.time(), None, 'cannot start', reason)
        if self.metrics is not None:
            self.metrics.job_finished(None, 'cannot start', None)

    def _maxruntime_exceeded(self, running):
        running.timed_out = True
        job = running.job
        self.logger.error('Job %s exceeded maxruntime of %s minutes%s', job.jobnumber, self.settings.maxruntime,
                          '; it is stopped.' if self.settings.killjobsintimeout else '.')
        self.reporter.report('[Bots Job Queue] - Job exceeded maximum runtime',
                             'Job %s exceeded maxruntime of %s minutes:\n    %s%s'
                             % (job.jobnumber, self.settings.maxruntime, list(job.task),
                                '\n\nThe job is stopped (killjobsintimeout = True).'
                                if self.settings.killjobsintimeout else ''))
        if self.settings.killjobsintimeout:
            signal_group(running.pid, signal.SIGTERM)
            running.timers.append(self._deadlines.add(self.settings.kill_grace, signal_group, running.pid,
                                                      getattr(signal, 'SIGKILL', signal.SIGTERM)))

    def _finished(self, job, started, ended, exitcode, running, relay):
        """Decide what a job's end means for the queue; return it as an Ended.

        A job put back in the queue is logged at once; an ordinary end is logged, and leaves
        the store, with the start of the next job (see ``_run_loop``).
        """
        end = Ended(job, started, ended, exitcode, running.output, relay)
        if running.stopped_by_shutdown or (self._stopping and exitcode in SHUTDOWN_EXITCODES):
            end.stopped = True
            self._log_ends([end])
            job.requeued += 1
            self.queue.wait_again(job)
        elif exitcode == ENGINE_DATABASE_LOCKED and self.authorizer.is_engine(job.task):
            end.level = logging.WARNING        # not lost: it runs again
            self._log_ends([end])
            job.locked += 1
            self.logger.warning('Job %s: the engine database is locked by another run; queued again in %s seconds.',
                                job.jobnumber, self.settings.locked_retry_delay)
            try:
                end.attempt = patiently(self.store.add_attempt, job.jobnumber, end.started, end.ended, exitcode,
                                        patience=30)
            except (sqlite3.Error, OSError, StoreBusy) as exc:      # a lost note of an attempt stops nothing
                self.logger.error('The run of job %s could not be kept in the history: %s', job.jobnumber, exc)
            if job.locked == self.settings.locked_report_after:
                self.reporter.report('[Bots Job Queue] - Engine database stays locked',
                                     'Job %s ended %d times in a row with "database locked" (exit code 3):\n'
                                     '    %s\nIs a bots-engine running outside the job queue?'
                                     % (job.jobnumber, job.locked, list(job.task)))
            self.queue.wait_again(job, self.settings.locked_retry_delay)
        else:
            end.leaves_queue = True
            if exitcode is None:
                end.status = 'ended'
            elif running.timed_out:
                end.status = 'timed out'
            else:
                end.status = 'ok' if exitcode == 0 else 'failed'
        return end

    def _log_ends(self, ends):
        for end in ends:
            if not end.logged:
                end.logged = True
                exitcode = end.exitcode
                if end.stopped:
                    self.logger.warning('Stopped job %s at the shutdown after %s (exit code %s); it is kept and '
                                        'runs again at the next start.', end.job.jobnumber,
                                        elapsed(end.ended - end.started), exitcode)
                    continue
                if exitcode is None:
                    # A job adopted after a restart: not our child, so its exit code is not ours to know.
                    self.logger.info('Finished job %s, elapsed time %s; it ran on from before the restart, '
                                     'so its exit code cannot be known.',
                                     end.job.jobnumber, elapsed(end.ended - end.started))
                    continue
                self.logger.log(end.level or logging_level(exitcode), 'Finished job %s, elapsed time %s, exit code %s',
                                end.job.jobnumber, elapsed(end.ended - end.started), exitcode)

    def _collect_outputs(self, ends, wait):
        """Collect the outputs whose capture process is done; with ``wait`` all of them.

        Without ``wait`` (a job runs) a capture held open by a child the job left behind is
        not waited for, so it cannot delay noticing the running job's end; a long backlog is.
        """
        for end in list(ends):
            if wait or len(ends) > 50 or _capture_done(end.relay):
                ends.remove(end)
                try:
                    self._collect_output(end)
                except Exception:        # a bug here must not stop the queue; it is logged in full
                    self.logger.exception('Unexpected error while collecting the output of job %s',
                                          end.job.jobnumber)

    def _collect_output(self, end):
        """Log and keep the output once the capture process is done."""
        # The capture process ends when every holder of the job's output has closed it; a
        # child the job left running may hold it longer: keep what is there by then.
        if isinstance(end.relay, threading.Event):
            end.relay.wait(10)
        elif isinstance(end.relay, subprocess.Popen):
            try:
                end.relay.wait(10)
            except subprocess.TimeoutExpired:
                pass
        elif end.relay:
            # A keeper from before a restart: it ends once the outputs it holds are written.
            wait_for_pid(end.relay, '', timeout=10)
        elif end.output_file:
            # A keeper from before a restart that died before it could say which: the file comes.
            deadline = time.monotonic() + 5
            while not os.path.exists(end.output_file) and time.monotonic() < deadline:
                time.sleep(0.05)
        job, exitcode = end.job, end.exitcode
        output = read_output(end.output_file)
        error = getattr(end.relay, 'error', None)
        if error == LOST:
            self.logger.warning('The output of job %s was lost: the output keeper stopped before it was written.',
                                job.jobnumber)
            output = read_output(end.output_file + LIVE)
            output += '\n[... the output keeper stopped before it wrote this output: only its last snapshot is kept ...]\n' \
                if output else '[the output keeper stopped before it wrote this output: it is lost]'
        elif error:
            self.logger.warning('The output of job %s could not be kept: %s', job.jobnumber, error)
            output = '[the output could not be kept: %s]' % error
        if output:
            # Each line carries its job's number, so that outputs stay apart in a search of the log.
            prefix = '%s| ' % job.jobnumber
            self.logger.info('Output of job %s:\n%s%s', job.jobnumber, prefix,
                             output.rstrip('\n').replace('\n', '\n' + prefix))
        if end.attempt is not None:           # a run queued again keeps its output like any run
            patiently(self.store.set_attempt_output, end.attempt, output)
        if end.leaves_queue:
            patiently(self.store.set_output, job.jobnumber, output)     # its record was written at its end
            if self.metrics is not None:
                self.metrics.job_finished(exitcode, end.status, end.ended - end.started)
            if exitcode == ENGINE_SYSTEM_ERROR or (exitcode is not None and exitcode < 0):
                self.reporter.report('[Bots Job Queue] - Job ended with errors',
                                     'Job %s ended with exit code %s after %s:\n    %s\n\nOutput:\n%s'
                                     % (job.jobnumber, exitcode, elapsed(end.ended - end.started), list(job.task),
                                        output))
        if end.output_file:
            for leftover in (end.output_file, end.output_file + LIVE):
                try:
                    os.remove(leftover)
                except OSError:
                    pass
        if self._locks is not None:
            self._locks.remove(job.jobnumber)
        self._between.pop(job.jobnumber, None)

    def recover_outputs(self):
        """Keep the outputs of jobs that were recorded as finished just before the server died,
        before their output was collected (their files are still there).  Returns their numbers."""
        found = {}
        for name in os.listdir(self.settings.outputdir):
            number, dot, extension = name.partition('.')
            if number.isdigit() and extension in ('out', 'out' + LIVE):
                found.setdefault(int(number), os.path.join(self.settings.outputdir, number + '.out'))
        recovered = self.store.without_output(found)
        for jobnumber in recovered:
            path = found[jobnumber]
            output = read_output(path) if os.path.exists(path) else read_output(path + LIVE)
            patiently(self.store.set_output, jobnumber, output or '[no output was kept: the server stopped at its end]')
            for leftover in (path, path + LIVE):
                try:
                    os.remove(leftover)
                except OSError:
                    pass
        return recovered

    def between(self, jobnumber):
        """A job that is neither waiting, running nor in the history at this instant - being
        started, or ended and not yet recorded - as showjob tells it; else None."""
        return self._between.get(jobnumber)


def _capture_done(relay):
    if isinstance(relay, threading.Event):
        return relay.is_set()
    if isinstance(relay, subprocess.Popen):
        return relay.poll() is not None
    return not is_alive(relay, '')


def logging_level(exitcode):
    if exitcode == 0:
        return logging.INFO
    if exitcode == ENGINE_PROCESS_ERRORS:
        return logging.WARNING
    return logging.ERROR


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
