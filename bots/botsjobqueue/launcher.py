"""Launching: start a job, supervise it to its end, decide what its end means, record it.

A job starts without a shell, with stdin from the null device, in a session
of its own (so a kill reaches the job's children, and a job outlives a server
that dies).  Its output goes to a capture (``outputs.py``) that holds the
pipe before the job is started.  It holds a lock file from the moment it is
forked (``processes.RunLocks``): after a crash at any instant of a start, the
restarted server sees whether the job runs, and adopts it rather than start
a second copy.

Every running job, started here or adopted after a restart, is one
``RunningJob`` and is supervised by one path, ``supervise``: wait for the
process; meanwhile maxruntime (a timer) and the shutdown act on it from
elsewhere; then ``_finished`` decides whether it leaves the queue (an
``Ended``, recorded by the runner's next take) or runs again.  The runners
that drive this are in ``runner.py``; the log line, output and report of an
ended job are ``ends.py``.

Each job known here is in ``active`` - starting, running, or ended and not
yet recorded - which ``jobstates.JobStates`` asks with the queue and the
store.

The module is near 500 lines because a job's start, supervision and end all
change that one state (``active``, the stopping flag, the timers) under one
lock; what has no need of it - runners, processes, outputs, the fence, the
end's log and record - lives in the modules named above.
"""
import itertools
import logging
import os
import signal
import sqlite3
import subprocess
import threading
import time

from . import codes
from .ends import Ended, Recorder
from .fence import LeaseLost
from .jobqueue import Job, canonical_task
from .jobstates import RunningJob, Starting
from .outputs import LIVE, Outputs, read_tail
from .processes import KILL, Child, Orphan, is_alive, process_start_time, run_locks, signal_group
from .runner import TRACE, Runner
from .store import StoreBusy, StoreRefused, patiently
from .timers import Timers

# Test hook: the fault tests set this to kill the server at a chosen instant of a start
# ('spawned': right after the fork of the first job; 'spawned:2': of the second).
KILL_AT, _, _nth = os.environ.get('BOTS_JOBQUEUE_TEST_KILL_AT', '').partition(':')
KILL_AFTER = itertools.count(2 - int(_nth or 1))      # the kill comes when it reaches 1

# Exit codes of a job ended by the shutdown signal itself (a Ctrl-C reaches a job still being spawned).
SHUTDOWN_EXITCODES = (-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT)
STORE_PID_AFTER = 0.5       # seconds a fenced job runs before its pid is stored (see Launcher.supervise)


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


