"""Runners: each takes the next job from the queue, has it started and supervised, and records
the end of the one before in the same commit.

A runner is a thread with a ``loop()`` step (one job per turn), as in huey's
consumer; ``nr_threads`` of them run side by side.  Between two jobs only
what the next start needs happens.  The commit that marks the next job
running and drops the ended one follows the start where the runner's lock
file holds the job's claim meanwhile (``processes.RunLocks``: a single
machine's SQLite store on POSIX), and precedes it elsewhere (Windows, a
shared store).  The log lines and the output of the ended job (a file read,
a database write) follow once the next job runs, or once there is none.  A
job adopted after a restart holds the slot of the runner that started it:
that runner supervises it before it takes a job.
"""
import os
import sqlite3
import threading
import time

from .store import StoreBusy, StoreRefused, patiently


def _tracer():
    """Where the time between two jobs goes, for the benchmark: with $BOTS_JOBQUEUE_TRACE set, each
    step of each job is noted in memory (``step wall-clock-ns jobnumber``; a write per step would
    lengthen the gap it measures) and the lines are written to the file it names at exit."""
    path = os.environ.get('BOTS_JOBQUEUE_TRACE')
    if not path:
        return None
    import atexit
    steps = []

    def write():
        with open(path, 'a') as handle:
            handle.writelines('%s %d %d\n' % step for step in steps)

    atexit.register(write)
    return lambda step, jobnumber: steps.append((step, time.time_ns(), jobnumber))


TRACE = _tracer()


class Runner:
    """Runner number ``number`` (1, 2, ...) of a ``launcher.Launcher``."""

    def __init__(self, launcher, number):
        self.launcher = launcher
        self.number = number
        self.adopted = []       # RunningJobs from before a restart, in this runner's slot
        self.ended = []         # Ended jobs whose log line or output is still to come
        self.done = None        # the job that just ended, still stored as running
        self.lock = None        # the runner's lock file, taken before the job is (see processes.RunLocks)
        self.trouble = StoreTrouble(launcher.logger, launcher.reporter)
        self._thread = threading.Thread(target=self.run, name='runner-%d' % number, daemon=True)

    def start(self):
        self._thread.start()

    def is_alive(self):
        return self._thread.is_alive()

    def join(self, timeout):
        self._thread.join(timeout)

    def run(self):
        """Supervise the adopted jobs, then take jobs until the queue is closed."""
        while self.adopted:
            running = self.adopted.pop(0)
            self._guarded(running.job, self._supervise, running)
        while self.loop():
            pass
        if self.lock is not None:
            os.close(self.lock)

    def loop(self):
        """One turn: take the next job, start it, do the bookkeeping of the previous one, supervise
        the job to its end.  False once the queue is closed and nothing is left to do."""
        launcher = self.launcher
        if self.lock is None:
            try:
                self.lock = launcher.locks.take_runner(self.number)
            except OSError as exc:         # the job gets a file of its own, or cannot start (and says why)
                launcher.logger.warning('The lock file of runner %d cannot be taken: %s', self.number, exc)
        after = launcher.claims_after_start
        try:
            job = launcher.queue.take(block=not self.ended, done=self.done, runner=self.number,
                                      taken=launcher.starting, claim=not after)
        except (sqlite3.Error, OSError, StoreBusy) as exc:
            self.trouble.failed(exc)       # waits a while; the job is still first in the queue
            return True
        if not after or job is None:
            self.trouble.recovered()       # (else the start's commit tells: see Launcher._start)
        done, self.done = (self.done if after and job is not None else None), None
        if TRACE and job is not None:
            TRACE('taken', job.jobnumber)
        if job is None:
            if not self.ended:
                return False               # the queue is closed
            launcher.recorder.log_ends(self.ended)
            launcher.recorder.collect_outputs(self.ended, wait=True)
            return True
        self._guarded(job, self._run, job, done)
        return True

    def _run(self, job, done):
        launcher = self.launcher
        held, self.lock = self.lock, None            # the job's now (closed by start_job in any case)
        try:
            running = launcher.start_job(job, held, self.number, done, self.trouble)
        except StoreRefused as refused:
            self.done = done               # recorded with the next start
            self.trouble.failed(refused.error)      # waits a while; the job is first in the queue again
            return
        launcher.recorder.log_ends(self.ended)
        if running is not None:
            command = running.command
            launcher.logger.info('Starting job %s: %s%s', job.jobnumber, list(job.task),
                                 '' if command[0] == job.task[0] else ' (runs %s)' % command[0])
        launcher.recorder.collect_outputs(self.ended, wait=False)
        if running is not None:
            self._supervise(running)

    def _supervise(self, running):
        end = self.launcher.supervise(running, self.trouble)
        self.ended.append(end)
        if end.leaves_queue:
            if self.done is not None:      # two adopted jobs in one slot: the first is recorded now
                patiently(self.launcher.store.finish_ended, self.done)
            self.done = end                # recorded by the next take, in its commit

    def _guarded(self, job, step, *args):
        try:
            step(*args)
        except Exception:        # a bug here must not stop the queue; it is logged in full
            self.launcher.logger.exception('Unexpected error while running job %s', job.jobnumber)


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
