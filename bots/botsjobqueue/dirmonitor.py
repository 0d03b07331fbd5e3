"""bots-dirmonitor: queue the engine for a route when partner files have arrived.

This module is the program: its options, start-up, reloads (SIGHUP, the
trigger file, ``--reload``) and stop.  What it watches and how a file event
becomes a job is ``watching.py``.
"""
import os
import sys
import threading
import time

from watchdog.events import FileSystemEventHandler

from . import botslog, configuration, instance
from .authorize import Authorizer
from .signals import Signals
from .watches import MonitorSettings
from .watching import DirMonitor, Outbox

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
        trigger = self

        class Handler(FileSystemEventHandler):
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
