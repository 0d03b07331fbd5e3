"""Watching directories: partner files that have arrived become one engine job per route.

Each ``[dirmonitorN]`` section of bots.ini watches one directory (with
``watchdog``).  A matching file that is created, moved in, or written and
closed makes its section *dirty*; once the section's files have been quiet
for ``quiet_period`` seconds - and, where the platform reports it (inotify),
no file in it is still open for writing - the engine job of the route is
sent to the job queue.  However many files arrive, that is one job.

Jobs the server cannot take yet (it is down) stay in the outbox and are sent
again with a growing pause; nothing is dropped while the monitor runs.  The
program around this - its options, its reloads and the trigger file that asks
for one - is ``dirmonitor.py``.
"""
import collections
import logging
import os
import sys
import threading
import time

from watchdog.events import FileSystemEventHandler

from . import botslog, codes
from .job2queue import send_job_to_jobqueue

OVERFLOW_LOGGER = 'watchdog.observers.inotify_c'     # where watchdog says that events were lost
LOST_EVENTS_SETTLE = 1.5     # seconds: more than watchdog holds events back (0.5 s) before it hands them on

class Outbox:
    """Jobs to send to the queue, in order, each once; retried while the server is unreachable."""

    def __init__(self, settings, logger):
        self.settings = settings
        self.logger = logger
        self._jobs = collections.OrderedDict()      # tuple(task) -> priority
        self._changed = threading.Condition()
        self._stopping = False
        self.sent = 0

    def put(self, task, priority):
        with self._changed:
            key = tuple(task)
            self._jobs[key] = min(priority, self._jobs.get(key, priority))
            self._changed.notify()

    def stop(self):
        with self._changed:
            self._stopping = True
            self._changed.notify()

    def run(self):
        pause = 0.0
        while True:
            with self._changed:
                while not self._jobs and not self._stopping:
                    self._changed.wait()
                if pause and not self._stopping:
                    self._changed.wait(pause)
                if not self._jobs:
                    return
                task, priority = next(iter(self._jobs.items()))
            code = send_job_to_jobqueue(list(task), priority, port=self.settings.port,
                                        timeout=self.settings.client_timeout, host=self.settings.host,
                                        secret=self.settings.secret)
            if code == codes.UNREACHABLE:
                if self._stopping:
                    self.logger.error('Stopping while the jobqueue-server cannot be reached; not sent: %s',
                                      list(task))
                    return
                pause = min(self.settings.retry_max, max(1.0, pause * 2))
                self.logger.warning('Cannot contact the jobqueue-server; trying again in %s seconds: %s',
                                    pause, list(task))
                continue
            pause = 0.0
            with self._changed:
                if self._jobs.get(task) == priority:
                    del self._jobs[task]
                self.sent += 1
            if code == codes.ADDED:
                self.logger.info('Job queued: %s', list(task))
            elif code == codes.DUPLICATE:
                self.logger.info('Job already waiting in the queue: %s', list(task))
            else:
                self.logger.error('The jobqueue-server refused the job (code %s): %s', code, list(task))


def nearest_existing(path):
    """``path`` itself when it is a directory, else its nearest existing ancestor."""
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


class WatchState:
    """What one watch has seen since its job was last sent."""

    def __init__(self, watch):
        self.watch = watch
        self.dirty = False
        self.last_event = 0.0
        self.writing = {}        # path -> time of its last event; files open for writing
        self.queued_at = None    # when its job was last sent (time.monotonic)
        self.observed = None     # the watchdog watch of the directory, or of the ancestor awaited
        self.missing = False     # the directory does not exist (and that was logged)


