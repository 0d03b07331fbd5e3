"""bots-jobqueue: what the job queue server is doing, for operators.

Asks the running server over XML-RPC; ``--json`` prints the answer for scripts.
"""
import datetime
import json
import os
import sys
import xmlrpc.client

from . import __version__, configuration, rpcclient

USAGE = '''\
This is "%(name)s" version %(version)s: look at and manage the Bots job queue.
Usage:
    %(name)s [-c<directory>] [--json] [--all] status  running jobs, the first 100 waiting (--all: every one)
    %(name)s [-c<directory>] [--json] history [N]   the last N finished jobs (default 20)
    %(name)s [-c<directory>] [--json] show N        one job, with its output when finished
    %(name)s [-c<directory>] remove N               remove waiting job N
    %(name)s [-c<directory>] clear                  remove all waiting jobs
Exit codes: 0 done; 1 cannot contact the server, or bad usage; 2 no such job.
'''


class Client:
    """The server's XML-RPC methods, with a timeout."""

    def __init__(self, port, timeout):
        self.port = port
        self.timeout = timeout

    def call(self, method, *params):
        return rpcclient.call(self.port, method, *params, timeout=self.timeout)


def when(timestamp):
    return datetime.datetime.fromtimestamp(timestamp).strftime('%Y-%m-%d %H:%M:%S') if timestamp else '-'


def duration(seconds):
    return str(datetime.timedelta(seconds=int(seconds))) if seconds is not None else '-'


def task_text(task):
    return ' '.join(task)


def print_status(answer):
    running, waiting = answer['running'], answer['waiting']
    more = answer['waiting_count'] - len(waiting)
    print('Running (%d):' % len(running))
    if running:
        print('  %-6s %-8s %-10s %s' % ('JOB', 'PID', 'FOR', 'TASK'))
        for job in running:
            print('  %-6s %-8s %-10s %s' % (job['jobnumber'], job['pid'], duration(job['running_for']),
                                             task_text(job['task'])))
    print('Waiting (%d):' % answer['waiting_count'])
    if waiting:
        print('  %-6s %-4s %s' % ('JOB', 'PRIO', 'TASK'))
        for priority, jobnumber, task in waiting:
            print('  %-6s %-4s %s' % (jobnumber, priority, task_text(task)))
    if more > 0:
        print('  ... and %d more (bots-jobqueue status --all)' % more)


def print_history(records):
    print('%-6s %-4s %-19s %-9s %-6s %-12s %s' % ('JOB', 'PRIO', 'STARTED', 'DURATION', 'EXIT', 'STATUS', 'TASK'))
    for record in records:
        took = record['ended'] - record['started'] if 'ended' in record and 'started' in record else None
        print('%-6s %-4s %-19s %-9s %-6s %-12s %s' % (
            record['jobnumber'], record['priority'], when(record.get('started')), duration(took),
            record.get('exitcode', '-'), record['status'], task_text(record['task'])))


def print_job(job):
    for key in ('jobnumber', 'state', 'priority', 'pid', 'status', 'exitcode'):
        if key in job:
            print('%-10s %s' % (key + ':', job[key]))
    print('%-10s %s' % ('task:', task_text(job['task'])))
    for key in ('started', 'ended'):
        if key in job:
            print('%-10s %s' % (key + ':', when(job[key])))
    if job.get('output'):
        print('output:')
        print(job['output'].rstrip('\n'))


def start():
    """Console script entry point."""
    name = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    configdir = 'config'
    as_json = False
    show_all = False
    words = []
    for arg in args:
        if arg in configuration.HELP_OPTIONS:
            print(USAGE % {'name': name, 'version': __version__})
            sys.exit(0)
        elif arg == '--json':
            as_json = True
        elif arg == '--all':
            show_all = True
        elif arg.startswith('-c'):
            try:
                configdir = configuration.split_configdir_option(arg)
            except configuration.ConfigError as exc:
                sys.exit(_fail(str(exc)))
        else:
            words.append(arg)
    command, params = (words[0], words[1:]) if words else ('status', [])
    try:
        environment = configuration.load(configdir)
        environment.require_jobqueue_enabled()
        timeout = environment.ini.getfloat('jobqueue', 'client_timeout', 10)
        numbers = [int(param) for param in params]
    except configuration.ConfigError as exc:
        sys.exit(_fail(str(exc)))
    except ValueError:
        sys.exit(_fail('Error: job numbers and counts are whole numbers; see %s --help' % name))
    client = Client(environment.port, timeout)
    try:
        sys.exit(run(client, command, numbers, as_json, name, show_all))
    except xmlrpc.client.Fault as fault:
        sys.exit(_fail('Error: the jobqueue-server refused: %s' % fault.faultString))
    except rpcclient.CallFailed as exc:
        sys.exit(_fail('Error: cannot contact the jobqueue-server on port %s (%s)' % (environment.port, exc)))


def all_waiting(client):
    """Every waiting job, read page by page (one answer of the server is bounded)."""
    jobs = []
    while True:
        page = client.call('listjobs', len(jobs))
        if not page:
            return jobs
        jobs.extend(page)


def run(client, command, numbers, as_json, name, show_all=False):
    if command == 'status' and not numbers:
        answer = client.call('status', 100)
        if show_all:
            answer['waiting'] = all_waiting(client)
        print(json.dumps(answer, indent=2)) if as_json else print_status(answer)
        return 0
    if command == 'history' and len(numbers) <= 1:
        records = client.call('history', numbers[0] if numbers else 20)
        print(json.dumps(records, indent=2)) if as_json else print_history(records)
        return 0
    if command == 'show' and len(numbers) == 1:
        job = client.call('showjob', numbers[0])
        if not job:
            return _fail('No job %s (not waiting, not running, not in the history).' % numbers[0], 2)
        print(json.dumps(job, indent=2)) if as_json else print_job(job)
        return 0
    if command == 'remove' and len(numbers) == 1:
        if client.call('removejob', numbers[0]) != 0:
            return _fail('No waiting job %s.' % numbers[0], 2)
        print('Removed waiting job %s.' % numbers[0])
        return 0
    if command == 'clear' and not numbers:
        client.call('clearjobq')
        print('Removed all waiting jobs.')
        return 0
    return _fail('Error: unknown command "%s"; see %s --help' % (' '.join([command] + [str(n) for n in numbers]),
                                                                  name))


def _fail(message, code=1):
    print(message, file=sys.stderr)
    return code


if __name__ == '__main__':
    start()
