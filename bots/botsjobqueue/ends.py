"""Ends: what is done after a job has ended - its log line, its output in the history, a report.

The history record itself is written in the commit that starts the next job
(``runner.Runner.loop``); the log lines and outputs follow once the next job
runs, or once there is none, so that nothing here lengthens the gap between
two jobs.
"""
import datetime
import logging

from . import codes
from .outputs import LOST
from .store import patiently

OUTPUT_PATIENCE = 10     # seconds to wait for an ended job's output (a child it left may hold the pipe)


class Ended:
    """A job that has ended, until its log line, history record and output are done."""

    state = 'finished'

    def __init__(self, running, exitcode):
        self.job = running.job
        self.started = running.started
        self.ended = running.ended()
        self.exitcode = exitcode
        self.capture = running.capture
        self.leaves_queue = False      # False: it was put back in the queue
        self.status = None
        self.logged = False
        self.level = None              # of its 'Finished' line, when not the one of its exit code
        self.attempt = None            # its stored attempt, when it was queued again (exit code 3)
        self.stopped = False           # stopped by the shutdown: kept for the next start
        self.fenced = running.process.fenced     # ended by the fence (fence.py): runs at the next leader
        self.unknown = running.process.unknown   # why exitcode is None

    def as_dict(self):
        record = {'state': self.state, 'jobnumber': self.job.jobnumber, 'priority': self.job.priority,
                  'task': list(self.job.task), 'started': self.started, 'ended': self.ended}
        if self.exitcode is not None:
            record['exitcode'] = self.exitcode
        if self.status:
            record['status'] = self.status
        return record


class Recorder:
    """Logs and keeps the ends of jobs; ``recorded(end)`` is called once an end is all done."""

    def __init__(self, store, logger, reporter, locks, recorded):
        self.store = store
        self.logger = logger
        self.reporter = reporter
        self.locks = locks
        self.recorded = recorded
        self.metrics = None            # counts finished jobs, when the server has metrics

    def log_ends(self, ends):
        """Log how each job ended (once), and let go of what the server held for it - after the
        next job has started, so that it is no part of the gap between two jobs."""
        for end in ends:
            if not end.logged:
                end.logged = True
                end.capture.job_ended()
                exitcode = end.exitcode
                if end.stopped and end.fenced:
                    self.logger.warning('Ended job %s after %s (exit code %s): the lease of this server ran out; '
                                        'it runs again at the next leader.', end.job.jobnumber,
                                        elapsed(end.ended - end.started), exitcode)
                    continue
                if end.stopped:
                    self.logger.warning('Stopped job %s at the shutdown after %s (exit code %s); it is kept and '
                                        'runs again at the next start.', end.job.jobnumber,
                                        elapsed(end.ended - end.started), exitcode)
                    continue
                if exitcode is None:
                    # A job adopted after a restart is not our child; a stopped fence could not tell.
                    self.logger.info('Finished job %s, elapsed time %s; %s, so its exit code cannot be known.',
                                     end.job.jobnumber, elapsed(end.ended - end.started), end.unknown)
                    continue
                self.logger.log(end.level or logging_level(exitcode), 'Finished job %s, elapsed time %s, exit code %s',
                                end.job.jobnumber, elapsed(end.ended - end.started), exitcode)

    def collect_outputs(self, ends, wait):
        """Collect the outputs whose capture is done; with ``wait`` all of them.

        Without ``wait`` (a job runs) a capture held open by a child the job left behind is
        not waited for, so it cannot delay noticing the running job's end; a long backlog is.
        """
        for end in list(ends):
            if wait or len(ends) > 50 or end.capture.done():
                ends.remove(end)
                try:
                    self._collect_output(end)
                except Exception:        # a bug here must not stop the queue; it is logged in full
                    self.logger.exception('Unexpected error while collecting the output of job %s',
                                          end.job.jobnumber)

    def _collect_output(self, end):
        """Log and keep the output once its capture is done."""
        # The capture ends when every holder of the job's output has closed it; a child the job
        # left running may hold it longer: keep what is there by then.
        capture, job, exitcode = end.capture, end.job, end.exitcode
        capture.wait(OUTPUT_PATIENCE)
        output = capture.text()
        if capture.error == LOST:
            self.logger.warning('The output of job %s was lost: the output keeper stopped before it was written.',
                                job.jobnumber)
        elif capture.error:
            self.logger.warning('The output of job %s could not be kept: %s', job.jobnumber, capture.error)
        if output:
            # Each line carries its job's number, so that outputs stay apart in a search of the log.
            prefix = '%s| ' % job.jobnumber
            self.logger.info('Output of job %s:\n%s%s', job.jobnumber, prefix,
                             output.rstrip('\n').replace('\n', '\n' + prefix))
        if end.attempt is not None:           # a run queued again keeps its output like any run
            patiently(self.store.set_attempt_output, end.attempt, output)
        if end.leaves_queue:
            if output:            # its record was written at its end, without output: a commit saved
                patiently(self.store.set_output, job.jobnumber, output)
            if self.metrics is not None:
                self.metrics.job_finished(exitcode, end.status, end.ended - end.started)
            if exitcode == codes.ENGINE_SYSTEM_ERROR or (exitcode is not None and exitcode < 0):
                self.reporter.report('[Bots Job Queue] - Job ended with errors',
                                     'Job %s ended with exit code %s after %s:\n    %s\n\nOutput:\n%s'
                                     % (job.jobnumber, exitcode, elapsed(end.ended - end.started), list(job.task),
                                        output))
        capture.discard()
        self.locks.remove(job.jobnumber)
        self.recorded(end)


def elapsed(seconds):
    return str(datetime.timedelta(seconds=max(0, int(round(seconds)))))


def logging_level(exitcode):
    if exitcode == codes.ENGINE_OK:
        return logging.INFO
    if exitcode == codes.ENGINE_PROCESS_ERRORS:
        return logging.WARNING
    return logging.ERROR
