"""Where a job is, asked in one place: ``showjob``, ``status``, the status page and the metrics ask
``JobStates``, not the parts.

A job is in exactly one of three keepers at any instant (and found in the
order asked here): the launcher while it starts, runs, or has ended and is
not yet recorded (``launcher.active``); the queue while it waits (or waits
to be queued again); the store once it has finished.  Between the last two
steps - recorded, output still to come - the store's record is the answer.
"""


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
        active = self.launcher.get(jobnumber)    # starting, or ended and not recorded yet
        return active.as_dict() if active is not None else {}

    def output_tail(self, jobnumber, size):
        """The end of a running job's output so far."""
        return self.launcher.output_tail(jobnumber, size)
