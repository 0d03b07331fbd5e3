"""More than one server on one database (SPEC 11), against a real PostgreSQL and a real MariaDB.

Every server here is a real bots-jobqueueserver with an environment of its own (as on a machine
of its own) and the same ``[jobqueue] store``.  The engine is the fake one, holding an exclusive
lock on one shared file while it runs: two engines at once leave a line in ``engine.lock.overlaps``.
Faults are made for real - kill -9, SIGSTOP, the database ending the session, a TCP proxy that
stops passing the leader's traffic - each in a loop, with its counts printed.
"""
import itertools
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import urllib.request

import pytest

from conftest import FAKE_ENGINE, Environment, free_port, wait_until
from databases import MariaDB, PostgreSQL

TTL = 4            # lease_ttl of these servers: faults are over in seconds
MARGIN = 1


@pytest.fixture(scope='session')
def postgres(tmp_path_factory):
    database = PostgreSQL(str(tmp_path_factory.mktemp('postgresql'))).start()
    yield database
    database.remove()


@pytest.fixture(scope='session')
def mariadb(tmp_path_factory):
    database = MariaDB(str(tmp_path_factory.mktemp('mariadb'))).start()
    yield database
    database.stop()


_numbers = itertools.count(1)


@pytest.fixture(params=['postgresql', 'mysql'])
def database(request):
    """A database server, and a fresh database on it for this test: ``(server, url)``."""
    server = request.getfixturevalue('postgres' if request.param == 'postgresql' else 'mariadb')
    name = 'queue%d' % next(_numbers)
    if server.kind == 'postgresql':
        server.sql('CREATE DATABASE %s' % name, database='postgres')
    else:
        server.sql('CREATE DATABASE %s CHARACTER SET utf8mb4' % name)
    return server, server.url.rsplit('/', 1)[0] + '/' + name


def fresh_postgres(postgres):
    """A fresh database on the PostgreSQL server, for a test that needs one kind only: its URL."""
    name = 'queue%d' % next(_numbers)
    postgres.sql('CREATE DATABASE %s' % name, database='postgres')
    return postgres.url.rsplit('/', 1)[0] + '/' + name


class Proxy:
    """A TCP proxy to the database that the test controls: ``cut()`` stops passing bytes either
    way (the connections stay open, as across a broken network), ``mend()`` passes them again."""

    def __init__(self, port):
        self.target = port
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(50)
        self.port = self.listener.getsockname()[1]
        self.passing = threading.Event()
        self.passing.set()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(('127.0.0.1', self.target))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client, upstream):
        sockets = [client, upstream]
        try:
            while not self.closed:
                readable, _, _ = select.select(sockets, [], [], 0.2)
                for sock in readable:
                    self.passing.wait()
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def cut(self):
        self.passing.clear()

    def mend(self):
        self.passing.set()

    def close(self):
        self.closed = True
        self.passing.set()
        self.listener.close()


