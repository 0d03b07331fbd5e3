"""Benchmark of the Bots job queue: each figure against its reference, measured in the same run.

    .venv/bin/python tests/bench.py            # the table
    .venv/bin/python tests/bench.py --json     # the same figures as JSON
    .venv/bin/python tests/bench.py dispatch   # only some: addjob dispatch job2queue dirmonitor cluster ...

Needs the project installed in the running interpreter's environment (its
console scripts beside the interpreter), and task-spooler (``tsp``) for the
dispatch-gap reference; without tsp that reference is skipped, and said so.
Not collected by pytest.  Takes a few minutes on a 2-core machine.
"""
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import xmlrpc.client

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from bots.botsjobqueue.store import Store  # noqa: E402  (the product's own schema, to fill a queue quickly)

FAKE_ENGINE = os.path.join(HERE, 'fake_engine.py')
BIN = os.path.dirname(sys.executable)
DEPTH = 100000
CALLS = 2000

BARE_SERVER = textwrap.dedent('''
    import sys
    from xmlrpc.server import SimpleXMLRPCServer
    jobs = [[5, number, ['x', str(number)]] for number in range(int(sys.argv[2]))]
    server = SimpleXMLRPCServer(('127.0.0.1', int(sys.argv[1])), logRequests=False)
    def addjob(task, priority):
        jobs.append([priority, len(jobs) + 1, task])
        return 0
    server.register_function(addjob)
    server.serve_forever()
''')

CLIENT = textwrap.dedent('''
    import sys, time, xmlrpc.client
    port, calls, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    proxy = xmlrpc.client.ServerProxy('http://127.0.0.1:%d' % port)
    for number in range(50):
        proxy.addjob(prefix + ['warmup-%d' % number], 5)
    started = time.perf_counter()
    for number in range(calls):
        assert proxy.addjob(prefix + ['call-%d' % number], 5) == 0
    print(calls / (time.perf_counter() - started))
''')

# The floor of any launcher written in Python: the probe jobs one after the other with nothing
# but Popen (the same options as the server's) and wait - no queue, no store, no output kept.
BARE_LAUNCHER = textwrap.dedent('''
    import os, subprocess, sys
    probe, record, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for number in range(jobs):
        read_end, write_end = os.pipe()
        process = subprocess.Popen([probe, record, str(number)], stdin=subprocess.DEVNULL, stdout=write_end,
                                   stderr=write_end, close_fds=True, start_new_session=True)
        os.close(write_end)
        process.wait()
        os.close(read_end)
''')

PROBE = '#!/bin/sh\necho "S $(date +%s%N) $2" >> "$1"\necho "E $(date +%s%N) $2" >> "$1"\n'


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout=60, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    raise RuntimeError('timed out')


def answers(port):
    try:
        return xmlrpc.client.ServerProxy('http://127.0.0.1:%d' % port).addjob(['isup'], 5) == 0
    except (OSError, xmlrpc.client.Error):
        return False


def rss_mb(pid, field='VmHWM'):
    with open('/proc/%d/status' % pid) as handle:
        for line in handle:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024.0
    return float('nan')


class Environment:
    """A temporary Bots environment and a server started on it."""

    def __init__(self, root, ini_extra=''):
        self.root = root
        self.configdir = os.path.join(root, 'config')
        self.port = free_port()
        self.probe = os.path.join(root, 'probe.sh')
        self.record = os.path.join(root, 'runs.jsonl')
        os.makedirs(self.configdir)
        with open(self.probe, 'w') as handle:
            handle.write(PROBE)
        os.chmod(self.probe, 0o755)
        with open(os.path.join(self.configdir, 'bots.ini'), 'w') as handle:
            handle.write(textwrap.dedent('''\
                [settings]
                python_executable_path = {python}
                botsengine_path = {engine}
                [jobqueue]
                enabled = True
                port = {port}
                log_console = False
                authorized_tasks = {probe}
                ''').format(python=sys.executable, engine=FAKE_ENGINE, port=self.port, probe=self.probe)
                + ini_extra)
        self.env = dict(os.environ, FAKE_ENGINE_RECORD=self.record, PATH=BIN + os.pathsep + os.environ['PATH'])
        self.server = None

    def start_server(self):
        self.server = subprocess.Popen([os.path.join(BIN, 'bots-jobqueueserver'), '-c' + self.configdir],
                                       cwd=self.root, env=self.env)
        started = time.perf_counter()
        wait_for(lambda: answers(self.port))
        return time.perf_counter() - started

    def kill_server(self):
        self.server.send_signal(signal.SIGKILL)
        self.server.wait()

    def stop_server(self):
        self.server.send_signal(signal.SIGTERM)
        try:
            self.server.wait(30)
        except subprocess.TimeoutExpired:
            self.kill_server()

    def proxy(self):
        return xmlrpc.client.ServerProxy('http://127.0.0.1:%d' % self.port)

    def engine(self, *args):
        return [sys.executable, FAKE_ENGINE] + list(args)


