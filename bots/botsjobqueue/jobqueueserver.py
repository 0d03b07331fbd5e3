"""bots-jobqueueserver: keeps the queue of jobs and runs them, one (or nr_threads) at a time.

This module wires the parts together and owns the process: options, start-up
(restoring the stored queue), the one place where signals are handled, and
the shutdown.
"""
import gc
import os
import socket
import sys
import threading
import time
import types

from . import botslog, configuration, instance
from .admission import Admission
from .authorize import Authorizer
from .httphead import SecretRule
from .jobqueue import Job, JobQueue, canonical_task
from .jobstates import JobStates
from .launcher import Launcher, LaunchSettings
from .metrics import Metrics
from .report import Reporter, read_mail_settings
from .rpcserver import JobQueueRPCServer, RPCSettings, listen
from .rpcservice import JobQueueService
from .schedule import Scheduler, read_schedules
from .signals import Signals
from .statuspage import StatusPages
from .storechoice import kind_of_store, open_store

# Bots 4's own bots-job2queue (beside this server it is Bots', inside Bots ours replaces it) reads
# this name from the server's module: the engine's bare name and where the PATH has it.
AUTHORIZED_TASKS = ['bots-engine'] + sorted({os.path.join(directory, 'bots-engine') for directory in
                                             os.environ.get('PATH', '').split(os.pathsep) if directory
                                             and os.path.isfile(os.path.join(directory, 'bots-engine'))})

USAGE = '''\
This is "%(name)s" (%(version)s), the job queue server of Bots.
Runs the jobs put on the queue (by bots-job2queue, the monitor's Run menu or
bots-dirmonitor) one after the other: only one bots-engine at a time, no job
lost, the next started as soon as the previous one ends.  Enable it in
bots.ini ([jobqueue] enabled = True).
Usage:
    %(name)s [-c<directory>]
Options:
    -c<directory>   directory for configuration files (default: config).
Signals:
    SIGTERM, SIGINT (Ctrl-C), SIGBREAK (Ctrl-Break, Windows): stop.  No new
        jobs are accepted; running jobs get [jobqueue] shutdown_grace seconds to
        finish, then are stopped and kept for the next start.  A second stop
        signal stops them at once (they are kept all the same).
    SIGHUP: read bots.ini again (authorized tasks, limits, timings); a
        bots.ini with errors is logged and the one in use is kept.
Exit codes: 0 stopped normally; 1 cannot start (configuration, port in use).
'''


def restore_queue(store, queue, launcher, logger):
    """Put the stored jobs back: waiting ones in order; running ones waited for or queued again.
    A job the store has as waiting runs all the same when a held lock file names it (the server
    died between its start and storing it: see ``processes.RunLocks``)."""
    running, unstored = [], []
    claims = launcher.locks.claims() if launcher.claims_after_start else {}

    def waiting():
        for item in store.load():
            claim = claims.get(item.jobnumber)
            if item.state != 'running' and claim is not None and claim[1:] == (item.requeued, item.locked):
                item = item._replace(state='running', runner=claim[0])
                unstored.append(item)
            if item.state == 'running':
                running.append(item)
            else:
                yield (Job(item.jobnumber, item.priority, canonical_task(item.task), item.requeued, item.locked),
                       item.not_before if item.state == 'delayed' else None)

    gc.disable()          # 100,000 new objects would set off collection after collection
    count = queue.restore(waiting())
    for item in unstored:
        store.set_running(item.jobnumber, None, item.runner)
    for item in running:
        if launcher.still_runs(item):
            launcher.adopt(item)
        elif item.requeued == 0:
            logger.warning('Job %s was running when the server stopped and did not finish; queued again: %s',
                           item.jobnumber, item.task)
            queue.wait_again(Job(item.jobnumber, item.priority, canonical_task(item.task), 1, item.locked))
        else:
            logger.error('Job %s was cut off by a server stop again; not queued a third time: %s',
                         item.jobnumber, item.task)
            store.finish(item, item.started, None, None, 'lost', '')
    # What was restored lives as long as the server: keep the garbage collector from scanning it again
    # and again (gc.freeze, for long-lived objects created at start-up).
    gc.freeze()
    gc.enable()
    return count + len(running)


