"""bots-job2queue: put a job on the Bots job queue; and the client API for other programs.

Runs from schedulers every few minutes, so it imports only what it needs.
"""
import os
import sys

from . import codes

JOBQUEUEMESSAGE2TXT = {
    codes.ADDED: 'OK, job is added to queue',
    codes.UNREACHABLE: 'Error, job not to jobqueue. Can not contact jobqueue-server',
    codes.NO_TASK: 'Error, no task to add to the job queue.',
    codes.NOT_AUTHORIZED: 'Error, task is not authorized to run by the job queue (see [jobqueue] authorized_tasks '
                          'in bots.ini).',
    codes.DUPLICATE: 'Duplicate job, not added.',
}
DEFAULT_TIMEOUT = 10      # seconds; a server that does not answer in time counts as unreachable

USAGE = '''\
This is "%(name)s" (%(version)s), part of the Bots job queue.
Places a job on the Bots job queue; the job queue server runs the jobs one
after the other, most urgent first.
Usage:
    %(name)s [-c<directory>] [-p<priority>] task [task-arguments]
Options:
    -c<directory>   directory for configuration files (default: config).
                    Given after the task, it is also passed on to the task.
    -p<priority>    priority of the job, 1-9 (default: 5; 1 is most urgent).
                    Only before the task: after it, every argument is the task's.
Exit codes:
    0 job added   1 cannot contact the job queue server (or bad option)
    2 no task     3 task not authorized   4 duplicate of a waiting job, not added
Examples:
    %(name)s bots-engine.py
    %(name)s -p1 python3 /usr/local/bin/bots-engine.py --new
    %(name)s -p3 bots-engine.py -cconfigprod myroute
'''


def send_job_to_jobqueue(task_args, priority=5, port=None, timeout=DEFAULT_TIMEOUT, host=None, secret=None):
    """Add a job to the queue of the running server; return its code.

    0 added (or the priority of a waiting duplicate changed), 1 server not
    reachable (or not answering within ``timeout``, or it refused the
    request), 2 no task, 3 task not authorized, 4 duplicate, not added.  Never
    raises for an unreachable server.  ``port`` defaults to the one in the
    loaded bots.ini (Bots' global configuration) or 28082; ``host`` and ``secret`` to its
    ``[jobqueue] host`` and ``secret`` (a server on another machine), else this machine.
    """
    if port is None:
        port = _configured_port()
    if host is None or secret is None:
        configured_host, configured_secret = _configured_server()
        host = configured_host if host is None else host
        secret = configured_secret if secret is None else secret
    return _send(task_args, priority, port, timeout, host, secret)[0]


def _send(task_args, priority, port, timeout, host, secret=''):
    """``(code, reason)``: the server's answer, and why it is 1 (else '')."""
    from . import rpcclient
    try:
        return rpcclient.addjob(port, task_args, priority, timeout=timeout, host=host, secret=secret), ''
    except Exception as exc:      # CallFailed, or a Fault (wrong types, a busy store): not added
        return codes.UNREACHABLE, getattr(exc, 'faultString', None) or str(exc) or type(exc).__name__


def _configured_port():
    """The port of Bots' own loaded configuration, when this runs inside Bots (the monitor)."""
    botsglobal = sys.modules.get('bots.botsglobal')
    ini = getattr(botsglobal, 'ini', None)
    if ini is not None:
        try:
            return ini.getint('jobqueue', 'port', codes.DEFAULT_PORT)
        except Exception:          # a foreign ini object: fall back to the documented default
            pass
    return codes.DEFAULT_PORT


def _configured_server():
    """``(host, secret)`` of Bots' own loaded configuration (the monitor's), else this machine."""
    botsglobal = sys.modules.get('bots.botsglobal')
    ini = getattr(botsglobal, 'ini', None)
    host, secret = '127.0.0.1', ''
    try:
        if ini is not None:
            def value(key):         # Bots' own ini objects raise for a missing key without a default
                return ini.get('jobqueue', key).strip() if ini.has_option('jobqueue', key) else ''
            host = value('host')
            host = '127.0.0.1' if host in ('', '0.0.0.0', '::', '*') else host
            secret, path = value('secret'), value('secret_file')
            if path and not secret:
                configdir = ini.get('directories', 'config') if ini.has_option('directories', 'config') else ''
                with open(os.path.join(configdir, os.path.expanduser(path)), encoding='utf-8') as handle:
                    secret = handle.readline().strip()
    except Exception:          # a foreign ini object, an unreadable file: this machine, no secret
        return '127.0.0.1', ''
    return host, secret


def parse_args(argv, name='bots-job2queue'):
    """``(configdir, priority, task)`` from the command line, Bots' rules; help: usage and exit 0."""
    from .configuration import HELP_OPTIONS, print_usage, split_configdir_option, usage_error
    configdir = None
    priority = 5
    task = []
    for arg in argv:
        if arg.startswith('-c') and not (task and arg == '-c'):
            # After the task, a bare '-c' is simply the task's (a shell's -c, say).
            configdir = split_configdir_option(arg)
            if task:
                task.append(arg)
        elif task:
            task.append(arg)
        elif arg.startswith('-p'):
            if not arg[2:]:
                raise usage_error('priority should be numeric (1=highest, 9=lowest), joined to -p: write -p3, '
                                  'not -p 3', name)
            try:
                priority = int(arg[2:])
            except ValueError:
                raise usage_error('priority should be numeric (1=highest, 9=lowest), not "%s"' % arg[2:], name)
            if not 1 <= priority <= 9:
                raise usage_error('priority should be from 1 (highest) to 9 (lowest), not %s' % priority, name)
        elif arg in HELP_OPTIONS:
            print_usage(USAGE, name)           # and exit 0, as every program does
        elif arg.startswith('-'):
            raise usage_error('unknown option "%s" (options come before the task)' % arg, name)
        else:
            task.append(arg)
    return configdir, priority, task


def start():
    """Console script entry point."""
    import os
    from . import configuration
    name = os.path.basename(sys.argv[0])
    try:
        configdir, priority, task = parse_args(sys.argv[1:], name)
        environment = configuration.load(configdir, clock=False)
        timeout, port = environment.client_timeout, environment.port
        host, secret = environment.client_host, environment.secret
        configuration.say_if_bundled(environment, name)
    except configuration.ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    code, reason = _send(task, priority, port, timeout, host, secret)
    message = JOBQUEUEMESSAGE2TXT.get(code, 'Error, unexpected answer %r from the jobqueue-server' % (code,))
    if reason:                    # Bots' words, then where and why
        message += ' (%s: %s)' % ('port %s' % port if host == '127.0.0.1' else '%s port %s' % (host, port), reason)
    print(message, file=sys.stdout if code in (codes.ADDED, codes.DUPLICATE) else sys.stderr)
    sys.exit(code if code in JOBQUEUEMESSAGE2TXT else codes.UNREACHABLE)


if __name__ == '__main__':
    start()