def client_rate(port, prefix):
    output = subprocess.run([sys.executable, '-c', CLIENT, str(port), str(CALLS)] + prefix, capture_output=True,
                            text=True, check=True).stdout
    return float(output)


def bare_rate(depth):
    port = free_port()
    server = subprocess.Popen([sys.executable, '-c', BARE_SERVER, str(port), str(depth)])
    try:
        wait_for(lambda: _connects(port))
        return client_rate(port, ['x'])
    finally:
        server.kill()
        server.wait()


def _connects(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


def fill_store(environment, count, first=None):
    """Store ``count`` waiting jobs the way the server stores them, in one transaction (after the
    task ``first``, when given, as job 1 of priority 1: the first to run)."""
    path = os.path.join(environment.root, 'botssys', 'jobqueue.db')
    Store(path).close()
    with sqlite3.connect(path) as db:
        if first is not None:
            db.execute('INSERT INTO job (priority, task) VALUES (1, ?)', (json.dumps(first),))
        db.executemany('INSERT INTO job (priority, task) VALUES (?, ?)',
                       ((1 + number % 9, json.dumps(environment.engine('stored-%d' % number)))
                        for number in range(count)))


def bench_addjob(results, root):
    """addjob calls/s at depth 0 and DEPTH; server RSS and restart time with DEPTH stored jobs."""
    for depth in (0, DEPTH):
        environment = Environment(os.path.join(root, 'addjob-%d' % depth))
        blocker = environment.engine('blocker', '--sleep=3600')
        # A long first job keeps the runner busy, so added jobs wait (and the CPU is the server's).
        # With a filled store it is stored first: added after the start, it would come after the
        # stored jobs of priority 1, which would run meanwhile.
        if depth:
            fill_store(environment, depth, first=blocker)
        environment.start_server()
        if not depth:
            environment.proxy().addjob(blocker, 1)
        # Rounds taken in turn, each figure the median of its rounds: the machine's noise hits both.
        ours, reference = [], []
        for round_number in range(3):
            ours.append(client_rate(environment.port, environment.engine('added-%d' % round_number)))
            reference.append(bare_rate(depth))
        ours, reference = statistics.median(ours), statistics.median(reference)
        results.append(('addjob calls/s, depth %d' % depth, ours, reference, ours / reference, '>= 0.9',
                        ours / reference >= 0.9))
        if depth:
            waiting = environment.proxy().status(0)['waiting_count']
            results.append(('server peak RSS MB, %d waiting' % waiting, rss_mb(environment.server.pid), None,
                            None, '< 100', rss_mb(environment.server.pid) < 100))
            environment.kill_server()
            took = environment.start_server()
            results.append(('restart with %d stored jobs, s' % waiting, took, None, None, '< 2', took < 2))
        environment.kill_server()
        _kill_recorded(environment)


def bench_page(results, root):
    """addjob calls/s at depth 0 and DEPTH while a status page is open (a reader of /status.json
    every 2 seconds, as the page's script refreshes), against the same server without the page."""
    import urllib.request
    for depth in (0, DEPTH):
        environment = Environment(os.path.join(root, 'page-%d' % depth))
        blocker = environment.engine('blocker', '--sleep=3600')
        if depth:
            fill_store(environment, depth, first=blocker)      # (see bench_addjob)
        environment.start_server()
        if not depth:
            environment.proxy().addjob(blocker, 1)
        with_page, without = [], []
        for round_number in range(3):
            without.append(client_rate(environment.port, environment.engine('plain-%d' % round_number)))
            stop = threading.Event()

            def reader():
                while not stop.wait(2.0):
                    urllib.request.urlopen('http://127.0.0.1:%d/status.json' % environment.port, timeout=10).read()

            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            with_page.append(client_rate(environment.port, environment.engine('paged-%d' % round_number)))
            stop.set()
            thread.join(10)
        ours, reference = statistics.median(with_page), statistics.median(without)
        results.append(('addjob calls/s, depth %d, page open vs not' % depth, ours, reference, ours / reference,
                        '>= 0.9', ours / reference >= 0.9))
        environment.kill_server()
        _kill_recorded(environment)


def _kill_recorded(environment):
    try:
        with open(environment.record) as handle:
            for line in handle:
                entry = json.loads(line)
                try:
                    os.killpg(entry['pid'], signal.SIGKILL)
                except OSError:
                    pass
    except FileNotFoundError:
        pass


def read_probe(path):
    starts, ends = {}, {}
    with open(path) as handle:
        for line in handle:
            kind, stamp, number = line.split()
            (starts if kind == 'S' else ends)[int(number)] = int(stamp) / 1e9
    order = sorted(starts, key=starts.get)
    return [starts[b] - ends[a] for a, b in zip(order, order[1:])]


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bench_dispatch(results, root, jobs=30, rounds=6, ini_extra='', label='', targets=(0.9, 1.0)):
    """End of job i to start of job i+1, ours against tsp with the same probe jobs.

    Rounds of ``jobs`` probe jobs alternate between the two, so that the machine's
    ups and downs fall on both; each batch waits behind a first job of one second,
    so that every probe job is queued before the first one runs.
    """
    base = os.path.join(root, 'dispatch' + label.replace(' ', '-'))
    environment = Environment(base, ini_extra)
    trace = os.path.join(base, 'trace.txt')
    environment.env['BOTS_JOBQUEUE_TRACE'] = trace
    environment.start_server()
    if ini_extra:
        wait_for(lambda: _health(environment).get('role') == 'leader', timeout=60, interval=0.1)
    proxy = environment.proxy()
    tsp = shutil.which('tsp') or shutil.which('ts')
    env = dict(os.environ, TS_SOCKET=os.path.join(root, 'tsp.socket'), TS_MAXFINISHED='1000', TMPDIR=root)
    if tsp:
        subprocess.run([tsp, '-S', '1'], env=env, check=True, capture_output=True)
    ours, reference, bare, records = [], [], [], []
    for round_number in range(rounds):
        record = os.path.join(base, 'ours-%d.txt' % round_number)
        proxy.addjob(environment.engine('gate-%d' % round_number, '--sleep=1'), 1)
        for number in range(jobs):
            proxy.addjob([environment.probe, record, str(number)], 5)
        wait_for(lambda: _lines(record) == 2 * jobs, timeout=120, interval=0.05)
        ours.extend(read_probe(record))
        records.append(record)
        if tsp:
            record = os.path.join(base, 'tsp-%d.txt' % round_number)
            subprocess.run([tsp, 'sleep', '1'], env=env, check=True, capture_output=True)
            for number in range(jobs):
                subprocess.run([tsp, environment.probe, record, str(number)], env=env, check=True,
                               capture_output=True)
            wait_for(lambda: _lines(record) == 2 * jobs, timeout=120, interval=0.05)
            reference.extend(read_probe(record))
        if not ini_extra:
            record = os.path.join(base, 'bare-%d.txt' % round_number)
            subprocess.run([sys.executable, '-c', BARE_LAUNCHER, environment.probe, record, str(jobs)], check=True)
            bare.extend(read_probe(record))
    history = proxy.history(10000)
    environment.stop_server()
    dispatch_breakdown(results, records, history, trace, label)
    if not tsp:
        results.append(('dispatch gap ms%s, median (%d gaps)' % (label, len(ours)), statistics.median(ours) * 1000,
                        None, None, '<= %s of tsp (tsp not installed: apt-get install task-spooler)' % targets[0],
                        None))
        return
    subprocess.run([tsp, '-K'], env=env, capture_output=True)
    for name, fraction, target in (('median', 0.5, targets[0]), ('p90', 0.9, targets[1])):
        if target is None:
            continue
        mine, theirs = percentile(ours, fraction) * 1000, percentile(reference, fraction) * 1000
        results.append(('dispatch gap ms%s, %s (%d gaps)' % (label, name, len(ours)), mine, theirs, mine / theirs,
                        '<= %s' % target, mine / theirs <= target))
    if bare:
        # For information: how near that floor the target lies on this machine, and how near it we are.
        for name, fraction in (('median', 0.5), ('p90', 0.9)):
            floor, theirs = percentile(bare, fraction) * 1000, percentile(reference, fraction) * 1000
            results.append(('  floor: a bare Python loop (Popen + wait) vs tsp, %s ms' % name, floor, theirs,
                            floor / theirs, '-', None))
        mine, floor = percentile(ours, 0.5) * 1000, percentile(bare, 0.5) * 1000
        results.append(('  ours vs that bare Python loop, median ms', mine, floor, mine / floor, '-', None))


def _health(environment):
    import urllib.request
    try:
        with urllib.request.urlopen('http://127.0.0.1:%d/health' % environment.port, timeout=5) as answer:
            return json.load(answer)
    except OSError as exc:
        return json.load(exc) if hasattr(exc, 'read') else {}


def bench_cluster(results, root):
    """SPEC 11's figures, with a PostgreSQL of the benchmark's own: addjob calls/s with the shared
    store against the SQLite store, the dispatch gap with it against tsp, and the takeover time
    after kill -9 and after SIGSTOP of the leader (default lease_ttl)."""
    sys.path.insert(0, HERE)
    from databases import PostgreSQL
    os.makedirs(os.path.join(root, 'postgresql'))
    database = PostgreSQL(os.path.join(root, 'postgresql')).start()
    try:
        extra = 'store = %s\n' % database.url
        sqlite_env = Environment(os.path.join(root, 'cluster-sqlite'))
        shared_env = Environment(os.path.join(root, 'cluster-shared'), extra)
        for environment in (sqlite_env, shared_env):
            environment.start_server()
            wait_for(lambda: _health(environment).get('role', 'leader') == 'leader', timeout=60, interval=0.1)
            environment.proxy().addjob(environment.engine('blocker', '--sleep=3600'), 1)
        shared, local = [], []
        for round_number in range(3 if '--no-addjob' not in sys.argv else 0):
            shared.append(client_rate(shared_env.port, shared_env.engine('added-%d' % round_number)))
            local.append(client_rate(sqlite_env.port, sqlite_env.engine('added-%d' % round_number)))
        if shared:
            shared, local = statistics.median(shared), statistics.median(local)
            results.append(('addjob calls/s, PostgreSQL store vs SQLite', shared, local, shared / local, '>= 0.5',
                            shared / local >= 0.5))
        for environment in (sqlite_env, shared_env):
            environment.kill_server()
            _kill_recorded(environment)
        database.sql('CREATE DATABASE dispatch', database='postgres')
        bench_dispatch(results, root, ini_extra='store = %s/dispatch\n' % database.url.rsplit('/', 1)[0],
                       label=' PostgreSQL store', targets=(1.5, None))
        for fault in ('kill -9', 'SIGSTOP') if '--no-takeover' not in sys.argv else ():
            results.append(_takeover(root, database, fault))
    finally:
        database.remove()


def _takeover(root, database, fault, ttl=20):
    """Seconds from the fault of the leader to the next job's start at the standby."""
    name = 'takeover%d' % len(os.listdir(root))
    database.sql('CREATE DATABASE %s' % name, database='postgres')
    url = database.url.rsplit('/', 1)[0] + '/' + name
    first, second = (Environment(os.path.join(root, '%s-%d' % (name, number)), 'store = %s\nlease_ttl = %d\n'
                                 % (url, ttl)) for number in (1, 2))
    second.record = first.record
    second.env['FAKE_ENGINE_RECORD'] = first.record
    try:
        first.start_server()
        wait_for(lambda: _health(first).get('role') == 'leader', timeout=120, interval=0.1)
        second.start_server()
        first.proxy().addjob(first.engine('long', '--sleep=3600'), 5)
        wait_for(lambda: any(entry['argv'][-2:] == ['long', '--sleep=3600'] for entry in _runs(first)), timeout=60)
        # More urgent than the cut-off run, which the next leader queues again.
        first.proxy().addjob(first.engine('next'), 1)
        faulted = time.time()
        first.server.send_signal(signal.SIGKILL if fault == 'kill -9' else signal.SIGSTOP)
        wait_for(lambda: any(entry['argv'][-1:] == ['next'] for entry in _runs(first)), timeout=ttl * 3,
                 interval=0.05)
        took = [entry['time'] for entry in _runs(first) if entry['argv'][-1:] == ['next']][0] - faulted
    finally:
        for environment in (first, second):
            if environment.server is not None:
                environment.server.send_signal(signal.SIGCONT)
                environment.kill_server()
            _kill_recorded(environment)
    return ('takeover after %s of the leader, s (lease_ttl %d)' % (fault, ttl), took, None, None,
            '<= %d' % (ttl + 5), took <= ttl + 5)


BREAKDOWN = (('the child ends -> the runner sees it (wait)', 'E', 'ended'),
             ('what the end means (status, timers, job states)', 'ended', 'decided'),
             ("runner's lock file, next job taken (a shared store: + one commit)", 'decided', 'taken'),
             ('authorization checked again', 'taken', 'authorized'),
             ('pipe handed to the output keeper', 'authorized', 'captured'),
             ("the job named in its lock file (SQLite: the store's write lock taken)", 'captured', 'reserved'),
             ('fork and exec (Popen returns)', 'reserved', 'forked'),
             ("the job's own start, to its first stamp", 'forked', 'S'),
             ('(meanwhile: SQLite records the start and the end before it in one commit)', 'forked', 'stored'))


def dispatch_breakdown(results, records, history, trace, prefix=''):
    """Where our gap goes: the steps the server traced ($BOTS_JOBQUEUE_TRACE) between the probe
    stamps of job i's end and job i+1's start; medians in ms, for information."""
    number_of = {}              # (probe record, probe number) -> jobnumber
    for entry in history:
        task = entry['task']
        if len(task) == 3 and task[1] in records:
            number_of[(task[1], int(task[2]))] = entry['jobnumber']
    steps = {}
    with open(trace) as handle:
        for line in handle:
            step, stamp, jobnumber = line.split()
            steps[(step, int(jobnumber))] = int(stamp) / 1e9
    parts = {label: [] for label, _, _ in BREAKDOWN}
    late = []           # how long after a job's end the runner was still busy with its start
    for record in records:
        stamps = {}
        with open(record) as handle:
            for line in handle:
                kind, stamp, number = line.split()
                stamps[(kind, int(number))] = int(stamp) / 1e9
        for number in range(max(n for _, n in stamps)):
            this, following = number_of.get((record, number)), number_of.get((record, number + 1))
            moments = {'E': stamps.get(('E', number)), 'S': stamps.get(('S', number + 1)),
                       'ended': steps.get(('ended', this)), 'decided': steps.get(('decided', this))}
            for step in ('taken', 'authorized', 'captured', 'reserved', 'forked', 'stored'):
                moments[step] = steps.get((step, following))
            for label, start, end in BREAKDOWN:
                if moments[start] is not None and moments[end] is not None:
                    parts[label].append(moments[end] - moments[start])
            waiting = steps.get(('waiting', this))
            if waiting is not None and moments['E'] is not None:
                late.append(max(0.0, waiting - moments['E']))
    for label, _, _ in BREAKDOWN:
        if parts[label]:
            results.append(('  gap step%s: %s, median ms' % (prefix, label), statistics.median(parts[label]) * 1000,
                            '-', '-', '-', None))
    if late:
        # The probe jobs are short: bookkeeping after a start (the store, the log, the output of the
        # job before) that outlasts the job itself is paid in the gap, inside its 'wait' step.
        results.append(('  (of the wait: bookkeeping after the start not done at the job\'s end%s), '
                        'p90 ms; jobs' % prefix, percentile(late, 0.9) * 1000, '%d of %d' % (
                            sum(1 for value in late if value > 0), len(late)), '-', '-', None))


def _lines(path):
    try:
        with open(path) as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


BOTS4_SOURCE = os.path.join(os.path.dirname(os.path.dirname(HERE)), 'shared', 'peers', 'bots-4.0.0')


def _bots_client(root, kind, port):
    """A throw-away Python with Bots (``'3.3.1'`` from the registry, ``'4.0'`` from the peers), its
    configuration pointed at ``port``, as the tests build it; ``(argv prefix, env)`` of its own
    ``bots-job2queue``, or None when it cannot be built here."""
    venv = os.path.join(root, 'bots-' + kind)
    python = os.path.join(venv, 'bin', 'python')
    requirements = ['bots-ediint==3.3.1', 'Django<3'] if kind == '3.3.1' else [BOTS4_SOURCE]
    if kind != '3.3.1' and not os.path.isdir(BOTS4_SOURCE):
        return None
    if subprocess.run([sys.executable, '-m', 'venv', venv]).returncode or subprocess.run(
            [python, '-m', 'pip', '-q', '--disable-pip-version-check', 'install'] + requirements).returncode:
        return None
    home = os.path.join(root, 'home-' + kind)
    os.makedirs(home)
    env = {'PATH': os.path.join(venv, 'bin') + os.pathsep + '/usr/bin:/bin', 'HOME': home, 'LANG': 'C.UTF-8'}
    if kind == '3.3.1':
        package = subprocess.run([python, '-c', 'import bots, os; print(os.path.dirname(bots.__file__))'],
                                 capture_output=True, text=True).stdout.strip()
        ini = os.path.join(package, 'config', 'bots.ini')
    else:
        subprocess.run([os.path.join(venv, 'bin', 'bots-engine'), '--new'], env=env, capture_output=True)
        ini = os.path.join(home, '.bots', 'env', 'default', 'config', 'bots.ini')
    with open(ini) as handle:
        text = handle.read()
    text = text.replace('[jobqueue]', '[jobqueue]\nenabled = True\nport = %d\n' % port, 1)
    with open(ini, 'w') as handle:
        handle.write(text)
    return [os.path.join(venv, 'bin', 'bots-job2queue')], env


def bench_job2queue(results, root, runs=30):
    """Our bots-job2queue against what a Bots user would otherwise run, Bots' own bots-job2queue
    of 3.3.1 and of 4.0.0, each queueing the same kind of task to the same server, in turn."""
    environment = Environment(os.path.join(root, 'job2queue'))
    environment.start_server()
    environment.proxy().addjob(environment.engine('blocker', '--sleep=3600'), 1)
    ours_argv = [os.path.join(BIN, 'bots-job2queue'), '-c' + environment.configdir]
    clients = {kind: _bots_client(root, kind, environment.port) for kind in ('3.3.1', '4.0')}

    def timed(argv, env):
        started = time.perf_counter()
        subprocess.run(argv, cwd=environment.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
        return time.perf_counter() - started

    times = {'ours': [], 'pass': [], '3.3.1': [], '4.0': []}
    for number in range(runs):
        task = ['bots-engine', '--new', 'j%d' % number]     # one kind of task for all: the same answer
        times['ours'].append(timed(ours_argv + task, environment.env))
        times['pass'].append(timed([sys.executable, '-c', 'pass'], environment.env))
        for kind, client in clients.items():
            if client is not None:
                times[kind].append(timed(client[0] + task, client[1]))
    mine = statistics.median(times['ours']) * 1000
    for kind in ('3.3.1', '4.0'):
        if times[kind]:
            theirs = statistics.median(times[kind]) * 1000
            results.append(('bots-job2queue wall ms vs Bots %s\'s own' % kind, mine, theirs, mine / theirs,
                            '<= 0.2', mine / theirs <= 0.2))
        else:
            results.append(('bots-job2queue vs Bots %s: not built here' % kind, mine, '-', '-', '<= 0.2', None))
    plain = statistics.median(times['pass']) * 1000
    results.append(('bots-job2queue wall ms vs python3 -c pass', mine, plain, mine / plain, '-', None))
    environment.kill_server()
    _kill_recorded(environment)


class SlowClients:
    """``count`` connections that each send one byte of a request every ``interval`` seconds and
    connect again when the server closes them (as an attacker would)."""

    def __init__(self, port, count, interval=5.0):
        import resource
        import selectors
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < count + 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 256), hard))
        self.port, self.count, self.interval = port, count, interval
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.reconnects = 0
        self.sockets = [self._connect() for _ in range(count)]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _connect(self):
        import selectors
        sock = socket.create_connection(('127.0.0.1', self.port))
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ)
        return sock

    def _run(self):
        step = 0
        while not self.stopping:
            for key, _ in self.selector.select(0.05):          # closed by the server: come again
                self.selector.unregister(key.fileobj)
                key.fileobj.close()
                index = self.sockets.index(key.fileobj)
                self.sockets[index] = self._connect()
                self.reconnects += 1
            share = max(1, int(self.count * 0.05 / self.interval))
            for sock in self.sockets[step:step + share]:
                try:
                    sock.send(b'P')
                except OSError:
                    pass
            step = (step + share) % self.count

    def open(self):
        return sum(1 for sock in self.sockets if sock.fileno() >= 0)

    def close(self):
        self.stopping = True
        self.thread.join(5)
        for sock in self.sockets:
            sock.close()