RESTART_ONLY = (('jobqueue', 'host'), ('jobqueue', 'port'), ('directories', 'botssys'), ('jobqueue', 'nr_threads'),
                ('jobqueue', 'output_limit'), ('jobqueue', 'log_file_level'), ('jobqueue', 'log_console_level'),
                ('jobqueue', 'log_file_number'), ('jobqueue', 'log_console'), ('jobqueue', 'store'),
                ('jobqueue', 'lease_ttl'), ('jobqueue', 'lease_margin'), ('jobqueue', 'fence_grace'))


def reload(parts):
    """Read bots.ini again (SIGHUP): authorized tasks, limits and timings change at once; the
    rest is named and waits for a restart.  A configuration that cannot be read changes nothing."""
    logger, old = parts.logger, parts.environment
    try:
        new = configuration.load(old.configdir)
        checked = read_configuration(new)
        rpc_settings, launch_settings = checked.rpc, checked.launch
        authorizer, schedules = checked.authorizer, checked.schedules
    except configuration.ConfigError as exc:
        logger.error('Reload refused; the configuration in use is kept. %s', exc)
        return
    for section, key in RESTART_ONLY:
        if new.ini.get(section, key, None) != old.ini.get(section, key, None):
            logger.warning('[%s] %s changed; it takes effect at the next start.', section, key)
    rpc_settings.host, rpc_settings.port = parts.server.settings.host, parts.server.settings.port
    for name in ('nr_threads', 'output_limit', 'outputdir', 'lockdir'):
        setattr(launch_settings, name, getattr(parts.launcher.settings, name))
    parts.server.settings = rpc_settings
    parts.server.secrets = SecretRule(rpc_settings.secret, rpc_settings.require_secret)
    parts.service.reconfigure(rpc_settings, authorizer)
    parts.launcher.settings = launch_settings
    parts.launcher.authorizer = authorizer
    parts.scheduler.replace(schedules)
    parts.environment = new
    logger.log(botslog.STARTINFO, 'Bots jobqueue configuration reloaded from "%s".', new.configdir)
    for problem in authorizer.problems:
        logger.warning(problem)


def next_schedule_text(scheduler):
    upcoming = scheduler.first()
    if upcoming is None:
        return 'none (all disabled)'
    return '[%s] at %s' % (upcoming[1], time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(upcoming[0])))


def shut_down(parts, signals):
    """Accept no more jobs; give running jobs shutdown_grace seconds (a second stop signal cuts it
    short); stop what still runs and keep it for the next start.  Until then the port stays open:
    reads are answered (``status`` says the server is stopping) and adds are refused with why."""
    logger, launcher = parts.logger, parts.launcher
    logger.log(botslog.STARTINFO, 'Bots jobqueue stops: no new jobs are accepted.')
    parts.scheduler.stop()
    grace = parts.environment.ini.getfloat('jobqueue', 'shutdown_grace', 60)
    deadline = time.monotonic() + grace
    running = launcher.running_numbers()
    parts.service.stopping = (deadline, running)
    launcher.close()
    launcher.on_idle = lambda: signals.put('idle')
    if running:
        logger.log(botslog.STARTINFO, 'Waiting up to %s seconds for running job(s) %s to finish; stop again '
                   '(Ctrl-C, SIGTERM) to stop them now - stopped jobs run again at the next start.',
                   '%g' % grace, ', '.join(map(str, running)))
    while running and time.monotonic() < deadline:
        action = signals.next(timeout=min(10.0, deadline - time.monotonic()))
        running = launcher.running_numbers()
        parts.service.stopping = (deadline, running)
        if action == 'stop' and running:
            logger.warning('Asked to stop again: stopping running job(s) %s now.', ', '.join(map(str, running)))
            parts.service.stopping = (time.monotonic() + launcher.settings.kill_grace, running)
            break
        if action is None and running and time.monotonic() < deadline:
            logger.log(botslog.STARTINFO, 'Still waiting for running job(s) %s; %d seconds left.',
                       ', '.join(map(str, running)), deadline - time.monotonic())
    launcher.stop_running()
    if parts.cluster is not None:
        parts.cluster.stop()
    parts.server.shutdown()
    parts.server.server_close()


