"""Admission: whether a task may be queued, the queueing itself, and what the log says of it.

Every job comes in here - an ``addjob`` of any client (``rpcservice.py``) and
every firing of a schedule (``schedule.py``) - so the same rules hold for
all: a task at all, an authorized one, room in the queue, the duplicate rule
(the queue's own), and one log line for each answer.  A stream of refusals
from one client is logged at a bounded rate.
"""
import contextvars
import logging

from . import codes, jobqueue
from .botslog import RateLimited
from .store import patiently

# Who sent the request being answered (the address), for the log; a schedule is 'this server'.
CLIENT = contextvars.ContextVar('client', default='this server')


class Admission:
    """Queues what may be queued, into ``queue``; ``authorizer`` changes at a reload."""

    def __init__(self, queue, store, authorizer, logger, metrics=None):
        self.queue = queue
        self.store = store
        self.authorizer = authorizer
        self.logger = logger
        self.metrics = metrics
        self.refusals = RateLimited(logger)
        self._full = False               # the queue was full at the last add (said once)

    def add(self, task, priority, schedule=None):
        """Queue a checked task; ``(code, jobnumber)`` (jobnumber None when nothing was queued).
        ``schedule``: the name of the schedule that fired it, for the log and the history.
        Raises jobqueue.QueueFull, with the words for the client."""
        origin = '' if schedule is None else ' (schedule [%s])' % schedule
        if not task:
            self.logger.info('No task to add%s.', origin)
            self._count('no task')
            return codes.NO_TASK, None
        if not self.authorizer.allows(task):
            client = CLIENT.get()
            self.refusals.log(logging.WARNING, 'not authorized', client, 'Refused job%s from %s, not an authorized '
                              'task: %s', origin, client, shortened(task))
            self._count('not authorized')
            return codes.NOT_AUTHORIZED, None
        try:
            code, jobnumber, previous = self.queue.add(task, priority)
        except jobqueue.QueueFull:
            self._count('queue full')
            if not self._full:
                self._full = True
                self.logger.error('The queue is full: its waiting jobs take %d bytes of tasks ([jobqueue] '
                                   'max_queue_bytes = %d); new jobs are refused until jobs have left it.',
                                   self.queue.size(), self.queue.max_bytes)
            raise jobqueue.QueueFull('the queue is full ([jobqueue] max_queue_bytes = %d); the job is not stored, '
                                     'try again later' % self.queue.max_bytes)
        if self._full:
            self._full = False
            self.logger.log(25, 'The queue takes new jobs again.')
        self._count('duplicate' if code == codes.DUPLICATE else None)
        if code == codes.DUPLICATE:
            self.logger.info('Duplicate job%s not added: %s', origin, task)
        elif previous is not None:
            self.logger.info('Priority of waiting job %s changed from %s to %s%s: %s',
                              jobnumber, previous, priority, origin, task)
        else:
            if schedule is not None:
                patiently(self.store.set_scheduled, jobnumber, schedule, patience=30)   # the scheduler's thread
            self.logger.info('Added job %s, priority %s%s: %s', jobnumber, priority, origin, task)
        return code, jobnumber

    def _count(self, refusal):
        if self.metrics is not None:
            if refusal is None:
                self.metrics.added.inc()
            else:
                self.metrics.answered.labels(refusal).inc()


def shortened(task, size=500):
    """A task as the log shows it: its start, when it is long."""
    text = repr(list(task))
    return text if len(text) <= size else '%s... (%d characters)' % (text[:size], len(text))