class Launcher:
    """Runs jobs from the queue, ``nr_threads`` at a time."""

    def __init__(self, queue, store, authorizer, settings, logger, reporter):
        self.queue = queue
        self.store = store
        self.authorizer = authorizer
        self.settings = settings
        self.logger = logger
        self.reporter = reporter
        self.active = {}               # jobnumber -> Starting, RunningJob or Ended (see jobstates)
        self._running_count = 0        # of the RunningJobs in it
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)      # notified when a job stops running
        self._stopping = False
        self.on_idle = None            # called (from any thread) when the last running job has ended
        self.timers = Timers('maxruntime', logger)
        self.locks = run_locks(settings.lockdir, settings.nr_threads)
        self.outputs = Outputs(settings.outputdir, settings.output_limit, logger)
        self.recorder = Recorder(store, logger, reporter, self.locks, self._recorded)
        self.runners = [Runner(self, number) for number in range(1, settings.nr_threads + 1)]
        self.fence = None              # a shared store's leader starts its jobs through its fence (fence.py)
        # Where the runner's lock file names the job, the store is written after the start (see
        # processes.RunLocks); a shared store must have the job first (another server may remove it).
        self.claims_after_start = self.locks.hold_claims and not getattr(store, 'shared', False)

    # ---- life cycle
    def start(self):
        for runner in self.runners:
            runner.start()

    def close(self):
        """Start no more jobs (the first step of a shutdown)."""
        self._stopping = True
        self.queue.close()

    def runners_alive(self):
        return all(runner.is_alive() for runner in self.runners)

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
            signal_group(running.pid, KILL)
        deadline = time.monotonic() + 5
        for runner in self.runners:
            runner.join(max(0, deadline - time.monotonic()))
        self.outputs.close()
        self.timers.close()

    def _running_after(self, seconds, wait=False):
        """The running jobs (all of them at once; with ``wait``, those still running after ``seconds``)."""
        deadline = time.monotonic() + seconds
        with self._idle:
            while wait and self._running_count and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
            return self._running()

    # ---- what runs: asked by jobstates, the status page and the shutdown
    def _running(self):
        """(With the lock held.)  The RunningJobs, in job order."""
        return [self.active[number] for number in sorted(self.active) if self.active[number].state == 'running']

    def running(self):
        with self._lock:
            return self._running()

    def running_numbers(self):
        return [running.job.jobnumber for running in self.running()]

    def status(self):
        return [running.as_dict() for running in self.running()]

    def get(self, jobnumber):
        """The job's Starting, RunningJob or Ended, or None."""
        return self.active.get(jobnumber)

    def output_tail(self, jobnumber, size):
        """The end of a running job's output so far (the keeper writes it about once a second)."""
        running = self.active.get(jobnumber)
        return read_tail(running.capture.path + LIVE, size) if isinstance(running, RunningJob) else ''

    def _set(self, jobnumber, entry):
        """Put the job's new state in ``active`` (None: it is gone from here)."""
        with self._idle:
            was_running = getattr(self.active.get(jobnumber), 'state', None) == 'running'
            if entry is None:
                self.active.pop(jobnumber, None)
            else:
                self.active[jobnumber] = entry
            self._running_count += (entry is not None and entry.state == 'running') - was_running
            idle = was_running and not self._running_count
            if was_running:
                self._idle.notify_all()
        if idle and self.on_idle is not None:
            self.on_idle()

    # ---- one job: start, supervise, end
    def starting(self, job):
        """A job just taken from the queue is starting (called by the queue as it hands it out)."""
        self._set(job.jobnumber, Starting(job))

    def start_job(self, job, lock, runner, done=None, trouble=None):
        """Start a job (``lock``: the runner's lock file, the job's now); its RunningJob, or None.
        ``done``: the runner's ended job, when it is recorded with this one's claim (``Store.claim``);
        ``trouble``: how the runner waits for a failing store (``runner.StoreTrouble``)."""
        if not isinstance(self.active.get(job.jobnumber), Starting):
            self._set(job.jobnumber, Starting(job))
        claim = [done]
        try:
            return self._start(job, lock, runner, claim, trouble)
        finally:
            if isinstance(self.active.get(job.jobnumber), Starting):    # it did not get to run
                self._set(job.jobnumber, None)
            if claim[0] is not None:           # the job did not start: the ended one is recorded on its own
                try:
                    patiently(self.store.finish_ended, claim[0], patience=30)
                except (sqlite3.Error, OSError, StoreBusy) as exc:
                    self.logger.error('The end of job %s could not be recorded (%s); after a restart it runs again.',
                                      claim[0].job.jobnumber, exc)

    def _start(self, job, lock, runner, claim, trouble):
        settings = self.settings
        command = self.authorizer.command(job.task)
        started = time.time()
        if TRACE:
            TRACE('authorized', job.jobnumber)
        if command is None:
            if lock is not None:
                os.close(lock)
            self._cannot_start(job, started, 'not an authorized task any more (checked again at its start): %s'
                               % ' '.join(job.task[:2]))
            return None
        path = self.outputs.path(job.jobnumber)
        read_end, write_end = os.pipe()
        reservation = None
        try:
            # The capture reads the pipe before the job can write to it: should the server die at
            # any instant from here on, the job never meets a pipe without a reader.
            capture = self.outputs.capture(read_end, path, job.jobnumber)
            if TRACE:
                TRACE('captured', job.jobnumber)
            try:
                if lock is None:
                    lock = self.locks.take_job(job.jobnumber)
                self.locks.mark(lock, job)
                if self.claims_after_start:
                    reservation = self.store.reserve()
                if TRACE:
                    TRACE('reserved', job.jobnumber)
                process = self._spawn(command, write_end, lock, job.jobnumber)
            except (sqlite3.Error, StoreBusy) as exc:       # the reservation: the store cannot record it
                self.locks.remove(job.jobnumber)
                capture.job_ended()
                self.queue.give_back(job)
                claim[0] = None                # the runner keeps it, for its next try
                raise StoreRefused(exc) from exc
            except LeaseLost as lost:
                self.locks.remove(job.jobnumber)
                capture.job_ended()
                self.logger.warning('Job %s did not start: %s; it waits for the next leader.', job.jobnumber, lost)
                self.queue.lead(False)          # until the lease is renewed or taken again
                self._back_to_queue(job, trouble)
                return None
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                if reservation is not None:
                    reservation.cancel()
                    reservation = None
                self.locks.remove(job.jobnumber)
                capture.job_ended()
                self._cannot_start(job, started, str(exc))
                return None
            if TRACE:
                TRACE('forked', job.jobnumber)
            if KILL_AT == 'spawned' and next(KILL_AFTER) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        except BaseException:
            if reservation is not None:
                reservation.cancel()
            raise
        finally:
            for fd in (write_end, lock):
                if fd is not None:
                    os.close(fd)
        running = RunningJob(job, process, started, capture, runner, command)
        self._set(job.jobnumber, running)
        self._arm_maxruntime(running, settings.maxruntime * 60)
        details = (started, process.pid, process_start_time(process.pid), capture.relay_pid, path)
        if reservation is not None:
            try:
                reservation.commit(job, runner, *details, done=claim[0])
                claim[0] = None
                if TRACE:
                    TRACE('stored', job.jobnumber)
                if trouble is not None:
                    trouble.recovered()
            except (sqlite3.Error, OSError, StoreBusy):
                self._claim(job, runner, details, claim, trouble)      # tried again while the job runs
            return running
        if getattr(process, 'ended_within', None) is not None:
            running.unstored = details[1:]      # a fenced job's process: see supervise
        else:
            self._store_process(job, details[1:])
        return running

    def _tidy_store(self):
        try:
            patiently(self.store.trim_if_due, patience=30)
        except (sqlite3.Error, OSError, StoreBusy) as exc:     # tried again after the next job
            self.logger.error('The history could not be trimmed: %s', exc)

    def _store_process(self, job, details):
        try:
            patiently(self.store.set_process, job.jobnumber, *details, patience=30)
        except (sqlite3.Error, OSError, StoreBusy) as exc:
            # The job is supervised all the same; after a crash its lock file tells that it runs.
            self.logger.error('Job %s (pid %s) runs, but its pid could not be stored: %s',
                              job.jobnumber, details[0], exc)

    def _claim(self, job, runner, details, claim, trouble):
        """Store a job just started as running, and the runner's ended job with it, in one commit.
        A failing store is tried again (as the runner would: ``trouble``) while the job runs; the
        job's lock file says it runs meanwhile.  Given up only when the server stops."""
        while True:
            try:
                self.store.claim(job, runner, *details, done=claim[0])
                claim[0] = None
                if trouble is not None:
                    trouble.recovered()
                return
            except (sqlite3.Error, OSError, StoreBusy) as exc:
                if self._stopping or trouble is None:
                    self.logger.error('Job %s (pid %s) runs, but could not be stored as running: %s',
                                      job.jobnumber, details[1], exc)
                    claim[0] = None
                    return
                trouble.failed(exc)

    def _spawn(self, command, output, lock, jobnumber):
        """Start the job's process: here (a Child), or by the fence (a FencedChild; LeaseLost)."""
        if self.fence is not None:
            return self.fence.spawn(command, output, lock, jobnumber)
        return Child(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                      close_fds=True, pass_fds=() if lock is None else (lock,),
                                      start_new_session=True))

    def still_runs(self, stored):
        """True when a job stored as running (before a restart) still runs."""
        runs = self.locks.runs(stored)
        if runs is not None:
            return runs
        # No lock file: the server died before it forked the job, or the job is older than locks.
        return bool(stored.pid) and is_alive(stored.pid, stored.pid_start)

    def adopt(self, stored):
        """Supervise a job that was started before a restart and still runs, like one started here
        (status, maxruntime, shutdown); it holds the slot of the runner that started it."""
        pid = stored.pid
        if not pid:
            # The server died before it stored the pid: the job is the process holding its lock.
            pid = self.locks.holder(stored)
            if pid:
                patiently(self.store.set_process, stored.jobnumber, pid, process_start_time(pid), None, stored.output)
        job = Job(stored.jobnumber, stored.priority, canonical_task(stored.task), stored.requeued, stored.locked)
        slot = stored.runner if stored.runner and stored.runner <= len(self.runners) else None
        runner = self.runners[slot - 1] if slot else min(self.runners, key=lambda runner: len(runner.adopted))
        running = RunningJob(job, Orphan(stored, pid, self.locks), stored.started or time.time(),
                             self.outputs.from_before(stored), runner.number)
        self._set(job.jobnumber, running)
        self._arm_maxruntime(running, running.started + self.settings.maxruntime * 60 - time.time())
        runner.adopted.append(running)
        self.logger.warning('Job %s (pid %s) still runs from before the restart; runner %d starts no job until '
                            'it ends.', job.jobnumber, pid or 'unknown', runner.number)

    def supervise(self, running, trouble=None):
        """Wait for a running job's end - maxruntime and the shutdown act on it meanwhile - and
        return its Ended: what its end means for the queue.  ``trouble``: how the runner waits
        for a failing store (``runner.StoreTrouble``), should the job have to be queued again."""
        if TRACE:
            TRACE('waiting', running.job.jobnumber)
        if running.unstored is not None:
            # A fenced job (a shared store) is stored as running before its start; its pid is for
            # the other servers' view alone (a next leader queues the job again, and its fence
            # has ended it).  A job that ends within STORE_PID_AFTER costs no commit for it.
            if running.process.ended_within(STORE_PID_AFTER):
                self._tidy_store()
            else:
                self._store_process(running.job, running.unstored)     # (and tidies when due)
            running.unstored = None
        exitcode = running.process.wait()
        if TRACE:
            TRACE('ended', running.job.jobnumber)
        for timer in running.timers:
            timer.cancel()
        end = self._finished(running, exitcode, trouble)
        self._set(running.job.jobnumber, end if end.leaves_queue else None)
        if TRACE:
            TRACE('decided', running.job.jobnumber)
        return end

    def _arm_maxruntime(self, running, seconds):
        if self.settings.maxruntime > 0:
            running.timers.append(self.timers.add(max(0, seconds), self._maxruntime_exceeded, running))

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
            running.timers.append(self.timers.add(self.settings.kill_grace, signal_group, running.pid, KILL))

    def _back_to_queue(self, job, trouble=None):
        """Queue a job again that was cut off here.  A failing store is tried again as the runner
        would (``trouble``: ``runner.StoreTrouble``) - the queue cannot go on without it anyway -
        until it works or the server stops: then its row still says running, and the next start
        (or a shared store's next leader) queues it again."""
        while True:
            try:
                self.queue.wait_again(job)
                if trouble is not None:
                    trouble.recovered()
                return
            except (sqlite3.Error, OSError, StoreBusy) as exc:
                if self._stopping or trouble is None:
                    self.logger.error('Job %s could not be queued again now (%s); the next start (or leader) '
                                      'does it.', job.jobnumber, exc)
                    return
                trouble.failed(exc)

    def _cannot_start(self, job, started, reason):
        self.logger.error('Error starting job %s: %s\n    task: %s', job.jobnumber, reason, list(job.task))
        self.reporter.report('[Bots Job Queue] - Error starting job',
                             'Error starting job %s:\n    %s\n\n%s' % (job.jobnumber, list(job.task), reason))
        patiently(self.store.finish, job, started, time.time(), None, 'cannot start', reason)
        if self.metrics is not None:
            self.metrics.job_finished(None, 'cannot start', None)

    def _finished(self, running, exitcode, trouble=None):
        """Decide what a job's end means for the queue; return it as an Ended.

        A job put back in the queue is logged at once; an ordinary end is logged, and leaves
        the store, with the start of the next job (see ``runner.Runner.loop``).
        """
        job = running.job
        end = Ended(running, exitcode)
        if running.process.fenced or running.stopped_by_shutdown or (self._stopping and
                                                                     exitcode in SHUTDOWN_EXITCODES):
            # Stopped by the shutdown, or by the fence as this server's lease ran out: it runs again.
            end.stopped = True
            self.recorder.log_ends([end])
            job.requeued += 1
            self._back_to_queue(job, trouble)
        elif exitcode == codes.ENGINE_DATABASE_LOCKED and self.authorizer.is_engine(job.task):
            end.level = logging.WARNING        # not lost: it runs again
            self.recorder.log_ends([end])
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

    @property
    def metrics(self):
        """Counts finished jobs, when the server has metrics."""
        return self.recorder.metrics

    @metrics.setter
    def metrics(self, metrics):
        self.recorder.metrics = metrics

    def _recorded(self, end):
        """The job's output is stored: it is in the store alone now."""
        with self._lock:
            if self.active.get(end.job.jobnumber) is end:
                del self.active[end.job.jobnumber]

    def recover_outputs(self):
        """Keep the outputs of jobs that were recorded as finished just before the server died,
        before their output was collected (their files are still there).  Returns their numbers."""
        return self.outputs.recover(self.store)