def bench_slowclients(results, root, runs=100, count=1000):
    """bots-job2queue latency on an idle server and with ``count`` slow connections open."""
    environment = Environment(os.path.join(root, 'slowclients'))
    environment.start_server()
    environment.proxy().addjob(environment.engine('blocker', '--sleep=3600'), 1)
    script = os.path.join(BIN, 'bots-job2queue')

    def timed(prefix, seconds=0.0):
        latencies, failures = [], 0
        until = time.monotonic() + seconds
        number = 0
        while number < runs or time.monotonic() < until:
            number += 1
            started = time.perf_counter()
            result = subprocess.run([script, '-c' + environment.configdir] + environment.engine(prefix + str(number)),
                                    cwd=environment.root, env=environment.env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, check=False)
            latencies.append((time.perf_counter() - started) * 1000)
            failures += result.returncode != 0
        return latencies, failures

    idle, idle_failures = timed('idle')
    slow = SlowClients(environment.port, count)
    time.sleep(2)
    held = slow.open()
    loaded, failures = timed('loaded', seconds=15)   # past request_timeout: they are closed and come again
    reconnects = slow.reconnects
    slow.close()
    for name, fraction in (('median', 0.5), ('p99', 0.99)):
        mine, theirs = percentile(loaded, fraction), percentile(idle, fraction)
        results.append(('job2queue ms, %s, %d slow connections vs idle' % (name, held), mine, theirs,
                        mine / theirs, '<= 2.0', mine / theirs <= 2.0))
    results.append(('job2queue failures with %d slow connections (idle: %d)' % (held, idle_failures), failures,
                    None, None, '0', failures == 0))
    results.append(('slow connections closed and reopened meanwhile', reconnects, None, None, '-', None))
    environment.kill_server()
    _kill_recorded(environment)


