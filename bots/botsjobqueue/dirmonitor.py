"""bots-dirmonitor: queue the engine for a route when partner files have arrived.

Each ``[dirmonitorN]`` section of bots.ini watches one directory (with
``watchdog``).  A matching file that is created, moved in, or written and
closed makes its section *dirty*; once the section's files have been quiet
for ``quiet_period`` seconds - and, where the platform reports it (inotify),
no file in it is still open for writing - the engine job of the route is
sent to the job queue.  However many files arrive, that is one job.

Jobs the server cannot take yet (it is down) stay in the outbox and are sent
again with a growing pause; nothing is dropped while the monitor runs.
"""
import collections
import fnmatch
import os
import sys
import threading
import time

from . import botslog, configuration, instance
from .authorize import Authorizer
from .signals import Signals
from .job2queue import send_job_to_jobqueue

USAGE = '''\
This is "%(name)s" (%(version)s), the directory monitor of the Bots job queue.
Watches the directories of the [dirmonitorN] sections of bots.ini and queues
bots-engine for the route of a directory when files have arrived in it.
Usage:
    %(name)s [-c<directory>] [--reload]
Options:
    -c<directory>   directory for configuration files (default: config).
    --reload        ask the running bots-dirmonitor of this configuration to
                    re-read bots.ini (it writes "reload" into the trigger file,
                    [dirmonitor] trigger, default botssys/.dirmonitor.trigger).
Signals:
    SIGHUP: read bots.ini again (as --reload does); a bots.ini with errors is
        logged and the one in use is kept.
    SIGTERM, SIGINT (Ctrl-C), SIGBREAK (Ctrl-Break, Windows): stop.  Files
        that still wait are found again at the next start (process_existing).
Exit codes: 0 stopped normally (or reload asked for); 1 cannot start (configuration).
'''

UNREACHABLE = 1


class Watch:
    """One watched directory - a ``[dirmonitorN]`` section, or a route of Bots' database - what
    to watch, and which job its files ask for."""

    def __init__(self, environment, section, general, route_record=None):
        ini = environment.ini
        self.section = section
        self.process_existing = True
        if route_record is None:
            path = ini.get(section, 'path', '').strip()
            if not path:
                raise configuration.ConfigError('Error: [%s] has no path' % section)
            self.filemask = ini.get(section, 'filemask', '*').strip() or '*'
            self.recursive = ini.getboolean(section, 'recursive', False)
            self.route = ini.get(section, 'route', '').strip()
            self.polling = ini.getboolean(section, 'polling', general.polling)
            self.priority = ini.getint(section, 'priority', general.priority)
            if not 1 <= self.priority <= 9:
                raise configuration.ConfigError('Error: [%s] priority should be from 1 to 9' % section)
        else:
            # As Bots 4: the channel's path and mask; a '*' in the path watches what it matches.
            path = route_record['path']
            self.filemask = route_record['filemask']
            self.recursive = '*' in path
            self.route = route_record['idroute']
            self.polling, self.priority = general.polling, general.priority
            # A channel that leaves its files in place would queue a run at every start.
            self.process_existing = route_record['remove']
        path = os.path.abspath(path)
        self.pattern = path if any(char in path for char in '*?[') else None
        if self.pattern:
            fixed = []
            for part in path.split(os.sep):
                if any(char in part for char in '*?['):
                    break
                fixed.append(part)
            path, self.recursive = os.sep.join(fixed) or os.sep, True
        self.path = path
        task = [environment.python_executable_path, environment.botsengine_path, '-c' + environment.configdir]
        self.task = task + [self.route] if self.route else task

    def identity(self):
        return (self.path, self.pattern, self.filemask, self.recursive, self.route, self.polling, self.priority)

    def matches(self, path):
        """True for a file of this watch: right name, in the directory (or below, when recursive;
        in a directory that the path's pattern matches, when it has one)."""
        if not fnmatch.fnmatch(os.path.basename(path), self.filemask):
            return False
        parent = os.path.dirname(path)
        if self.pattern:
            return fnmatch.fnmatch(parent, self.pattern)
        if parent == self.path:
            return True
        return self.recursive and parent.startswith(self.path + os.sep)

    def existing_files(self, since=None):
        """True when the directory already holds a matching file (written since ``since``, a
        timestamp, when given)."""
        for root, dirs, files in os.walk(self.path):
            if not self.pattern or fnmatch.fnmatch(root, self.pattern):
                for name in files:
                    if fnmatch.fnmatch(name, self.filemask) and (since is None or _mtime(root, name) >= since):
                        return True
            if not self.recursive:
                return False
        return False

    def files_changed_since(self, moment):
        return self.existing_files(since=moment)


def _mtime(directory, name):
    try:
        return os.stat(os.path.join(directory, name)).st_mtime
    except OSError:
        return 0.0