class DirMonitor:
    """Turns file events into engine jobs.  One lock guards the state of all watches."""

    def __init__(self, settings, logger, outbox):
        self.settings = settings
        self.logger = logger
        self.outbox = outbox
        self._changed = threading.Condition()
        self._states = {}
        self._observers = {}
        self._stopping = False
        self._overflow = OverflowAlarm(self)
        logging.getLogger(OVERFLOW_LOGGER).addHandler(self._overflow)

    # ---- watching
    def start(self, watches, process_existing):
        """Watch ``watches``; with ``process_existing``, dirty the ones that already hold files."""
        for watch in watches:
            state = WatchState(watch)
            self._states[watch.section] = state
            self._observe(state, process_existing)
        for observer in self._observers.values():
            if not observer.is_alive():
                observer.start()

    def stop_watching(self):
        logging.getLogger(OVERFLOW_LOGGER).removeHandler(self._overflow)
        for observer in self._observers.values():
            observer.stop()
        for observer in self._observers.values():
            if observer.is_alive():
                observer.join(5)
        self._observers = {}

    def _observer(self, polling):
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver
        if polling not in self._observers:
            if polling:
                observer = PollingObserver(timeout=self.settings.polling_interval)
            else:
                try:
                    from watchdog.observers.inotify import InotifyObserver
                    # Full events: a file moved in from elsewhere is a move, not a create.
                    observer = InotifyObserver(generate_full_events=True)
                except (ImportError, OSError):
                    observer = Observer()
            observer.daemon = True
            self._observers[polling] = observer
        return self._observers[polling]

    def _observe(self, state, process_existing):
        watch = state.watch
        observer = self._observer(watch.polling)
        if os.path.isdir(watch.path):
            try:
                state.observed = observer.schedule(EventHandler(self, state), watch.path, recursive=watch.recursive)
            except OSError as exc:
                self.logger.error('[%s] cannot watch %s: %s', watch.section, watch.path, exc)
                return
            self.logger.log(botslog.STARTINFO, '[%s] watching %s (%s%s) for route "%s".', watch.section,
                            watch.pattern or watch.path, watch.filemask, ', recursive' if watch.recursive else '',
                            watch.route)
            if process_existing and watch.process_existing and watch.existing_files():
                self.logger.info('[%s] files are waiting in %s.', watch.section, watch.path)
                self._dirty(state)
            return
        ancestor = nearest_existing(watch.path)
        if not state.missing:
            self.logger.warning('[%s] directory %s does not exist; it is watched for once it appears.',
                                watch.section, watch.path)
            state.missing = True
        state.observed = observer.schedule(AppearHandler(self, state), ancestor, recursive=False)
        if nearest_existing(watch.path) != ancestor:
            self.reobserve_soon(state)      # a step towards it appeared while the watch was set up

    def reobserve_soon(self, state):
        """Re-watch from a thread of its own: watchdog's threads must not change their own watches."""
        threading.Thread(target=self._reobserve, args=(state,), daemon=True).start()

    def _reobserve(self, state):
        """The directory appeared or vanished: watch it again, or wait for it."""
        with self._changed:
            if self._stopping or self._states.get(state.watch.section) is not state:
                return
        observer = self._observer(state.watch.polling)
        if state.observed is not None:
            try:
                observer.unschedule(state.observed)
            except (KeyError, OSError):
                pass
            state.observed = None
        if os.path.isdir(state.watch.path):
            if state.missing:
                self.logger.log(botslog.STARTINFO, '[%s] directory %s appeared.', state.watch.section,
                                state.watch.path)
                state.missing = False
            self._observe(state, True)
        else:
            self._observe(state, False)

    # ---- events (called from watchdog's threads)
    def file_event(self, state, kind, path):
        if not state.watch.matches(path):
            return
        with self._changed:
            now = time.monotonic()
            was_dirty, was_writing = state.dirty, bool(state.writing)
            if kind == 'writing':
                state.writing[path] = now
            else:
                state.writing.pop(path, None)
            if kind != 'gone':
                state.dirty = True
                state.last_event = now
            # The settle loop is woken only when a job may be due sooner than it thinks: a watch
            # that turned dirty, or whose last open file closed.  A burst brings tens of
            # thousands of events; waking it for each would hold up watchdog's own threads.
            if state.dirty and (not was_dirty or (was_writing and not state.writing)):
                self._changed.notify()

    def _dirty(self, state):
        with self._changed:
            state.dirty = True
            state.last_event = time.monotonic()
            self._changed.notify()

    # ---- settling
    def settle_loop(self):
        """Send a watch's job once its files are quiet; sleep until the next one is due."""
        quiet = self.settings.quiet_period
        pause_limit = self.settings.write_pause_limit
        with self._changed:
            while not self._stopping:
                now = time.monotonic()
                next_due = None
                for state in self._states.values():
                    if not state.dirty:
                        continue
                    for path, seen in list(state.writing.items()):
                        if now - seen >= pause_limit:
                            self.logger.warning('[%s] %s was not closed after %s seconds; taken as complete.',
                                                state.watch.section, path, pause_limit)
                            del state.writing[path]
                    if state.writing:
                        due = min(state.writing.values()) + pause_limit
                    else:
                        due = state.last_event + quiet
                        if due <= now:
                            state.dirty = False
                            state.queued_at = now
                            self.logger.info('[%s] files arrived; queueing route "%s".',
                                             state.watch.section, state.watch.route)
                            self.outbox.put(state.watch.task, state.watch.priority)
                            continue
                    next_due = due if next_due is None else min(next_due, due)
                self._changed.wait(None if next_due is None else max(0.001, next_due - now))

    def stop(self):
        """Stop watching; return the identities of the watches whose job was still to be sent."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            dirty = {state.watch.identity() for state in self._states.values() if state.dirty}
        self.stop_watching()
        return dirty

    def mark_changed_since(self, moment):
        """Watches with a matching file written since ``moment`` (a timestamp)."""
        for state in list(self._states.values()):
            if state.watch.files_changed_since(moment):
                self.logger.info('[%s] files arrived during the reload; queueing route "%s".',
                                 state.watch.section, state.watch.route)
                self._dirty(state)

    def events_lost(self, noticed):
        """The system dropped file events (its inotify queue overflowed in a burst; ``noticed``:
        when watchdog said so, on the monotonic clock).  A watch whose job is still to be sent,
        or was sent since, covers the lost files: the engine takes every file there when it runs.
        Every other watch that holds matching files is taken as changed, so that none waits
        unseen; and no file waits for a close event that was lost."""
        # watchdog hands the events read before the overflow on a moment later (it holds them
        # to pair moves): let them come first, or they would note files as open once more.
        time.sleep(LOST_EVENTS_SETTLE)
        with self._changed:
            if self._stopping:
                return
        self.logger.warning('File events were lost (the event queue of the system overflowed in a burst of '
                            'files); each watched directory with files in it is looked at again.')
        for state in list(self._states.values()):
            if state.watch.polling:
                continue
            with self._changed:
                # Which files were closed is lost too: a file still written sends events again,
                # one written and closed before the loss is complete.
                state.writing.clear()
                covered = state.dirty or (state.queued_at is not None and state.queued_at >= noticed)
                if state.dirty:
                    self._changed.notify()
            if not covered and state.watch.existing_files():
                self._dirty(state)

    def mark_dirty(self, identities):
        """Watches (by identity) that had files waiting to settle before a reload."""
        for state in self._states.values():
            if state.watch.identity() in identities:
                self._dirty(state)


class OverflowAlarm(logging.Handler):
    """watchdog tells of lost events (an inotify queue overflow) only in its log, and sends no
    event for them: this handler hears it there and has the monitor look at every directory."""

    def __init__(self, monitor):
        super().__init__(logging.WARNING)
        self.monitor = monitor

    def emit(self, record):
        if 'overflow' in record.getMessage().lower():
            # Not in watchdog's own thread: looking at directories of many files takes a while.
            threading.Thread(target=self.monitor.events_lost, args=(time.monotonic(),), name='events-lost',
                             daemon=True).start()


class EventHandler(FileSystemEventHandler):
    """Sorts watchdog's events of one directory into 'writing', 'complete' and 'gone'."""

    def __init__(self, monitor, state):
        self.monitor = monitor
        self.state = state
        # Only where close events exist can a file be known to be still open.
        self.knows_closes = not state.watch.polling and sys.platform.startswith('linux')

    def on_created(self, event):
        if not event.is_directory:
            self.monitor.file_event(self.state, 'writing' if self.knows_closes else 'complete', event.src_path)

    def on_modified(self, event):
        if not event.is_directory:
            self.monitor.file_event(self.state, 'writing' if self.knows_closes else 'complete', event.src_path)

    def on_closed(self, event):
        self.monitor.file_event(self.state, 'complete', event.src_path)

    def on_moved(self, event):
        if event.is_directory:
            if event.src_path == self.state.watch.path:
                self.monitor.reobserve_soon(self.state)
            return
        if event.src_path:
            self.monitor.file_event(self.state, 'gone', event.src_path)
        if event.dest_path:
            self.monitor.file_event(self.state, 'complete', event.dest_path)

    def on_deleted(self, event):
        if event.src_path == self.state.watch.path:
            self.monitor.logger.warning('[%s] directory %s disappeared; it is watched for once it appears again.',
                                        self.state.watch.section, self.state.watch.path)
            self.monitor.reobserve_soon(self.state)
        elif not event.is_directory:
            self.monitor.file_event(self.state, 'gone', event.src_path)


class AppearHandler(FileSystemEventHandler):
    """Watches the nearest existing parent of a missing directory until the directory exists."""

    def __init__(self, monitor, state):
        self.monitor = monitor
        self.state = state

    def on_any_event(self, event):
        if event.is_directory and event.event_type in ('created', 'moved'):
            self.monitor.reobserve_soon(self.state)