def bench_schedules(results, root, firings=120, many=1000, cpu_seconds=30):
    """Lateness of scheduled starts (the scheduled second to the probe's start), and the server's
    CPU time with ``many`` schedules, against cron's and a systemd timer's one-minute granularity."""
    schedules = ''.join('[schedule%d]\nwhen = * * * * * *\ntask = {probe} {record} %d\n' % (n, n)
                        for n in range(4))
    base = os.path.join(root, 'schedules')
    os.makedirs(base)
    record = os.path.join(base, 'fired.txt')
    environment = Environment(base, '\nnr_threads = 4\n' + schedules.replace('{record}', record))
    with open(os.path.join(environment.configdir, 'bots.ini')) as handle:
        ini = handle.read().replace('{probe}', environment.probe)
    with open(os.path.join(environment.configdir, 'bots.ini'), 'w') as handle:
        handle.write(ini)
    environment.start_server()
    wait_for(lambda: _lines(record) >= 2 * firings, timeout=firings, interval=0.2)
    environment.stop_server()
    with open(record) as handle:
        starts = [int(line.split()[1]) / 1e9 for line in handle if line.startswith('S ')]
    lateness = [(start % 1.0) * 1000 for start in starts]
    for name, fraction in (('median', 0.5), ('p99', 0.99)):
        value = percentile(lateness, fraction)
        results.append(('scheduled start lateness ms, %s (%d firings)' % (name, len(lateness)), value, 60000.0,
                        value / 60000.0, '< 50 ms' if name == 'p99' else '-', value < 50 if name == 'p99' else None))
    # Cost: CPU time of a server with many schedules (every minute; none due while measured).
    base = os.path.join(root, 'schedules-many')
    minute = time.localtime().tm_min
    sections = ''.join('[schedule%d]\nwhen = %d %d * * *\ntask = {probe} x %d\n' % (n, (minute + 30) % 60, n % 24, n)
                       for n in range(many))
    environment = Environment(base, '\n' + sections)
    with open(os.path.join(environment.configdir, 'bots.ini')) as handle:
        ini = handle.read().replace('{probe}', environment.probe)
    with open(os.path.join(environment.configdir, 'bots.ini'), 'w') as handle:
        handle.write(ini)
    environment.start_server()
    time.sleep(2)
    before = _cpu_seconds(environment.server.pid)
    time.sleep(cpu_seconds)
    used = _cpu_seconds(environment.server.pid) - before
    environment.stop_server()
    per_hour = used * 3600 / cpu_seconds
    results.append(('server CPU s per hour, %d schedules, idle' % many, per_hour, None, None,
                    '< 36 (1 % of a core)', per_hour < 36))