def join_cluster(environment, store, queue, launcher, scheduler, logger, rpc_settings, seq):
    """A server of a shared store (cluster.py): follow the queue, stand by, lead when chosen."""
    from .cluster import ClusterSettings, Follower, Leadership, address_of
    from .fence import Fence
    fence = Fence(logger)
    launcher.fence = fence
    leadership = Leadership(store, ClusterSettings(environment.ini), fence, logger,
                            address_of(rpc_settings.host, rpc_settings.port))
    follower = Follower(store, queue, logger, seq)
    scheduler.may_fire = lambda: leadership.leading

    def lead():
        follower.catch_up()
        for item in store.claim_running():
            # Started by a server that led before: its fence ended it before our lease could begin.
            if launcher.get(item.jobnumber) is None:
                logger.warning('Job %s was running at the server that led before; queued again: %s',
                               item.jobnumber, item.task)
                queue.wait_again(Job(item.jobnumber, item.priority, canonical_task(item.task), item.requeued + 1,
                                     item.locked))
        queue.lead(True)
        scheduler.catch_up()

    leadership.on_lead.append(lead)
    leadership.on_held.append(lambda: queue.lead(True))
    leadership.on_lose.append(lambda: queue.lead(False))

    def stop():
        follower.stop()
        leadership.stop()
        fence.close()

    follower.start()
    leadership.start()
    return types.SimpleNamespace(leadership=leadership, follower=follower, fence=fence, stop=stop)


def read_configuration(environment):
    """Every value the server takes from bots.ini, read and checked at once: at start before the
    port is taken (a wrong value is said first, whoever holds the port), and at a reload.
    Raises ConfigError."""
    ini = environment.ini
    parts = types.SimpleNamespace(rpc=RPCSettings(environment), launch=LaunchSettings(environment),
                                  schedules=read_schedules(environment),
                                  authorizer=Authorizer.for_environment(environment),
                                  shutdown_grace=ini.getfloat('jobqueue', 'shutdown_grace', 60),
                                  history=ini.getint('jobqueue', 'history', 500),
                                  sendreportiferror=ini.getboolean('settings', 'sendreportiferror', False))
    botslog.check(ini, 'jobqueue')
    return parts