class MonitorSettings:
    """The ``[dirmonitor]`` section and what the monitor needs of the others."""

    def __init__(self, environment):
        ini = environment.ini
        self.quiet_period = ini.getfloat('dirmonitor', 'quiet_period', 2.0)
        self.priority = ini.getint('dirmonitor', 'priority', 5)
        self.process_existing = ini.getboolean('dirmonitor', 'process_existing', True)
        self.polling = ini.getboolean('dirmonitor', 'polling', False)
        self.polling_interval = ini.getfloat('dirmonitor', 'polling_interval', 1.0)
        self.retry_max = ini.getfloat('dirmonitor', 'retry_max', 60.0)
        self.write_pause_limit = ini.getfloat('dirmonitor', 'write_pause_limit', 600.0)
        self.port = environment.port
        trigger = ini.get('dirmonitor', 'trigger', '') or '.dirmonitor.trigger'
        self.trigger = os.path.join(environment.botssys, trigger)
        self.client_timeout = environment.client_timeout
        sections = [name for name in ini.sections() if name.startswith('dirmonitor') and name != 'dirmonitor']
        self.watches = [Watch(environment, name, self) for name in sections]
        self.notes = []          # (level, line) for the log: what was read of Bots' database
        if environment.bots4:
            self._add_routes(environment)

    def _add_routes(self, environment):
        """The routes Bots 4 flags ``dirmonitor``, read through Bots' own code."""
        from .botsroutes import RoutesUnreadable, read_routes
        python = sys.executable if environment.inside_bots else environment.python_executable_path
        try:
            routes = read_routes(python, environment.configdir)
        except RoutesUnreadable as exc:
            self.notes.append((40, "Cannot read the routes of Bots' database (%s); the [dirmonitorN] sections "
                                   "are watched." % exc))
            return
        if routes is None:
            return
        watched = {(watch.path, watch.pattern, watch.filemask): watch for watch in self.watches}
        for record in routes:
            watch = Watch(environment, 'route %s' % record['idroute'], self, record)
            key = (watch.path, watch.pattern, watch.filemask)
            if key in watched:
                self.notes.append((30, 'Route "%s" (Bots\' database): %s (%s) is watched already by [%s]; one '
                                       'watch, for route "%s".' % (record['idroute'], record['path'],
                                                                   record['filemask'], watched[key].section,
                                                                   watched[key].route)))
                continue
            watched[key] = watch
            self.watches.append(watch)
            self.notes.append((25, 'Route "%s" of Bots\' database is watched: %s (%s)%s.'
                                   % (record['idroute'], record['path'], record['filemask'],
                                      '' if record['remove'] else '; its channel keeps its files, so files '
                                      'already there are not processed at start')))


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
                                        timeout=self.settings.client_timeout)
            if code == UNREACHABLE:
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
            if code == 0:
                self.logger.info('Job queued: %s', list(task))
            elif code == 4:
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
                            watch.pattern or watch.path, watch.filemask, ', recursive' if watch.recursive else '', watch.route)
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
            if kind == 'writing':
                state.writing[path] = now
            else:
                state.writing.pop(path, None)
            if kind != 'gone':
                state.dirty = True
                state.last_event = now
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

    def mark_dirty(self, identities):
        """Watches (by identity) that had files waiting to settle before a reload."""
        for state in self._states.values():
            if state.watch.identity() in identities:
                self._dirty(state)


def _handler_base():
    from watchdog.events import FileSystemEventHandler
    return FileSystemEventHandler


class EventHandler(_handler_base()):
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


class AppearHandler(_handler_base()):
    """Watches the nearest existing parent of a missing directory until the directory exists."""

    def __init__(self, monitor, state):
        self.monitor = monitor
        self.state = state

    def on_any_event(self, event):
        if event.is_directory and event.event_type in ('created', 'moved'):
            self.monitor.reobserve_soon(self.state)


def load(configdir):
    environment = configuration.load(configdir)
    return environment, MonitorSettings(environment)


def warn_refused(environment, settings, logger):
    """One warning for each job of a watch that the job queue server would refuse."""
    authorizer = Authorizer.for_environment(environment)
    for problem in authorizer.problems:
        if problem.startswith('[settings]'):
            logger.warning(problem)
    for watch in settings.watches:
        if not authorizer.allows(watch.task):
            logger.warning('[%s] the job queue server would refuse its job (answer 3, not authorized): %s',
                           watch.section, watch.task)


def log_notes(settings, logger):
    for level, line in settings.notes:
        logger.log(level, '%s', line)


def ask_reload(environment, settings):
    """``--reload``: write "reload" into the trigger file that the running monitor watches."""
    try:
        os.makedirs(os.path.dirname(settings.trigger), exist_ok=True)
        with open(settings.trigger, 'w', encoding='utf-8') as handle:
            handle.write('reload')
    except OSError as exc:
        raise configuration.ConfigError('Error: cannot write the trigger file %s: %s'
                                        % (settings.trigger, exc.strerror or exc))
    if instance.runs(environment.botssys, 'bots-dirmonitor'):
        print('Reload asked for: the bots-dirmonitor of "%s" re-reads it (trigger file %s).'
              % (environment.configdir, settings.trigger))
    else:
        print('Warning: no bots-dirmonitor of "%s" runs now; the reload waits in the trigger file %s, and '
              'a monitor that starts reads the configuration anyway.' % (environment.configdir, settings.trigger),
              file=sys.stderr)


