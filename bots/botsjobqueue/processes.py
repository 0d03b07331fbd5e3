"""Processes: is a job still running, wait for its end, signal it, and the lock file it holds.

Jobs run in sessions of their own and may outlive the server, so a restarted
server asks the operating system, not its memory: ``is_alive`` (pid plus the
kernel's start time, so a reused pid is not mistaken for the job),
``wait_for_pid`` for a process that is not our child, and the run locks.

The lock files need POSIX ``flock``; ``run_locks()`` chooses once, at start,
between ``RunLocks`` and ``NoLocks`` (Windows), so no caller tests for it.
A running job is watched through one of two handles with the same
``pid``/``wait()``: ``Child`` (started here) or ``Orphan`` (from before a
restart; its exit code cannot be known).
"""
import os
import select
import signal
import time

KILL = getattr(signal, 'SIGKILL', signal.SIGTERM)      # Windows: TerminateProcess either way


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


def signal_group(pid, signum):
    """Send ``signum`` to a job's whole process group (to the process only where there are none)."""
    if not pid:
        return
    try:
        if hasattr(os, 'killpg'):
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)               # Windows: TerminateProcess
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

    Before the fork the runner writes the job into the file (``mark``: its number and how often
    it was queued again; a write to the page cache, which outlives the server).  So the file is
    the job's claim until the store says it runs: the store is written after the start, out of
    the time between two jobs, and a server that dies in between finds the job in ``claims()``.
    """

    hold_claims = True          # a locked file names its job: the store may follow the start
    MARK = 40                   # bytes of a mark, padded, so that a shorter one overwrites a longer

    def __init__(self, directory, runners):
        import fcntl
        self._fcntl = fcntl
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        for runner in range(1, runners + 1):
            os.close(os.open(self._runner_path(runner), os.O_RDWR | os.O_CREAT, 0o600))

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

    def mark(self, fd, job):
        """Write ``job`` into its locked file ``fd`` (before it is forked)."""
        os.pwrite(fd, ('%d %d %d' % (job.jobnumber, job.requeued, job.locked)).ljust(self.MARK - 1).encode()
                  + b'\n', 0)

    @staticmethod
    def _marked(path):
        """``(jobnumber, requeued, locked)`` written in the file, or None (none written: an older version)."""
        try:
            with open(path, 'rb') as handle:
                fields = handle.read(RunLocks.MARK).split()
            return tuple(int(field) for field in fields[:3]) if len(fields) >= 3 else None
        except (OSError, ValueError):
            return None

    def claims(self):
        """``{jobnumber: (runner or None, requeued, locked)}`` of the files a process holds now:
        the jobs that run, stored as running or not yet."""
        found = {}
        try:
            names = os.listdir(self.directory)
        except OSError:
            return found
        for name in names:
            kind, _, number = name[:-len('.lock')].partition('-')
            if not name.endswith('.lock') or kind not in ('runner', 'job') or not number.isdigit():
                continue
            path = os.path.join(self.directory, name)
            if self.runs_at(path):
                marked = self._marked(path)
                if marked is not None and (kind == 'runner' or marked[0] == int(number)):
                    found[marked[0]] = (int(number) if kind == 'runner' else None,) + marked[1:]
        return found

    def runs_at(self, path):
        """True while a process holds the lock of ``path``."""
        try:
            fd = self._take(path, create=False)
        except FileNotFoundError:
            return False
        if fd is None:
            return True
        os.close(fd)
        return False

    def _take(self, path, create=True):
        """``path`` opened and locked; None when another process holds its lock.  A lock directory
        that was deleted (by an operator clearing files that look stale) is made again."""
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            if not create:
                raise
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(path, flags, 0o600)
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
        """True while a process holds the job's lock, False when none does; None without a lock file.
        A runner's file that names another job (the runner's next, started before it was stored)
        says this one does not run."""
        path = self._path(stored)
        if path is None or not os.path.exists(path):
            return None
        if not self.runs_at(path):
            return False
        marked = self._marked(path)
        return marked is None or marked[0] == stored.jobnumber

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


class NoLocks:
    """Where there is no ``flock``: no lock files; a restarted server goes by the stored pid, so a
    job is stored as running before it is started."""

    hold_claims = False

    def mark(self, fd, job):
        pass

    def claims(self):
        return {}

    def take_runner(self, runner):
        return None

    def take_job(self, jobnumber):
        return None

    def runs(self, stored):
        return None

    def wait(self, stored):
        pass

    def holder(self, stored):
        return None

    def remove(self, jobnumber):
        pass


def run_locks(directory, runners):
    """The lock files of this platform: ``RunLocks`` where there is ``flock``, else ``NoLocks``."""
    try:
        return RunLocks(directory, runners)
    except ImportError:       # no fcntl: RunLocks imports it first of all
        return NoLocks()


class Child:
    """A job started by this server: its exit code is known."""

    fenced = False      # (a FencedChild, fence.py, may be)
    unknown = None      # why its exit code cannot be known (Orphan, a FencedChild whose fence stopped)

    def __init__(self, popen):
        self.popen = popen
        self.pid = popen.pid

    def wait(self):
        """Block until the job has ended; its exit code."""
        return self.popen.wait()


class Orphan:
    """A job started before a restart that still runs: not our child, so no exit code."""

    fenced = False
    unknown = 'it ran on from before the restart'

    def __init__(self, stored, pid, locks):
        self.stored = stored
        self.pid = pid
        self._locks = locks

    def wait(self):
        """Block until the job (and whatever holds its lock file) has ended; None."""
        if self._locks.runs(self.stored) is not None:
            self._locks.wait(self.stored)
        else:
            wait_for_pid(self.pid, self.stored.pid_start)
        return None