def serve(environment, signals):
    """Run the server until a signal asks it to stop.  Raises ConfigError when it cannot start."""
    checked = read_configuration(environment)
    rpc_settings, schedules, authorizer = checked.rpc, checked.schedules, checked.authorizer
    try:
        # First of all: a second server refused here leaves nothing behind (no lock, no log).
        listener = listen(rpc_settings)
    except OSError as exc:
        raise configuration.ConfigError('Error: cannot listen on %s port %s (%s); is another bots-jobqueueserver '
                                        'running?' % (rpc_settings.host, rpc_settings.port, exc.strerror or exc))
    launch_settings = checked.launch
    jobdir = os.path.join(environment.botssys, 'jobqueue')
    if kind_of_store(environment.ini) == 'database':
        # Servers of a shared store may share botssys (a network volume): each keeps its own part.
        jobdir = os.path.join(jobdir, socket.gethostname())
        launch_settings.outputdir = os.path.join(jobdir, 'output')
        launch_settings.lockdir = os.path.join(jobdir, 'running')
    lock = instance.hold(jobdir, 'bots-jobqueueserver', environment.botssys)
    logger = botslog.init(environment, 'jobqueue')
    server = JobQueueRPCServer(rpc_settings, logger, listener)
    logger.log(botslog.STARTINFO, 'Bots jobqueue started.')
    logger.log(botslog.STARTINFO, 'Bots jobqueue configdir: "%s".', environment.configdir)
    botslog.log_installation(environment, logger, 'Bots jobqueue')
    logger.log(botslog.STARTINFO, 'Bots jobqueue listens for xmlrpc at %s port %s.',
               rpc_settings.host, rpc_settings.port)
    if rpc_settings.host not in ('127.0.0.1', 'localhost', '::1'):
        if rpc_settings.secret:
            logger.warning('Listening on %s, not only on this machine: other machines can queue jobs, with the '
                           'shared secret.', rpc_settings.host)
        else:
            logger.warning('Listening on %s, but no shared secret is set ([jobqueue] secret): clients of other '
                           'machines are refused.', rpc_settings.host)
    for problem in authorizer.problems + configuration.unknown_keys(environment.ini, ('jobqueue', 'schedule')):
        logger.warning(problem)
    if authorizer.allow_all:
        logger.warning('authorized_tasks = *: any local user can run any program through the job queue.')
    reporter = Reporter(checked.sendreportiferror, read_mail_settings(environment.configdir), logger)
    store = open_store(environment, checked.history, logger)
    shared = getattr(store, 'shared', False)
    queue = JobQueue(store, rpc_settings.max_queue_bytes)
    launcher = Launcher(queue, store, authorizer, launch_settings, logger, reporter)
    if shared:
        logger.log(botslog.STARTINFO, 'Bots jobqueue keeps its queue in the database %s, shared with the other '
                   'servers of this environment; it stands by until it leads.', store.url)
        stored, seq = store.load()
        queue.lead(False)
        queue.reload(stored)
        count = len(queue)
        recovered = []
    else:
        count = restore_queue(store, queue, launcher, logger)
        recovered = launcher.recover_outputs()
    if recovered:
        logger.warning('Job(s) %s ended just before the server stopped; recorded as finished, their output '
                       'kept now.', ', '.join(map(str, recovered)))
    if count:
        logger.log(botslog.STARTINFO, 'Restored %d stored job(s); %d waiting.', count, len(queue))
    metrics = Metrics()
    states = JobStates(queue, launcher, store)
    admission = Admission(queue, store, authorizer, logger, metrics)
    service = JobQueueService(queue, states, store, admission, rpc_settings, logger, launcher.runners_alive)
    server.register_service(service)
    server.pages = StatusPages(service, states, store, metrics).routes()
    metrics.state = service.health
    launcher.metrics = metrics
    if store.setting('paused'):
        queue.pause(True)
        logger.log(botslog.STARTINFO, 'The queue is paused (since %s): no job starts until "bots-jobqueue resume".',
                   time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(store.setting('paused')))))
    scheduler = Scheduler(schedules, store, lambda schedule: admission.add(schedule.task, schedule.priority,
                                                                          schedule.name), logger,
                          may_fire=(lambda: False) if shared else None)     # a standby fires nothing
    service.scheduler = scheduler
    scheduler.metrics = metrics
    if schedules:
        logger.log(botslog.STARTINFO, 'Bots jobqueue runs %d schedule(s); the next: %s.', len(schedules),
                   next_schedule_text(scheduler))
    # What a reload changes, and what the shutdown stops.
    parts = types.SimpleNamespace(environment=environment, server=server, service=service, launcher=launcher,
                                  scheduler=scheduler, logger=logger, cluster=None)
    if shared:
        parts.cluster = join_cluster(environment, store, queue, launcher, scheduler, logger, rpc_settings, seq)
        service.leadership = parts.cluster.leadership
    launcher.start()
    scheduler.start()
    threading.Thread(target=server.serve_forever, name='rpc', daemon=True).start()
    while signals.next() == 'reload':
        reload(parts)
    shut_down(parts, signals)
    reporter.flush()
    logger.log(botslog.STARTINFO, 'Bots jobqueue stopped; %d job(s) wait for the next start.', len(queue))
    store.close()
    lock.close()


def start():
    """Console script entry point."""
    name = os.path.basename(sys.argv[0])
    signals = Signals({'SIGTERM': 'stop', 'SIGINT': 'stop', 'SIGBREAK': 'stop', 'SIGHUP': 'reload'})
    try:
        environment = configuration.load(configuration.configdir_from_args(sys.argv[1:], name, USAGE))
        serve(environment, signals)
    except configuration.ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


if __name__ == '__main__':
    start()
