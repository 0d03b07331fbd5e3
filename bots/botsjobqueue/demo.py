"""bots-jobqueue-demo: a harmless stand-in for bots-engine, to try the job queue without Bots.

The bundled configuration names it as the engine, so that a first job queued
by hand, by the directory monitor or by a schedule really runs and shows up
in the log.  It prints what it was started with, waits ``--sleep=S`` seconds
when asked (to watch a running job), and ends with exit code 0 - or
``--exit=N``.  It reads and changes nothing.
"""
import os
import sys
import time

USAGE = '''\
This is "%(name)s": a stand-in for bots-engine that only says it ran.
Usage:
    %(name)s [--sleep=S] [--exit=N] [any other arguments, printed]
Exit codes: 0, or N of --exit=N.
'''


def start():
    """Console script entry point."""
    args = sys.argv[1:]
    name = os.path.basename(sys.argv[0])
    if any(arg in ('-h', '--help', '?', '/?') for arg in args):
        print(USAGE % {'name': name}, end='')
        return
    sleep, exitcode = 0.0, 0
    try:
        for arg in args:
            if arg.startswith('--sleep='):
                sleep = float(arg[len('--sleep='):])
            elif arg.startswith('--exit='):
                exitcode = int(arg[len('--exit='):])
    except ValueError:
        print('Error: --sleep takes seconds and --exit a whole number; see %s --help' % name, file=sys.stderr)
        sys.exit(1)
    print('%s ran (pid %d) with arguments: %s' % (name, os.getpid(), ' '.join(args) or '(none)'), flush=True)
    time.sleep(sleep)
    print('%s done after %g seconds, exit code %d.' % (name, sleep, exitcode), flush=True)
    sys.exit(exitcode)


if __name__ == '__main__':
    start()