class Cluster:
    """``count`` servers on one store, each in an environment of its own."""

    def __init__(self, root, url, count, urls=None, jobqueue='', extra=''):
        self.root = str(root)
        self.record = os.path.join(self.root, 'runs.jsonl')
        self.lockfile = os.path.join(self.root, 'engine.lock')
        self.servers = []
        for number in range(count):
            env = Environment(os.path.join(self.root, 'machine%d' % number))
            env.record = self.record
            env.write_ini(jobqueue='store = %s\nlease_ttl = %s\nlease_margin = %s\nfence_grace = 1\n%s'
                          % ((urls or {}).get(number, url), TTL, MARGIN, jobqueue), extra=extra)
            self.servers.append(env)

    def start(self, number):
        self.servers[number].start_server()
        return self.servers[number]

    def health(self, number):
        env = self.servers[number]
        if env.server is None or env.server.poll() is not None:
            return None
        try:
            with urllib.request.urlopen('http://127.0.0.1:%d/health' % env.port, timeout=2) as answer:
                return json.load(answer)
        except OSError as exc:
            body = getattr(exc, 'read', None)
            return json.load(exc) if body else None

    def leaders(self, among=None):
        found = []
        for number in (range(len(self.servers)) if among is None else among):
            state = self.health(number)
            if state and state.get('role') == 'leader':
                found.append(number)
        return found

    def leader(self, among=None, timeout=30):
        """The number of the one server that leads (waits for there to be exactly one)."""
        return wait_until(lambda: (lambda found: found[0] + 1 if len(found) == 1 else None)(self.leaders(among)),
                          timeout=timeout, interval=0.1, message='one leader') - 1

    def engine(self, *args):
        return [sys.executable, FAKE_ENGINE, '--lock=' + self.lockfile] + list(args)

    def add(self, number, task, priority=5):
        return self.servers[number].proxy().addjob(task, priority)

    def runs(self, event):
        return self.servers[0].runs(event)

    def overlaps(self):
        try:
            with open(self.lockfile + '.overlaps') as handle:
                return [json.loads(line) for line in handle]
        except FileNotFoundError:
            return []

    def stop(self):
        for env in self.servers:
            if env.server is not None and env.server.poll() is None:
                try:
                    env.server.send_signal(signal.SIGCONT)
                except OSError:
                    pass
                env.stop_server(timeout=30)
        for entry in self.runs('start'):
            try:
                os.killpg(entry['pid'], signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def cluster_of(tmp_path):
    made = []

    def make(url, count, urls=None, **ini):
        made.append(Cluster(tmp_path, url, count, urls, **ini))
        return made[-1]
    yield make
    for cluster in made:
        cluster.stop()


def tag_of(entry):
    return [arg for arg in entry['argv'] if arg.startswith('--tag=')][0][6:]


@pytest.mark.timeout(240)
def test_three_servers_one_queue(database, cluster_of):
    """Adds at every server, the duplicate rule across them, job numbers unique and increasing,
    one leader that runs every job once, one at a time."""
    _, url = database
    cluster = cluster_of(url, 3)
    for number in range(3):
        cluster.start(number)
    leader = cluster.leader()
    assert cluster.leaders() == [leader]
    standby = [number for number in range(3) if number != leader]
    assert cluster.servers[standby[0]].proxy().pause() == 0
    wait_until(lambda: all(cluster.health(number)['paused'] for number in range(3)), message='paused everywhere')
    # The same task at every server: queued once for the environment.
    duplicate = cluster.engine('--tag=dup')
    assert [cluster.add(number, duplicate) for number in range(3)] == [0, 4, 4]
    # Adds at every server in turn, and from threads at all of them at once.
    tasks = [cluster.engine('--tag=t%d' % number) for number in range(30)]
    for number, task in enumerate(tasks[:15]):
        assert cluster.add(number % 3, task) == 0
    answers = []
    threads = [threading.Thread(target=lambda n, t: answers.append(cluster.add(n, t)), args=(number % 3, task))
               for number, task in enumerate(tasks[15:])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [0] * 15
    # Every server sees the same queue; the numbers of the adds made in turn grow in their order.
    expected = 31
    for env in cluster.servers:
        wait_until(lambda: len(env.proxy().listjobs()) == expected, message='every job at every server')
    listed = [job[1] for job in cluster.servers[0].proxy().listjobs()]
    assert len(set(listed)) == expected
    tags = {job[1]: job[2][-1] for job in cluster.servers[standby[1]].proxy().listjobs()}
    in_turn = [number for number, tag in sorted(tags.items()) if tag in ['--tag=t%d' % n for n in range(15)]]
    assert [tags[number] for number in in_turn] == ['--tag=t%d' % n for n in range(15)]
    assert cluster.runs('start') == []          # paused, at every server
    assert cluster.servers[standby[1]].proxy().resume() == 0
    wait_until(lambda: len(cluster.runs('end')) == expected, timeout=90, message='every job to run')
    ran = [tag_of(entry) for entry in cluster.runs('end')]
    assert sorted(ran) == sorted(['dup'] + ['t%d' % n for n in range(30)])
    assert cluster.overlaps() == []
    assert cluster.leaders() == [leader]
    status = cluster.servers[standby[0]].proxy().status()
    assert status['cluster']['role'] == 'standby'
    assert status['cluster']['leader'] == cluster.servers[leader].proxy().status()['cluster']['server']
    assert len(status['cluster']['servers']) == 3
    history = cluster.servers[standby[0]].proxy().history(100)
    assert sorted(record['jobnumber'] for record in history) == sorted(listed)
    # The operator's view at a standby: who leads, who stands by, what runs at the leader.
    assert cluster.add(standby[1], cluster.engine('--tag=long', '--sleep=3')) == 0
    wait_until(lambda: any(tag_of(entry) == 'long' for entry in cluster.runs('start')), message='the long job')
    shown = cluster.servers[standby[0]].run('bots-jobqueue', '-c' + cluster.servers[standby[0]].configdir, 'status')
    assert shown.returncode == 0, shown.stderr
    leader_name = cluster.servers[leader].proxy().status()['cluster']['server']
    assert 'Leader: %s at ' % leader_name in shown.stdout
    assert shown.stdout.count('Standby: ') == 2 and '(this server)' in shown.stdout
    assert '--tag=long' in shown.stdout and '(at %s)' % leader_name in shown.stdout
    with urllib.request.urlopen('http://127.0.0.1:%d/status.json' % cluster.servers[standby[0]].port,
                                timeout=5) as answer:
        page = json.load(answer)
    assert [job['task'][-2] for job in page['running']] == ['--tag=long']
    assert page['running'][0]['pid'].endswith(' at %s' % leader_name)


@pytest.mark.timeout(120)
def test_store_of_settings_py_and_wrong_stores(database, environment):
    """store = database takes Bots' own database from settings.py; a store that cannot be used
    is one line and exit code 1."""
    server, url = database
    name = url.rsplit('/', 1)[1]
    engine = 'django.db.backends.postgresql' if server.kind == 'postgresql' else 'django.db.backends.mysql'
    with open(os.path.join(environment.configdir, 'settings.py'), 'w') as handle:
        handle.write("DATABASES = {'default': {'ENGINE': '%s', 'NAME': '%s', 'USER': '%s', 'PASSWORD': '%s', "
                     "'HOST': '127.0.0.1', 'PORT': '%d'}}\n"
                     % (engine, name, server.user, server.password, server.port))
    environment.write_ini(jobqueue='store = database')
    environment.start_server()
    assert 'keeps its queue in the database %s://bots@127.0.0.1:%d/%s' % (server.kind, server.port, name) \
        in environment.log()
    wait_until(lambda: 'This server leads now' in environment.log(), message='the server to lead')
    assert environment.job2queue(*environment.engine('--tag=one')).returncode == 0
    wait_until(lambda: environment.runs(), message='the job to run')
    environment.stop_server()
    for store, words in (('oracle://u:p@h/d', 'starts with postgresql:// or mysql://'),
                         (url.replace(server.password, 'wrong'), 'cannot be opened'),
                         ('postgresql://bots:x@127.0.0.1:%d/q' % free_port(), 'cannot be opened')):
        environment.write_ini(jobqueue='store = %s' % store)
        started = environment.run('bots-jobqueueserver', '-c' + environment.configdir, timeout=60)
        assert started.returncode == 1, started.stderr
        assert words in started.stderr and len(started.stderr.strip().splitlines()) == 1, started.stderr
        assert 'Traceback' not in started.stderr and ':wrong@' not in started.stderr   # no password shown


def _fault_loop(cluster, name, fault, cycles, undo, prepare=None):
    """Fault the leader ``cycles`` times while a job runs there; return the counts.  ``fault(leader)``
    says whether a takeover follows; ``prepare()`` chooses the leader to fault."""
    acknowledged, takeovers = [], []
    for cycle in range(cycles):
        leader = cluster.leader() if prepare is None else prepare()
        long_tag = '%s-long-%d' % (name, cycle)
        assert cluster.add(leader, cluster.engine('--tag=' + long_tag, '--sleep=4')) == 0
        acknowledged.append(long_tag)
        wait_until(lambda: any(tag_of(entry) == long_tag for entry in cluster.runs('start')), timeout=30,
                   message='the long job to start')
        for number in range(3):
            tag = '%s-%d-%d' % (name, cycle, number)
            assert cluster.add(number % len(cluster.servers), cluster.engine('--tag=' + tag, '--sleep=0.2')) == 0
            acknowledged.append(tag)
        faulted_at = time.time()
        expect_takeover = fault(leader)
        if expect_takeover:
            started = wait_until(lambda: [entry['time'] for entry in cluster.runs('start')
                                          if entry['time'] > faulted_at], timeout=TTL + MARGIN + 20,
                                 interval=0.05, message='a job at the next leader')
            takeovers.append(min(started) - faulted_at)
        undo(leader)
    wait_until(lambda: set(acknowledged) <= {tag_of(entry) for entry in cluster.runs('end')}, timeout=120,
               message='every acknowledged job to run to its end')
    finished = {tag_of(entry) for entry in cluster.runs('end')}
    counts = {'overlaps': len(cluster.overlaps()), 'lost': len(set(acknowledged) - finished),
              'takeover': [round(seconds, 2) for seconds in takeovers]}
    return counts


def _kill_and_restart(cluster, cycles=2):
    """``(fault, cycles, undo)`` of kill -9: the leader killed, then started again (to stand by)."""
    def fault(leader):
        cluster.servers[leader].server.kill()
        return True

    def undo(leader):
        cluster.servers[leader].server.wait()
        cluster.start(leader)
    return fault, cycles, undo


def _servers(url, cluster_of, count=2):
    cluster = cluster_of(url, count)
    cluster.start(0)
    assert cluster.leader() == 0
    for number in range(1, count):
        cluster.start(number)
    return cluster


@pytest.mark.timeout(300)
def test_leader_killed(database, cluster_of):
    """kill -9 of the leader: its fence ends its job before the lease expires; a standby takes over."""
    _, url = database
    cluster = _servers(url, cluster_of)
    counts = _fault_loop(cluster, 'kill', *_kill_and_restart(cluster))
    print('kill -9 of the leader (%s): %s' % (database[0].kind, counts))
    assert counts['overlaps'] == 0 and counts['lost'] == 0
    assert max(counts['takeover']) <= TTL + MARGIN + 5


@pytest.mark.timeout(300)
def test_leader_frozen(database, cluster_of):
    """SIGSTOP of the leader for longer than lease_ttl, then SIGCONT: it stands by, and nothing runs twice at once."""
    _, url = database
    cluster = _servers(url, cluster_of)

    def fault(leader):
        cluster.servers[leader].server.send_signal(signal.SIGSTOP)
        return True

    def undo(leader):
        time.sleep(1)
        cluster.servers[leader].server.send_signal(signal.SIGCONT)
        wait_until(lambda: (cluster.health(leader) or {}).get('role') == 'standby', timeout=20,
                   message='the old leader to stand by')
    counts = _fault_loop(cluster, 'stop', fault, 2, undo)
    print('SIGSTOP of the leader (%s): %s' % (database[0].kind, counts))
    assert counts['overlaps'] == 0 and counts['lost'] == 0
    assert max(counts['takeover']) <= TTL + MARGIN + 5
    assert 'stops leading' in cluster.servers[0].log()


@pytest.mark.timeout(300)
def test_leader_session_ended_by_the_database(database, cluster_of):
    """pg_terminate_backend / KILL of every session of the servers: they open new ones; nothing is lost."""
    server, url = database
    cluster = _servers(url, cluster_of)

    def fault(leader):
        server.terminate('bots-jobqueue%')
        return False

    counts = _fault_loop(cluster, 'terminate', fault, 2, lambda leader: time.sleep(0.5))
    print('database sessions ended (%s): %s' % (server.kind, counts))
    assert counts['overlaps'] == 0 and counts['lost'] == 0


@pytest.mark.timeout(300)
def test_leader_cut_off_from_the_database(database, cluster_of, tmp_path):
    """The leader's connections pass through a proxy that stops passing bytes: its fence ends its job,
    the standby takes over; mended, the old leader stands by."""
    server, url = database
    proxy = Proxy(server.port)
    try:
        proxied = url.replace(':%d/' % server.port, ':%d/' % proxy.port)
        cluster = cluster_of(url, 2, urls={0: proxied})
        cluster.start(0)
        assert cluster.leader() == 0
        cluster.start(1)

        def prepare():
            # Machine 0 reaches the database through the proxy: it is the one to lead.
            if cluster.leader() != 0:
                cluster.servers[1].stop_server()
                assert cluster.leader() == 0
                cluster.start(1)
            return 0

        def fault(leader):
            proxy.cut()
            return True

        def undo(leader):
            time.sleep(2)
            proxy.mend()
            wait_until(lambda: (cluster.health(0) or {}).get('role') == 'standby', timeout=60,
                       message='machine 0 to stand by')
        counts = _fault_loop(cluster, 'cut', fault, 2, undo, prepare)
        print('leader cut off from the database (%s): %s' % (server.kind, counts))
        assert counts['overlaps'] == 0 and counts['lost'] == 0
        assert max(counts['takeover']) <= TTL + MARGIN + 5
    finally:
        proxy.close()


@pytest.mark.timeout(120)
def test_an_add_when_the_database_is_out_of_reach_is_refused_in_words(database, cluster_of):
    """The database goes out of reach: an add is refused - job2queue exits 1 with one line that
    says the store fails, not an exception's class - and the server logs it."""
    server, url = database
    proxy = Proxy(server.port)
    try:
        cluster = cluster_of(url.replace(':%d/' % server.port, ':%d/' % proxy.port), 1)
        env = cluster.start(0)
        assert cluster.add(0, cluster.engine('--tag=before', '--sleep=0')) == 0
        proxy.close()                      # its connections end, new ones are refused
        time.sleep(0.5)
        sent = env.job2queue(*cluster.engine('--tag=during'))
        assert sent.returncode == 1
        assert sent.stderr.count('\n') == 1 and 'the job store fails (the database ' in sent.stderr, sent.stderr
        assert '<class' not in sent.stderr and 'Traceback' not in sent.stderr
        assert 'The job store fails: addjob from 127.0.0.1 is not done' in env.log()
    finally:
        proxy.close()


LIBFAKETIME = '/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1'


@pytest.mark.timeout(300)
def test_clocks_apart(postgres, cluster_of):
    """The servers' wall clocks neither show the same time nor run at the same rate (libfaketime on
    each server process alone: the leader's three days behind and 0.5 % slow, the standby's two
    days ahead and 0.5 % fast): the lease goes by the database's clock and the fence by the
    machine's monotonic one, so kill -9 of the leader still gives no overlap and a prompt
    takeover.  (libfaketime leaves the monotonic clock alone here: faked, it would also move the
    deadlines of every timed wait in the process, which no real clock does.)"""
    assert os.path.exists(LIBFAKETIME), "this test needs Debian's faketime: apt-get install faketime"
    cluster = cluster_of(fresh_postgres(postgres), 2)
    for env, clock in zip(cluster.servers, ('-3d x0.995', '+2d x1.005')):
        env.server_env = {'LD_PRELOAD': LIBFAKETIME, 'FAKETIME': clock, 'FAKETIME_DONT_FAKE_MONOTONIC': '1'}
    cluster.start(0)
    assert cluster.leader() == 0
    cluster.start(1)
    counts = _fault_loop(cluster, 'clocks', *_kill_and_restart(cluster))
    print('clocks apart, kill -9 of the leader (postgresql): %s' % counts)
    assert counts['overlaps'] == 0 and counts['lost'] == 0
    assert max(counts['takeover']) <= TTL + MARGIN + 5


def _one_leader_two_jobs(postgres, cluster_of, tag, seconds):
    """One server leads; job ``tag`` (``seconds`` long) runs, a job 'next' waits: ``(cluster,
    environment, the pid of the fence that started the first job)``."""
    cluster = cluster_of(fresh_postgres(postgres), 1)
    env = cluster.start(0)
    assert cluster.leader() == 0
    assert cluster.add(0, cluster.engine('--tag=' + tag, '--sleep=%s' % seconds)) == 0
    assert cluster.add(0, cluster.engine('--tag=next', '--sleep=0.2')) == 0
    wait_until(lambda: cluster.runs('start'), message='the first job')
    return cluster, env, _fence_of(cluster.runs('start')[0]['pid'])


@pytest.mark.timeout(120)
def test_fence_killed(postgres, cluster_of):
    """kill -9 of the leader's fence while its job runs: nothing would end that job in time any more,
    so the server ends it and waits for it before the next start; it runs again, a new fence starts,
    and no two engines ever run at once."""
    cluster, env, fence = _one_leader_two_jobs(postgres, cluster_of, 'long', 4)
    os.kill(fence, signal.SIGKILL)
    wait_until(lambda: {'long', 'next'} <= {tag_of(entry) for entry in cluster.runs('end')}, timeout=60,
               message='the long job again, and the next one')
    assert cluster.overlaps() == []
    assert [tag_of(entry) for entry in cluster.runs('start')] == ['long', 'long', 'next']   # it kept its place
    wait_until(lambda: 'A new fence starts' in env.log(), message='a new fence')


def _fence_of(job_pid):
    """The fence that started the job of ``job_pid``: the job's parent."""
    fence = int(open('/proc/%d/stat' % job_pid).read().rsplit(')', 1)[1].split()[1])
    assert 'bots.botsjobqueue.fence' in open('/proc/%d/cmdline' % fence).read()
    return fence


@pytest.mark.timeout(180)
def test_a_stopped_fence_and_a_leader_cut_off(postgres, cluster_of):
    """Two faults at once: the leader's fence is stopped (SIGSTOP), then the leader is cut off from
    the database.  The fence cannot end the job as the lease runs out, so the server does, at the
    same moment; the standby takes over and runs the job again; no two engines run at once, and
    the leader ends the stopped fence once it sees the job gone without the fence's word."""
    url = fresh_postgres(postgres)
    proxy = Proxy(postgres.port)
    fence = None
    try:
        cluster = cluster_of(url, 2, urls={0: url.replace(':%d/' % postgres.port, ':%d/' % proxy.port)})
        env = cluster.start(0)
        assert cluster.leader() == 0
        cluster.start(1)
        assert cluster.add(0, cluster.engine('--tag=long', '--sleep=8')) == 0
        wait_until(lambda: cluster.runs('start'), message='the long job')
        assert cluster.add(1, cluster.engine('--tag=next', '--sleep=0.2')) == 0
        fence = _fence_of(cluster.runs('start')[0]['pid'])
        time.sleep(1)              # the job's pid is stored (after half a second): its runner waits for it
        os.kill(fence, signal.SIGSTOP)
        proxy.cut()
        faulted_at = time.time()
        wait_until(lambda: {'long', 'next'} <= {tag_of(entry) for entry in cluster.runs('end')}, timeout=90,
                   message='the long job again at the standby, and the next one')
        starts = cluster.runs('start')
        assert [tag_of(entry) for entry in starts] == ['long', 'long', 'next']
        print('stopped fence, leader cut off: takeover %.2f s, overlaps %d'
              % (starts[1]['time'] - faulted_at, len(cluster.overlaps())))
        assert cluster.overlaps() == []
        assert starts[1]['time'] - faulted_at <= TTL + MARGIN + 5
        wait_until(lambda: 'The fence process (pid %d) does not act' % fence in env.log(), timeout=30,
                   message='the stopped fence ended by its server')
        proxy.mend()
        wait_until(lambda: (cluster.health(0) or {}).get('role') == 'standby', timeout=60,
                   message='machine 0 to stand by')
        assert cluster.runs('end') and cluster.overlaps() == []
    finally:
        proxy.close()
        if fence is not None:
            try:
                os.kill(fence, signal.SIGCONT)
            except OSError:
                pass


@pytest.mark.timeout(120)
def test_a_fence_stopped_while_the_lease_holds(postgres, cluster_of):
    """SIGSTOP of the leader's fence alone: its job ends by itself, but the stopped fence cannot
    say so.  The server sees the job gone, ends that fence and starts a new one, which starts the
    next job after the next renewal; the queue goes on (before, it waited for the fence for ever)."""
    cluster, env, fence = _one_leader_two_jobs(postgres, cluster_of, 'first', 1)
    os.kill(fence, signal.SIGSTOP)
    try:
        wait_until(lambda: 'next' in {tag_of(entry) for entry in cluster.runs('end')}, timeout=60,
                   message='the next job, through a new fence')
    finally:
        try:
            os.kill(fence, signal.SIGCONT)
        except OSError:
            pass
    assert [tag_of(entry) for entry in cluster.runs('start')] == ['first', 'next']
    assert cluster.overlaps() == []
    log = env.log()
    assert 'The fence process (pid %d) does not act: job 1' % fence in log
    assert 'its fence was stopped and could not tell, so its exit code cannot be known' in log


def test_a_leaders_shutdown_stops_its_job_with_sigterm(postgres, cluster_of):
    """The leader stops: its job, started by the fence, gets SIGTERM and ends by it (the fence
    itself takes no SIGTERM; its jobs must not inherit that), rather than by the SIGKILL after
    kill_grace; it is queued again and the lease is given up."""
    cluster = cluster_of(fresh_postgres(postgres), 1, jobqueue='shutdown_grace = 1\nkill_grace = 30\n')
    env = cluster.start(0)
    assert cluster.leader() == 0
    assert cluster.add(0, cluster.engine('--tag=long', '--sleep=60')) == 0
    wait_until(lambda: cluster.runs('start'), message='the long job')
    env.server.send_signal(signal.SIGTERM)
    assert env.server.wait(20) == 0                # shutdown_grace, then well within kill_grace
    stopped = [line for line in env.log().splitlines() if 'Stopped job 1 at the shutdown' in line]
    assert stopped and '(exit code -15)' in stopped[0], env.log()
    assert cluster.runs('end') == []


def test_a_task_queued_again_while_it_waits_already(database):
    """The store of a real database, directly: a running job put back (its lease ran out, say)
    while the same task was queued meanwhile is dropped - one waiting copy is enough - and the
    duplicate rule still holds for the copy that waits."""
    from bots.botsjobqueue import dbstore
    _, url = database
    store = dbstore.DatabaseStore(*dbstore.parse_url(url), name='here')
    try:
        task = ['bots-engine', '--new']
        added, first, _ = store.admit(5, task)
        assert added and store.take(first, None, 1)
        added, second, _ = store.admit(5, task)          # the first runs: a new job
        assert added and second > first
        assert store.admit(5, task)[:2] == (False, second)
        assert store.wait_again(first) is False
        assert [job.jobnumber for job in store.load()[0]] == [second]
        assert store.admit(3, task) == (True, second, 5)  # a duplicate of another priority: moved up
    finally:
        store.close()


@pytest.mark.timeout(180)
def test_schedules_fire_at_the_leader_once_and_after_a_takeover(database, cluster_of):
    """Every server has the same schedule: while both run, each of its times starts one job (the
    leader fires, the standby does not); after kill -9 of the leader the next one fires - the
    times missed meanwhile once (catchup = once) - and never in a burst."""
    _, url = database
    cluster = cluster_of(url, 2, extra='[schedule_tick]\nwhen = */2 * * * * *\narguments = --tag=tick --sleep=0.1')
    cluster.start(0)
    leader = cluster.leader()
    cluster.start(1)

    def ticks(after=0.0):
        return [entry['time'] for entry in cluster.runs('start') if tag_of(entry) == 'tick' and entry['time'] > after]
    wait_until(lambda: len(ticks()) >= 4, timeout=30, message='four times of the schedule')
    killed = time.time()
    cluster.servers[leader].server.kill()
    cluster.servers[leader].server.wait()
    wait_until(lambda: len(ticks(killed + TTL + MARGIN + 2)) >= 2, timeout=TTL + MARGIN + 30,
               message='the schedule at the next leader')
    before, after = ticks()[:4], ticks(killed)
    print('schedule (%s): started at +%s s of the kill' % (database[0].kind, [round(t - killed, 1) for t in after]))
    # Two servers, one firing per time.  At the takeover: the run the kill cut off, queued again
    # (when the kill hit one), and the times missed without a leader, once - both before the
    # schedule's next time (an even second, which may come a moment later); then its times.
    assert all(b - a >= 1.5 for a, b in zip(before, before[1:]))
    next_time = (int(after[0]) // 2 + 1) * 2
    at_takeover = [t for t in after if t < next_time]
    assert len(at_takeover) <= 2
    assert all(b - a >= 1.5 for a, b in zip(after[len(at_takeover):], after[len(at_takeover) + 1:]))
    assert min(after) - killed <= TTL + MARGIN + 5
    assert cluster.overlaps() == []
    assert '(schedule [schedule_tick])' in cluster.servers[1 - leader].log()


@pytest.mark.timeout(120)
def test_a_run_locked_out_waits_its_delay_at_the_next_leader(database, cluster_of, tmp_path):
    """An engine run that ended with exit code 3 (database locked) waits locked_retry_delay; the
    leader dies meanwhile: the next leader runs it, once, not before its time."""
    _, url = database
    cluster = cluster_of(url, 2, jobqueue='locked_retry_delay = 6')
    cluster.start(0)
    leader = cluster.leader()
    cluster.start(1)
    exit_file = str(tmp_path / 'exit')
    with open(exit_file, 'w') as handle:
        handle.write('3')
    assert cluster.add(leader, cluster.engine('--tag=locked', '--exit-file=' + exit_file)) == 0
    # Killed once the standby, too, has it as delayed (killed sooner, the leader's death would have
    # cut the run off before its end was seen: it would run again at once, as after a crash).
    wait_until(lambda: cluster.servers[1 - leader].proxy().status()['retry_at'], message='the run delayed')
    with open(exit_file, 'w') as handle:
        handle.write('0')
    cluster.servers[leader].server.kill()
    cluster.servers[leader].server.wait()
    wait_until(lambda: len([entry for entry in cluster.runs('end') if tag_of(entry) == 'locked']) == 2,
               timeout=60, message='its second run')
    starts = [entry['time'] for entry in cluster.runs('start') if tag_of(entry) == 'locked']
    print('locked out (%s): run again %.1f s later' % (database[0].kind, starts[1] - starts[0]))
    assert len(starts) == 2 and starts[1] - starts[0] >= 6 - 0.5
    record, = wait_until(lambda: [entry for entry in cluster.servers[1 - leader].proxy().history(10)
                                  if '--tag=locked' in entry['task']], message='its record')
    assert record['exitcode'] == 0 and [attempt['exitcode'] for attempt in record['attempts']] == [3]
    assert cluster.overlaps() == []


@pytest.mark.timeout(180)
def test_database_restarted(postgres, cluster_of):
    """The database server restarts under two servers (its sessions ended, a few seconds away):
    the servers open new connections, the lease is kept or taken over, nothing runs twice at
    once and no acknowledged job is lost.  The restart happens last: the other tests share it."""
    cluster = cluster_of(fresh_postgres(postgres), 2)
    cluster.start(0)
    assert cluster.leader() == 0
    cluster.start(1)

    def started():
        return postgres.sql('SELECT pg_postmaster_start_time()')[0][0]

    def fault(leader):
        before = started()
        postgres.restart(down=2)
        assert started() > before        # a new database server process
        return False

    counts = _fault_loop(cluster, 'restart', fault, 2, lambda leader: cluster.leader(timeout=60))
    print('database restarted (postgresql): %s' % counts)
    assert counts['overlaps'] == 0 and counts['lost'] == 0
    assert 'The database answers again' in cluster.servers[0].log() + cluster.servers[1].log()
