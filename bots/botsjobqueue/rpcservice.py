"""The job queue service: the methods clients call over XML-RPC, and what each answers.

The Bots methods keep their names and answers (``addjob``, ``listjobs``,
``clearjobq``); ``status``, ``history``, ``showjob``, ``removejob``,
``schedules``, ``pause`` and ``resume`` are added for operators.  Bad input
gets an XML-RPC fault and changes nothing.  What may be queued is decided
by ``admission.py``, which schedules ask too.  The HTTP server in front of it
is ``rpcserver.py``.
"""
import time
import xmlrpc.client

from . import codes
from .jobqueue import QueueFull, task_size

ISUP_TASK = ['isup']


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

    def __init__(self, queue, states, store, admission, settings, logger, runners_alive, scheduler=None):
        self.scheduler = scheduler       # set once the schedules are read
        self.admission = admission       # admission.Admission: what may be queued, and the log of it
        self._queue = queue
        self._states = states            # jobstates.JobStates: where each job is
        self._runners_alive = runners_alive
        self._store = store
        self._settings = settings
        self._logger = logger
        self.stopping = None             # while the server stops: (deadline on the monotonic clock, its jobs)
        self.leadership = None           # a shared store's cluster.Leadership: who leads

    def reconfigure(self, settings, authorizer):
        """A reload: new limits and authorized tasks.  (Only ``METHODS`` are served.)"""
        self._settings = settings
        self.admission.authorizer = authorizer
        self._queue.max_bytes = settings.max_queue_bytes

    # ---- Bots
    def addjob(self, task, priority=5):
        """Queue ``task`` (argv list) at ``priority`` 1..9.  0 added, 2 no task, 3 not authorized, 4 duplicate."""
        check_task(task, self._settings.max_task_size, self._settings.max_task_args)
        check_priority(priority)
        if task == ISUP_TASK:
            return codes.ADDED
        if self.stopping is not None:
            raise xmlrpc.client.Fault(1, 'the server is %s: the job is not added; send it again when a server '
                                         'runs' % self.stopping_text())
        try:
            return self.admission.add(task, priority)[0]
        except QueueFull as exc:
            raise xmlrpc.client.Fault(1, str(exc))

    def stopping_text(self):
        """'stopping, waits for job 3 for up to 42 s' (or '... no job runs'), while the server stops."""
        deadline, jobs = self.stopping
        if not jobs:
            return 'stopping, no job runs'
        return 'stopping, waits for job%s %s for up to %d s' % ('s' if len(jobs) > 1 else '', ', '.join(map(str, jobs)),
                                                              max(0, deadline - time.monotonic()))

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
        try:
            oldest = self._store.oldest_waiting()
            last = self._store.history(1, with_output=False)
            trouble = None
        except OSError as exc:          # a database store that cannot be reached
            oldest, last, trouble = None, [], str(exc)
        state = {'accepting': self.stopping is None and trouble is None, 'paused': self._queue.paused,
                 'running': len(self._states.running()), 'waiting': len(self._queue),
                 'runners_alive': self._runners_alive(),
                 'oldest_waiting_age': max(0.0, time.time() - oldest) if oldest and len(self._queue) else None,
                 'last_finished': None}
        if last:
            state['last_finished'] = {key: last[0].get(key) for key in ('jobnumber', 'exitcode', 'status', 'ended')}
        if trouble is not None:
            state['store_error'] = trouble
        if self.leadership is not None:
            state['role'] = 'leader' if self.leadership.leading else 'standby'
            state['server'] = self.leadership.store.name
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
        running = self._states.running()
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
        if self.leadership is not None:
            answer['cluster'] = _xmlrpc_safe(self.leadership.status())
            answer['cluster']['servers'] = [_xmlrpc_safe(server) for server in answer['cluster'].get('servers', [])]
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
        return _xmlrpc_safe(self._states.show(jobnumber))

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
