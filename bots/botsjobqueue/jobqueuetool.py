"""bots-jobqueue: what the job queue server is doing, for operators.

Asks the running server over XML-RPC; ``--json`` prints the answer for scripts.
"""
import datetime
import json
import os
import sys
import xmlrpc.client

from . import configuration, rpcclient

USAGE = '''\
This is "%(name)s" (%(version)s): look at and manage the Bots job queue.
Usage:
    %(name)s [-c<directory>] [--json] [--all] status  running jobs, the first 100 waiting (--all: every one)
    %(name)s [-c<directory>] [--json] history [N]   the last N finished jobs (default 20)
    %(name)s [-c<directory>] [--json] show N        one job, with its output when finished
    %(name)s [-c<directory>] [--json] schedules     the [scheduleN] sections: next and last run
    %(name)s [-c<directory>] remove N               remove waiting job N
    %(name)s [-c<directory>] clear                  remove all waiting jobs
    %(name)s [-c<directory>] pause                  start no new job; running ones finish, adds go on
    %(name)s [-c<directory>] resume                 start jobs again (a pause is kept across restarts)
Exit codes: 0 done; 1 cannot contact the server, or bad usage; 2 no such job.
'''


class Client:
    """The server's XML-RPC methods, with a timeout."""

    def __init__(self, port, timeout, host='127.0.0.1', secret=''):
        self.port = port
        self.timeout = timeout
        self.host = host
        self.secret = secret

    def call(self, method, *params):
        return rpcclient.call(self.port, method, *params, timeout=self.timeout, host=self.host, secret=self.secret)


def when(timestamp):
    return datetime.datetime.fromtimestamp(timestamp).strftime('%Y-%m-%d %H:%M:%S') if timestamp else '-'


def duration(seconds):
    return str(datetime.timedelta(seconds=int(round(seconds)))) if seconds is not None else '-'


def task_text(task):
    return ' '.join(task)


def print_cluster(cluster):
    """Who leads a shared store, and who stands by."""
    if cluster.get('error'):
        print('Shared store: %s' % cluster['error'])
        return
    me = cluster.get('server')
    for server in cluster.get('servers', []):
        here = ' (this server)' if server['name'] == me else ''
        if server['leads']:
            print('Leader: %s at %s%s, since %s (term %s)' % (server['name'], server['address'], here,
                                                              when(cluster.get('leader_since')), cluster.get('term')))
    if not cluster.get('leader'):
        print('Leader: none now (a standby takes over when the last lease has expired)')
    for server in cluster.get('servers', []):
        if not server['leads']:
            here = ' (this server)' if server['name'] == me else ''
            print('Standby: %s at %s%s, seen %s' % (server['name'], server['address'], here, when(server['seen'])))


def print_status(answer):
    running, waiting = answer['running'], answer['waiting']
    if answer.get('cluster'):
        print_cluster(answer['cluster'])
    if answer.get('stopping'):
        print('The server is %s; new jobs are refused until it runs again.' % answer['stopping'])
    if answer.get('paused'):
        print('PAUSED: no new job starts until "bots-jobqueue resume".')
    more = answer['waiting_count'] - len(waiting)
    print('Running (%d):' % len(running))
    if running:
        print('  %-6s %-8s %-10s %s' % ('JOB', 'PID', 'FOR', 'TASK'))
        for job in running:
            print('  %-6s %-8s %-10s %s%s' % (job['jobnumber'], job.get('pid', '-'), duration(job['running_for']),
                                               task_text(job['task']),
                                               '  (at %s)' % job['server'] if job.get('server') else ''))
    print('Waiting (%d):' % answer['waiting_count'])
    retry_at = answer.get('retry_at', {})
    if waiting:
        print('  %-6s %-4s %s' % ('JOB', 'PRIO', 'TASK'))
        for priority, jobnumber, task in waiting:
            retry = retry_at.get(str(jobnumber))
            print('  %-6s %-4s %s%s' % (jobnumber, priority, task_text(task),
                                       '  (engine database was locked; retried at %s)' % when(retry) if retry else ''))
    if more > 0:
        print('  ... and %d more (bots-jobqueue status --all)' % more)
    upcoming = answer.get('next_schedule')
    if upcoming:
        print('Next scheduled run: [%s] at %s' % (upcoming['schedule'], when(upcoming['at'])))


def print_schedules(schedules):
    if not schedules:
        print('No schedules: add [scheduleN] sections to bots.ini.')
        return
    print('%-14s %-16s %-19s %-19s %-22s %s' % ('SCHEDULE', 'WHEN', 'NEXT RUN', 'LAST RUN', 'LAST RESULT', 'TASK'))
    for entry in schedules:
        last = entry.get('last_result', '-')
        if 'last_job' in entry:
            last = 'job %s: %s' % (entry['last_job'], last)
        print('%-14s %-16s %-19s %-19s %-22s %s' % (
            entry['schedule'], entry['when'], when(entry.get('next_run')) if entry['enabled'] else 'disabled',
            when(entry.get('last_run')), last, task_text(entry['task'])))


def print_history(records):
    print('%-6s %-4s %-19s %-9s %-6s %-12s %s' % ('JOB', 'PRIO', 'STARTED', 'DURATION', 'EXIT', 'STATUS', 'TASK'))
    for record in records:
        took = record['ended'] - record['started'] if 'ended' in record and 'started' in record else None
        print('%-6s %-4s %-19s %-9s %-6s %-12s %s' % (
            record['jobnumber'], record['priority'], when(record.get('started')), duration(took),
            record.get('exitcode', '-'), tries(record), task_text(record['task'])))


