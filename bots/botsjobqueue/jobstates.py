"""Where a job is, asked in one place: ``showjob``, ``status``, the status page and the metrics ask
``JobStates``, not the parts.

A job is in exactly one of three keepers at any instant (and found in the
order asked here): the launcher while it starts, runs, or has ended and is
not yet recorded (``launcher.active``); the queue while it waits (or waits
to be queued again); the store once it has finished.  Between the last two
steps - recorded, output still to come - the store's record is the answer.
The launcher's two states of a job, ``Starting`` and ``RunningJob``, are here too.
"""
import time


class Starting:
    """A job taken from the queue whose process is being started."""

    state = 'starting'

    def __init__(self, job):
        self.job = job

    def as_dict(self):
        return {'state': self.state, 'jobnumber': self.job.jobnumber, 'priority': self.job.priority,
                'task': list(self.job.task)}


class RunningJob:
    """A job that runs now, started here or adopted after a restart: its process (a
    ``processes.Child`` or ``Orphan``), its output's capture, its timers, its runner."""

    state = 'running'

    def __init__(self, job, process, started, capture, runner, command=None):
        self.job = job
        self.process = process
        self.pid = process.pid
        self.started = started
        self.capture = capture
        self.runner = runner
        self.command = command or list(job.task)      # what was started for it (the configured paths)
        self.timed_out = False
        self.stopped_by_shutdown = False
        self.timers = []
        self.unstored = None          # its process, not stored yet (see Launcher.supervise)
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



class JobStates:
    """The state of every job, from the launcher, the queue and the store."""

    def __init__(self, queue, launcher, store):
        self.queue = queue
        self.launcher = launcher
        self.store = store

    def running(self):
        """The running jobs as dicts (jobnumber, priority, task, pid, started, running_for); of a
        shared store, those of the other servers too (with their ``server``)."""
        local = self.launcher.status()
        if not getattr(self.store, 'shared', False):
            return local
        here = {job['jobnumber'] for job in local}
        try:
            others = [job for job in self.store.running_elsewhere() if job['jobnumber'] not in here]
        except OSError:              # the database is away: what runs here is still known
            others = []
        return sorted(local + others, key=lambda job: job['jobnumber'])

    def show(self, jobnumber):
        """One job as a dict with its ``state`` (waiting, starting, running, finished); {} when unknown."""
        active = self.launcher.get(jobnumber)
        if active is not None and active.state == 'running':
            return dict(active.as_dict(), state='running')
        job = self.queue.get(jobnumber)
        if job is not None:
            return {'state': 'waiting', 'jobnumber': jobnumber, 'priority': job.priority, 'task': list(job.task)}
        record = self.store.finished(jobnumber)
        if record:
            return dict(record, state='finished')
        if getattr(self.store, 'shared', False):
            for job in self.store.running_elsewhere():
                if job['jobnumber'] == jobnumber:
                    return dict(job, state='running')
        # Starting, or ended and not recorded yet - or running by now: it left the queue while it
        # was looked for, and started before this second look.
        active = self.launcher.get(jobnumber)
        return dict(active.as_dict(), state=active.state) if active is not None else {}

    def output_tail(self, jobnumber, size):
        """The end of a running job's output so far."""
        return self.launcher.output_tail(jobnumber, size)