def _cpu_seconds(pid):
    fields = open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def bench_dirmonitor(results, root, quiet=1.0, samples=5, burst=10000):
    base = os.path.join(root, 'dirmonitor')
    inbox, other = os.path.join(base, 'in'), os.path.join(base, 'other')
    environment = Environment(base, textwrap.dedent('''
        [dirmonitor]
        quiet_period = {quiet}
        log_console = False
        [dirmonitor1]
        path = {inbox}
        route = inbound
        [dirmonitor2]
        path = {other}
        route = other
        ''').format(quiet=quiet, inbox=inbox, other=other))
    os.makedirs(inbox)
    os.makedirs(other)
    environment.start_server()
    monitor = subprocess.Popen([os.path.join(BIN, 'bots-dirmonitor'), '-c' + environment.configdir],
                               cwd=base, env=environment.env)
    time.sleep(1.5)
    latencies = []
    for sample in range(samples):
        before = _runs(environment)
        with open(os.path.join(inbox, 'sample%d.edi' % sample), 'w') as handle:
            handle.write('x')
        closed = time.time()
        wait_for(lambda: len(_runs(environment)) > len(before), timeout=30)
        # The engine's own start time: queueing plus dispatch, so this errs on the long side.
        latencies.append(_runs(environment)[-1]['time'] - closed)
        time.sleep(0.5)
    median = statistics.median(latencies)
    results.append(('dirmonitor file closed -> job queued, s', median, quiet, median - quiet,
                    '<= quiet + 0.1', median <= quiet + 0.1))
    before = len(_runs(environment))
    for number in range(burst):
        with open(os.path.join(inbox if number % 2 else other, 'burst%05d.edi' % number), 'w') as handle:
            handle.write('x')
    time.sleep(quiet + 5)
    try:
        wait_for(lambda: len(_runs(environment, 'end')) >= before + 2, timeout=60)
    except RuntimeError:
        with open(os.path.join(base, 'botssys', 'logging', 'dirmonitor.log')) as handle:
            print('The burst was not queued; the end of the monitor\'s log:\n' + ''.join(handle.readlines()[-15:]),
                  file=sys.stderr)
        monitor.kill()
        environment.kill_server()
        raise
    routes = [run['argv'][-1] for run in _runs(environment)[before:]]
    peak = rss_mb(monitor.pid)
    results.append(('dirmonitor %d-file burst: jobs inbound/other' % burst,
                    '%d/%d' % (routes.count('inbound'), routes.count('other')), None, None, '1/1',
                    routes.count('inbound') == 1 and routes.count('other') == 1))
    results.append(('dirmonitor peak RSS MB after the burst', peak, None, None, '< 100', peak < 100))
    monitor.send_signal(signal.SIGTERM)
    monitor.wait(30)
    environment.kill_server()