def parse_args(argv, name):
    """``(configdir, reload)`` from the command line."""
    reload = '--reload' in argv
    return configuration.configdir_from_args([arg for arg in argv if arg != '--reload'], name, USAGE), reload


class TriggerWatch:
    """Watches the trigger file (Bots 4's way to reload a dirmonitor, and the one on Windows):
    when it says ``reload``, the command ``reload`` is given and the file removed."""

    def __init__(self, path, commands, logger):
        self.path = path
        self.commands = commands
        self.logger = logger
        self._observer = None
        self.clear()

    def clear(self):
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.logger.error('Cannot remove the trigger file %s: %s', self.path, exc.strerror or exc)

    def start(self):
        from watchdog.observers import Observer
        handler_base = _handler_base()
        trigger = self

        class Handler(handler_base):
            def on_any_event(self, event):
                if not event.is_directory and trigger.path in (event.src_path, getattr(event, 'dest_path', '')):
                    trigger.look()

        self._observer = Observer()
        self._observer.daemon = True
        try:
            self._observer.schedule(Handler(), os.path.dirname(self.path), recursive=False)
            self._observer.start()
        except OSError as exc:
            self.logger.error('Cannot watch the trigger file %s: %s', self.path, exc.strerror or exc)

    def look(self):
        try:
            with open(self.path, encoding='utf-8', errors='replace') as handle:
                content = handle.read().strip().lower()
        except OSError:
            return
        if content == 'reload':
            self.clear()
            self.commands.put('reload')

    def stop(self):
        if self._observer is not None:
            self._observer.stop()


def start():
    """Console script entry point."""
    name = os.path.basename(sys.argv[0])
    commands = Signals({'SIGTERM': 'stop', 'SIGINT': 'stop', 'SIGBREAK': 'stop', 'SIGHUP': 'reload'})
    try:
        configdir, reload = parse_args(sys.argv[1:], name)
        environment, settings = load(configdir)
        if reload:
            ask_reload(environment, settings)
            sys.exit(0)
        lock = instance.hold(environment.botssys, 'bots-dirmonitor', environment.botssys)
        logger = botslog.init(environment, 'dirmonitor')
    except configuration.ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    logger.log(botslog.STARTINFO, 'Bots dirmonitor started.')
    logger.log(botslog.STARTINFO, 'Bots dirmonitor configdir: "%s".', environment.configdir)
    botslog.log_installation(environment, logger, 'Bots dirmonitor')
    if not settings.watches:
        logger.warning('No [dirmonitorN] sections in %s%s: nothing to watch.',
                       os.path.join(environment.configdir, 'bots.ini'),
                       " and no route flagged dirmonitor in Bots' database" if environment.bots4 else '')
    warn_refused(environment, settings, logger)
    log_notes(settings, logger)
    for line in configuration.unknown_keys(environment.ini, ('dirmonitor',)):
        logger.warning(line)
    trigger = TriggerWatch(settings.trigger, commands, logger)
    trigger.start()
    outbox = Outbox(settings, logger)
    sender = threading.Thread(target=outbox.run, name='outbox', daemon=True)
    sender.start()
    monitor = run_monitor(settings, logger, outbox, settings.process_existing)
    while True:
        command = commands.next()
        if command == 'stop':
            break
        try:
            environment, new_settings = load(configdir)
        except configuration.ConfigError as exc:
            logger.error('Configuration not reloaded: %s', exc)
            continue
        logger.log(botslog.STARTINFO, 'Bots dirmonitor reloads its configuration.')
        warn_refused(environment, new_settings, logger)
        log_notes(new_settings, logger)
        known = {watch.identity() for watch in settings.watches}
        stopped_at = time.time()
        dirty = monitor.stop()
        outbox.settings = settings = new_settings
        monitor = run_monitor(settings, logger, outbox, False,
                              [w for w in settings.watches if w.identity() not in known])
        monitor.mark_dirty(dirty)
        # A file that arrived while the watches were set up again has no event: look for it.
        monitor.mark_changed_since(stopped_at - 1.0)
    logger.log(botslog.STARTINFO, 'Bots dirmonitor stops.')
    trigger.stop()
    monitor.stop()
    outbox.stop()
    sender.join(settings.client_timeout + 5)
    logger.log(botslog.STARTINFO, 'Bots dirmonitor stopped.')
    lock.close()
    sys.exit(0)


def run_monitor(settings, logger, outbox, process_existing, new_watches=()):
    """Start watching; ``new_watches`` (after a reload) get process_existing as at a start."""
    monitor = DirMonitor(settings, logger, outbox)
    monitor.start([w for w in settings.watches if w not in new_watches], process_existing)
    if new_watches:
        monitor.start(list(new_watches), settings.process_existing)
    threading.Thread(target=monitor.settle_loop, name='settle', daemon=True).start()
    return monitor


if __name__ == '__main__':
    start()