def tries(record):
    """The status of a finished job, with the number of its runs when it ran more than once."""
    runs = len(record.get('attempts', ())) + 1
    return record['status'] if runs == 1 else '%s (run %d)' % (record['status'], runs)


def print_job(job):
    for key in ('jobnumber', 'state', 'priority', 'schedule', 'pid', 'status', 'exitcode'):
        if key in job:
            print('%-10s %s' % (key + ':', job[key]))
    print('%-10s %s' % ('task:', task_text(job['task'])))
    for key in ('started', 'ended'):
        if key in job:
            print('%-10s %s' % (key + ':', when(job[key])))
    for attempt in job.get('attempts', ()):
        print('%-10s %s, exit code %s (queued again)' % ('earlier:', when(attempt.get('started')),
                                                         attempt.get('exitcode', '-')))
        if attempt.get('output'):
            print('  ' + attempt['output'].rstrip('\n').replace('\n', '\n  '))
    if job.get('output'):
        print('output:')
        print(job['output'].rstrip('\n'))


# command: (how many numbers it takes at least, at most, what they are)
COMMANDS = {'status': (0, 0, ''), 'history': (0, 1, '[N]'), 'show': (1, 1, 'N'), 'remove': (1, 1, 'N'),
            'clear': (0, 0, ''), 'schedules': (0, 0, ''), 'pause': (0, 0, ''), 'resume': (0, 0, '')}


def parse_args(args, name):
    """``(configdir, as_json, show_all, command, numbers)``; help: usage and exit 0.  Raises ConfigError."""
    configdir, as_json, show_all, words = None, False, False, []
    for arg in args:
        if arg in configuration.HELP_OPTIONS:
            configuration.print_usage(USAGE, name)      # and exit 0, as every program does
        elif arg == '--json':
            as_json = True
        elif arg == '--all':
            show_all = True
        elif arg.startswith('-c'):
            configdir = configuration.split_configdir_option(arg)
        elif arg.startswith('-') and not arg[1:].isdigit():
            raise configuration.usage_error('unknown option "%s"' % arg, name)
        else:
            words.append(arg)
    command, params = (words[0], words[1:]) if words else ('status', [])
    if command not in COMMANDS:
        raise configuration.usage_error('unknown command "%s"' % command, name)
    least, most, what = COMMANDS[command]
    if not least <= len(params) <= most:
        if most == 0:
            raise configuration.usage_error('"%s" takes no arguments' % command, name)
        raise configuration.usage_error('write "%s %s %s"' % (name, command, what)
                                        + (' (a job number)' if what == 'N' else ''), name)
    numbers = []
    for param in params:
        try:
            numbers.append(int(param))
        except ValueError:
            raise configuration.usage_error('"%s %s" needs a whole number, not "%s"' % (command, what, param), name)
    return configdir, as_json, show_all, command, numbers


def start():
    """Console script entry point."""
    name = os.path.basename(sys.argv[0])
    try:
        configdir, as_json, show_all, command, numbers = parse_args(sys.argv[1:], name)
        environment = configuration.load(configdir)
        configuration.say_if_bundled(environment, name)
        timeout, port = environment.client_timeout, environment.port
        host, secret = environment.client_host, environment.secret
    except configuration.ConfigError as exc:
        sys.exit(_fail(str(exc)))
    client = Client(port, timeout, host, secret)
    try:
        code = run(client, command, numbers, as_json, show_all)
        sys.stdout.flush()
        sys.exit(code)
    except BrokenPipeError:
        configuration.stdout_gone()
    except xmlrpc.client.Fault as fault:
        sys.exit(_fail('Error: the jobqueue-server refused: %s' % fault.faultString))
    except rpcclient.CallFailed as exc:
        sys.exit(_fail('Error: cannot contact the jobqueue-server on %sport %s (%s)'
                       % ('' if host == '127.0.0.1' else host + ' ', port, exc)))


def all_waiting(client):
    """Every waiting job, read page by page (one answer of the server is bounded)."""
    jobs = []
    while True:
        page = client.call('listjobs', len(jobs))
        if not page:
            return jobs
        jobs.extend(page)


def run(client, command, numbers, as_json, show_all=False):
    """Carry out a command that ``parse_args`` has checked (its name and its numbers)."""
    if command == 'status':
        answer = client.call('status', 100)
        if show_all:
            answer['waiting'] = all_waiting(client)
        print(json.dumps(answer, indent=2)) if as_json else print_status(answer)
        return 0
    if command == 'schedules':
        schedules = client.call('schedules')
        print(json.dumps(schedules, indent=2)) if as_json else print_schedules(schedules)
        return 0
    if command == 'history':
        records = client.call('history', numbers[0] if numbers else 20)
        print(json.dumps(records, indent=2)) if as_json else print_history(records)
        return 0
    if command == 'show':
        job = client.call('showjob', numbers[0])
        if not job:
            return _fail('No job %s (not waiting, not running, not in the history).' % numbers[0], 2)
        print(json.dumps(job, indent=2)) if as_json else print_job(job)
        return 0
    if command == 'remove':
        if client.call('removejob', numbers[0]) != 0:
            return _fail('No waiting job %s.' % numbers[0], 2)
        print('Removed waiting job %s.' % numbers[0])
        return 0
    if command in ('pause', 'resume'):
        client.call(command)
        print('The queue is paused: no new job starts (running jobs finish; jobs are still accepted).'
              if command == 'pause' else 'The queue runs jobs again.')
        return 0
    client.call('clearjobq')                   # the one command left: clear
    print('Removed all waiting jobs.')
    return 0


def _fail(message, code=1):
    print(message, file=sys.stderr)
    return code


if __name__ == '__main__':
    start()
