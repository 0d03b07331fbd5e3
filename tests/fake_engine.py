#!/usr/bin/env python3
"""A small stand-in for bots-engine, for the tests.

Records each run in the file named by $FAKE_ENGINE_RECORD, one JSON line
when it starts and one when it ends (argv, pid, times), and behaves as its arguments say:
``--sleep=S`` runs S seconds, ``--exit=N`` ends with exit code N,
``--print=N`` writes N bytes of output (``--late-print=N``: after the
sleep), ``--bytes=HEX`` writes the bytes HEX spells, ``--kill-once=F:PID:MS`` kills
process PID with SIGKILL MS milliseconds after this run ends (only when file F
does not exist yet; it is created), ``--exit-file=F`` reads the exit
code from file F (so a test can change it between runs), ``--lock=F`` holds an exclusive
lock on file F while it runs: should another run hold it already - two engines at once - the
overlap is written to F.overlaps, and this run waits for the lock.
"""
import json
import os
import sys
import time


def _record(path, entry):
    if path:
        with open(path, 'a') as handle:
            handle.write(json.dumps(entry) + '\n')


def write_output(size):
    line = b'x' * 1023 + b'\n'
    while size > 0:
        chunk = line * min(64, (size + 1023) // 1024)
        sys.stdout.buffer.write(chunk[:size])
        size -= len(chunk)
    sys.stdout.flush()


def hold_lock(path, argv):
    import fcntl
    handle = open(path, 'a')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(path + '.overlaps', 'a') as overlaps:
            overlaps.write(json.dumps({'argv': argv, 'pid': os.getpid(), 'time': time.time()}) + '\n')
        fcntl.flock(handle, fcntl.LOCK_EX)
    LOCKS.append(handle)       # held until the process ends


LOCKS = []


def main(argv):
    record = os.environ.get('FAKE_ENGINE_RECORD')
    started = time.time()
    sleep, exitcode, output, late_output, raw, kill_once = 0.0, 0, 0, 0, b'', None
    for arg in argv:
        if arg.startswith('--sleep='):
            sleep = float(arg[8:])
        elif arg.startswith('--exit='):
            exitcode = int(arg[7:])
        elif arg.startswith('--print='):
            output = int(arg[8:])
        elif arg.startswith('--late-print='):
            late_output = int(arg[13:])
        elif arg.startswith('--kill-once='):
            kill_once = arg[12:].rsplit(':', 2)
        elif arg.startswith('--bytes='):
            raw = bytes.fromhex(arg[8:])
        elif arg.startswith('--lock='):
            hold_lock(arg[7:], argv)
        elif arg.startswith('--exit-file='):
            with open(arg[12:]) as handle:
                exitcode = int(handle.read().strip() or 0)
    _record(record, {'event': 'start', 'argv': argv, 'pid': os.getpid(), 'time': started})
    print('fake engine started: %s' % ' '.join(argv), flush=True)
    write_output(output)
    sys.stdout.buffer.write(raw)
    sys.stdout.flush()
    time.sleep(sleep)
    write_output(late_output)
    _record(record, {'event': 'end', 'argv': argv, 'pid': os.getpid(), 'start': started, 'time': time.time()})
    print('fake engine done', file=sys.stderr, flush=True)
    if kill_once and not os.path.exists(kill_once[0]):
        open(kill_once[0], 'w').close()
        if os.fork() == 0:          # holds nothing of the job's (its output, its lock): only the timing
            os.closerange(0, 65536)
            time.sleep(int(kill_once[2]) / 1000.0)
            os.kill(int(kill_once[1]), 9)
            os._exit(0)
    return exitcode


if __name__ == '__main__':
    if 'faketime' in os.environ.get('LD_PRELOAD', ''):
        # A test gives the server a clock of its own (libfaketime); the jobs keep the machine's.
        del os.environ['LD_PRELOAD']
        os.execv(sys.executable, [sys.executable] + sys.argv)
    sys.exit(main(sys.argv[1:]))