def _runs(environment, event='start'):
    try:
        with open(environment.record) as handle:
            return [entry for entry in map(json.loads, (line for line in handle if line.endswith('\n')))
                    if entry['event'] == event]
    except FileNotFoundError:
        return []


def show(results):
    rows = [('figure', 'ours', 'reference', 'ratio', 'target', 'met')]
    for name, ours, reference, ratio, target, met in results:
        rows.append((name, _fmt(ours), _fmt(reference), _fmt(ratio), target,
                     '-' if met is None else ('yes' if met else 'NO')))
    widths = [max(len(row[column]) for row in rows) for column in range(6)]
    for index, row in enumerate(rows):
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            print('  '.join('-' * width for width in widths))


def _fmt(value):
    if value is None:
        return '-'
    if isinstance(value, float):
        return '%.3f' % value if abs(value) < 10 else '%.0f' % value
    return str(value)


BENCHES = {'addjob': bench_addjob, 'dispatch': bench_dispatch, 'job2queue': bench_job2queue,
           'dirmonitor': bench_dirmonitor, 'slowclients': bench_slowclients, 'schedules': bench_schedules,
           'page': bench_page, 'cluster': bench_cluster}


def main():
    as_json = '--json' in sys.argv[1:]
    chosen = [arg for arg in sys.argv[1:] if not arg.startswith('--')] or list(BENCHES)
    results = []
    root = tempfile.mkdtemp(prefix='bots-bench-')
    try:
        for name in chosen:
            BENCHES[name](results, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if as_json:
        print(json.dumps([dict(zip(('figure', 'ours', 'reference', 'ratio', 'target', 'met'), row))
                          for row in results], indent=2))
    else:
        print('Machine: %s, %d cores, Python %s' % (os.uname().machine, os.cpu_count(),
                                                     sys.version.split()[0]))
        show(results)


if __name__ == '__main__':
    main()
