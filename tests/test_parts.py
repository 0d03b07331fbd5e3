"""The server's parts on their own, with real processes, pipes and files: the timer facility,
the capture kinds, a RunningJob's supervision, the HTTP head rules."""
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from bots.botsjobqueue import configuration, httphead
from bots.botsjobqueue.authorize import Authorizer
from bots.botsjobqueue.jobqueue import JobQueue
from bots.botsjobqueue.launcher import Launcher, LaunchSettings
from bots.botsjobqueue.outputs import CAPTURE_SCRIPT, LOST, CaptureProcess, FileComing, KeptBefore, Outputs
from bots.botsjobqueue.processes import is_alive, process_start_time
from bots.botsjobqueue.report import Reporter
from bots.botsjobqueue.store import Store
from bots.botsjobqueue.timers import Timers

from conftest import free_port, wait_until

LOGGER = logging.getLogger('test-parts')


# ---- timers
def test_timers_fire_in_time_order_and_equal_times_in_the_order_set():
    timers, fired, done = Timers('test'), [], threading.Event()
    timers.add(0.3, fired.append, 'late')
    for name in ('a', 'b', 'c'):
        timers.add(0.1, fired.append, name)
    timers.add(0.4, done.set)
    assert done.wait(10)
    assert fired == ['a', 'b', 'c', 'late']
    timers.close()


def test_a_cancelled_timer_never_fires_and_a_failing_one_stops_no_other(caplog):
    timers, fired, done = Timers('test', LOGGER), [], threading.Event()
    timers.add(0.05, lambda: 1 / 0)
    cancelled = timers.add(0.1, fired.append, 'cancelled')
    timers.add(0.15, fired.append, 'kept')
    timers.add(0.2, done.set)
    cancelled.cancel()
    assert done.wait(10)
    assert fired == ['kept']
    assert 'Unexpected error in a timer (test)' in caplog.text and 'ZeroDivisionError' in caplog.text


def test_a_closed_timers_fires_nothing_more():
    timers, fired = Timers('test'), []
    timers.add(0.2, fired.append, 'never')
    timers.close(wait=5)
    time.sleep(0.4)
    assert fired == []


# ---- the capture kinds: the same face, whatever keeps the output
def _pipe_with(text):
    """A pipe whose write end has printed ``text`` and is closed: its read end."""
    read_end, write_end = os.pipe()
    os.write(write_end, text.encode())
    os.close(write_end)
    return read_end


def test_the_output_keeper_keeps_an_output(tmp_path):
    outputs = Outputs(str(tmp_path), 65536, LOGGER)
    path = outputs.path(7)
    read_end, write_end = os.pipe()
    capture = outputs.capture(read_end, path, 7)
    assert capture.relay_pid == outputs.keeper.process.pid
    assert not capture.done()
    os.write(write_end, b'hello from job 7\n')
    os.close(write_end)
    capture.job_ended()
    assert capture.wait(10) and capture.done()
    assert capture.error is None and capture.text() == 'hello from job 7\n'
    capture.discard()
    assert not os.path.exists(path)
    outputs.close()


def test_a_capture_process_of_its_own_keeps_an_output(tmp_path):
    path = str(tmp_path / '8.out')
    with open(path, 'wb') as output_file:
        process = subprocess.Popen([sys.executable, '-I', '-S', CAPTURE_SCRIPT, '65536'],
                                   stdin=_pipe_with('from its own process\n'), stdout=output_file)
    capture = CaptureProcess(path, process)
    assert capture.wait(10) and capture.done()
    assert capture.text() == 'from its own process\n'


def test_a_keeper_from_before_a_restart_is_waited_for_by_its_pid(tmp_path):
    path = str(tmp_path / '9.out')
    keeper = subprocess.Popen([sys.executable, '-c', 'import sys, time; time.sleep(0.5); '
                               'open(sys.argv[1], "w").write("kept before\\n")', path])
    capture = KeptBefore(path, keeper.pid)
    assert not capture.done()
    assert not capture.wait(0.05)
    keeper.wait()           # reaped here, so that the pid is gone (the server's keeper is not its child)
    assert capture.wait(10) and capture.text() == 'kept before\n'


def test_an_output_whose_keeper_is_unknown_is_waited_for_as_a_file(tmp_path):
    path = str(tmp_path / '10.out')
    capture = FileComing(path)
    assert not capture.done()
    threading.Timer(0.2, lambda: open(path, 'w').write('it came\n')).start()
    assert capture.wait(10) and capture.text() == 'it came\n'


def test_a_lost_output_says_so_and_keeps_its_last_snapshot(tmp_path):
    path = str(tmp_path / '11.out')
    capture = FileComing(path)
    capture.error = LOST
    assert capture.text() == '[the output keeper stopped before it wrote this output: it is lost]'
    with open(path + '.live', 'w') as handle:
        handle.write('so far\n')
    assert capture.text().startswith('so far\n\n[... the output keeper stopped before it wrote this output')


# ---- supervision: started and adopted jobs go one path
@pytest.fixture
def launcher(environment):
    """A Launcher of two runners over a real store, queue and authorizer (no server around it)."""
    environment.write_ini(jobqueue='nr_threads = 2\nauthorized_tasks = %s' % sys.executable)
    loaded = configuration.load(environment.configdir)
    store = Store(os.path.join(environment.botssys, 'jobqueue.db'))
    launcher = Launcher(JobQueue(store), store, Authorizer.for_environment(loaded), LaunchSettings(loaded), LOGGER,
                        Reporter(False, {}, LOGGER))
    yield launcher
    launcher.stop_running()
    store.close()


def _sleeper(seconds):
    return [sys.executable, '-c', 'import time; time.sleep(%s)' % seconds]


def test_a_started_job_is_supervised_to_its_end_and_recorded(launcher):
    launcher.start()
    code, jobnumber, _ = launcher.queue.add([sys.executable, '-c', 'print("done")'], 5)
    wait_until(lambda: (launcher.store.finished(jobnumber) or {}).get('output'), message='the output in the history')
    record = launcher.store.finished(jobnumber)
    assert (record['status'], record['exitcode'], record['output']) == ('ok', 0, 'done\n')
    wait_until(lambda: launcher.get(jobnumber) is None, message='the job to be in the store alone')


def test_maxruntime_acts_on_a_running_job_through_its_timer(launcher, caplog):
    launcher.settings.maxruntime = 0.01                # minutes: 0.6 s
    launcher.settings.killjobsintimeout = True
    launcher.settings.kill_grace = 1
    launcher.start()
    code, jobnumber, _ = launcher.queue.add(_sleeper(60), 5)
    wait_until(lambda: launcher.store.finished(jobnumber), timeout=30, message='the job to be stopped')
    record = launcher.store.finished(jobnumber)
    assert (record['status'], record['exitcode']) == ('timed out', -signal.SIGTERM)
    assert 'Job %d exceeded maxruntime of 0.01 minutes; it is stopped.' % jobnumber in caplog.text


def test_an_adopted_job_holds_only_its_own_runner(launcher, caplog):
    """A job from before a restart, stored as started by runner 2, still runs (it holds runner
    2's lock file, as a job started there does): runner 1 starts the next job at once; the adopted
    job is supervised to its end and recorded like any other."""
    lock_file = os.path.join(launcher.settings.lockdir, 'runner-2.lock')
    orphan = subprocess.Popen([sys.executable, '-c', 'import fcntl, sys, time; f = open(sys.argv[1], "a"); '
                               'fcntl.flock(f, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(4)',
                               lock_file], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert orphan.stdout.readline().strip() == 'locked'
    store = launcher.store
    jobnumber = store.add(5, _sleeper(4))
    store.set_running(jobnumber, None, 2)
    store.set_process(jobnumber, orphan.pid, process_start_time(orphan.pid), None, '')
    stored = next(item for item in store.load() if item.jobnumber == jobnumber)
    assert launcher.still_runs(stored)
    launcher.adopt(stored)
    assert 'Job %d (pid %d) still runs from before the restart; runner 2 starts no job until it ends.' \
        % (jobnumber, orphan.pid) in caplog.text
    threading.Thread(target=orphan.wait, daemon=True).start()     # reaped as init would reap it
    launcher.start()
    assert [job['jobnumber'] for job in launcher.status()] == [jobnumber]
    code, second, _ = launcher.queue.add([sys.executable, '-c', 'print("next")'], 5)
    wait_until(lambda: store.finished(second), message='the next job')
    assert orphan.poll() is None, 'the next job waited for the adopted one'
    assert [job['jobnumber'] for job in launcher.status()] == [jobnumber]
    wait_until(lambda: store.finished(jobnumber), timeout=20, message='the adopted job to be recorded')
    assert store.finished(jobnumber)['status'] == 'ended'        # not our child: no exit code known
    assert launcher.status() == []


# ---- a start before its record: the lock file holds the claim
def _holding(fd):
    """A process that holds ``fd`` (a locked lock file) until it is killed."""
    return subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], pass_fds=(fd,),
                            start_new_session=True)


def test_a_held_runner_lock_file_names_the_job_it_runs(tmp_path):
    from bots.botsjobqueue.jobqueue import Job
    from bots.botsjobqueue.processes import RunLocks
    from bots.botsjobqueue.store import StoredJob
    locks = RunLocks(str(tmp_path), 2)
    fd = locks.take_runner(1)
    locks.mark(fd, Job(12345678901, 5, ('x',), 1, 0))
    locks.mark(fd, Job(7, 5, ('x',), 1, 0))                 # a shorter mark overwrites a longer one
    holder = _holding(fd)
    os.close(fd)
    try:
        assert locks.claims() == {7: (1, 1, 0)}
        stored = StoredJob(*[None] * 13)._replace(jobnumber=7, runner=1)
        assert locks.runs(stored) is True
        assert locks.runs(stored._replace(jobnumber=6)) is False     # the runner's job before: ended
        assert locks.take_runner(1) is None
    finally:
        holder.kill()
        holder.wait()
    assert locks.claims() == {}
    assert locks.runs(stored) is False


def test_a_reserved_start_is_stored_even_when_cleared_meanwhile_and_a_locked_store_refuses_it(tmp_path):
    import sqlite3
    from bots.botsjobqueue.jobqueue import Job
    from bots.botsjobqueue.store import StoreBusy
    path = str(tmp_path / 'jobqueue.db')
    store = Store(path)
    jobnumber = store.add(5, ['x', 'one'])
    # Taken from the queue's memory, then the queue is cleared before its start is recorded.
    store.remove_waiting()
    reservation = store.reserve()
    reservation.commit(Job(jobnumber, 5, ('x', 'one')), 2, 1.0, 4242, 'start', None, 'out')
    (stored,) = list(store.load())
    assert (stored.jobnumber, stored.state, stored.runner, stored.pid, stored.task) == \
        (jobnumber, 'running', 2, 4242, ['x', 'one'])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute('BEGIN EXCLUSIVE')
    with pytest.raises(StoreBusy):
        store.reserve()
    other.execute('ROLLBACK')
    other.close()
    store.reserve().cancel()
    assert store.add(5, ['x', 'two']) == jobnumber + 1
    store.close()


# ---- the fence (a shared store's leader starts its jobs through it)
@pytest.fixture
def fence():
    from bots.botsjobqueue.fence import Fence
    fence = Fence(LOGGER)
    yield fence
    fence.close()


def _fenced(fence, argv):
    read_end, write_end = os.pipe()
    try:
        return fence.spawn(argv, write_end, None, 1), read_end
    finally:
        os.close(write_end)


def test_the_fence_starts_a_job_while_the_lease_holds_and_reports_its_end(fence):
    now = time.monotonic()
    fence.hold(now + 60, now + 61)
    child, output = _fenced(fence, [sys.executable, '-c', 'import time; time.sleep(1); print("hi"); raise SystemExit(7)'])
    assert child.pid > 0 and process_start_time(child.pid) is not None
    assert child.ended_within(0.05) is False              # it runs
    assert child.ended_within(30) is True
    assert (child.wait(), child.fenced) == (7, False)
    assert os.read(output, 100) == b'hi\n'
    os.close(output)
    # A job that ends at once: its end may come in the same read as the start's answer.
    quick, output = _fenced(fence, ['true'])
    assert quick.ended_within(30) is True and quick.wait() == 0
    os.close(output)


def test_the_fence_refuses_a_start_once_the_lease_ran_out_and_says_why_a_start_fails(fence):
    from bots.botsjobqueue.fence import LeaseLost
    now = time.monotonic()
    fence.hold(now - 1, now + 60)
    with pytest.raises(LeaseLost):
        _fenced(fence, ['true'])
    fence.hold(now + 60, now + 61)
    with pytest.raises(OSError, match='no-such-program'):
        _fenced(fence, ['/nonexistent/no-such-program'])


def test_the_fence_ends_its_job_when_the_lease_runs_out(fence):
    now = time.monotonic()
    fence.hold(now + 60, now + 61)
    child, output = _fenced(fence, [sys.executable, '-c', 'import time; time.sleep(60)'])
    os.close(output)
    fence.hold(time.monotonic() + 0.5, time.monotonic() + 1.5)      # the lease was not renewed
    assert child.ended_within(30) is True
    assert (child.wait(), child.fenced) == (-signal.SIGTERM, True)


def test_a_job_whose_fence_is_killed_is_ended_by_the_server(fence):
    now = time.monotonic()
    fence.hold(now + 60, now + 61)
    child, output = _fenced(fence, [sys.executable, '-c', 'import time; time.sleep(60)'])
    os.close(output)
    fence.process.kill()
    assert child.ended_within(30) is True
    assert child.wait() is None and child.fenced is True
    assert not is_alive(child.pid, None)                    # ended and waited for


def test_a_stopped_fence_cannot_keep_its_job_past_the_lease(fence):
    """SIGSTOP of the fence alone: the server's own deadline ends the job at the fence's moment;
    the job gone without the fence's word, the fence is ended and another started, which starts
    jobs once it is told the lease holds."""
    now = time.monotonic()
    fence.hold(now + 60, now + 61)
    child, output = _fenced(fence, [sys.executable, '-c', 'import time; time.sleep(60)'])
    os.close(output)
    stopped = fence.process
    os.kill(stopped.pid, signal.SIGSTOP)
    fence.hold(time.monotonic() + 0.5, time.monotonic() + 1.5)      # the lease was not renewed
    deadline = time.monotonic() + 0.5
    assert child.wait() is None and child.fenced is True            # unknown code; it runs again
    assert time.monotonic() - deadline < 3 * child.HUNG_AFTER
    assert not is_alive(child.pid, None) and stopped.poll() is not None
    fence.hold(time.monotonic() + 60, time.monotonic() + 61)
    assert fence.process is not stopped
    quick, output = _fenced(fence, ['true'])
    assert quick.wait() == 0
    os.close(output)


def test_a_fence_stopped_before_a_start_is_ended_and_the_start_waits(fence):
    from bots.botsjobqueue.fence import LeaseLost
    now = time.monotonic()
    fence.hold(now + 60, now + 61)
    stopped = fence.process
    os.kill(stopped.pid, signal.SIGSTOP)
    fence.ANSWER_WAIT = 1
    with pytest.raises(LeaseLost, match='did not answer'):
        _fenced(fence, ['true'])
    assert stopped.poll() is not None and fence.process is not stopped
    with pytest.raises(LeaseLost):          # the new fence starts jobs from the next hold on
        _fenced(fence, ['true'])
    fence.hold(time.monotonic() + 60, time.monotonic() + 61)
    quick, output = _fenced(fence, ['true'])
    assert quick.wait() == 0
    os.close(output)


# ---- the HTTP head
def test_a_request_head_is_read_one_way_only():
    method, path, version, headers, keep_alive = httphead.parse_head(
        b'POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: text/xml\r\nContent-Length: 12')
    assert (method, path, version, keep_alive) == ('POST', '/RPC2', 'HTTP/1.1', True)
    assert headers == {'host': '127.0.0.1:8080', 'content-type': 'text/xml', 'content-length': '12'}
    assert httphead.parse_head(b'GET / HTTP/1.0')[4] is False
    assert httphead.head_end(bytearray(b'GET / HTTP/1.0\r\n\r\nrest')) == (14, 4)
    assert httphead.head_end(bytearray(b'GET / HTTP/1.0\r\nHost: x')) is None
    for head, code in ((b'GET /', 400), (b'GET / HTTP/2.0', 505), (b'GET / HTTP/1.1\r\nno colon', 400),
                       (b'POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2', 400)):
        with pytest.raises(httphead.Refusal) as refused:
            httphead.parse_head(head)
        assert refused.value.code == code
    with pytest.raises(httphead.Refusal) as refused:
        httphead.head_end(bytearray(b'x' * (httphead.MAX_HEAD + 10)))
    assert refused.value.code == 431


def test_a_body_is_framed_by_a_plain_content_length_only():
    assert httphead.body_length('POST', {'content-length': '12'}, 100) == 12
    assert httphead.body_length('GET', {}, 100) == 0
    for method, headers, code in (('POST', {}, 411), ('POST', {'content-length': '+1'}, 400),
                                  ('POST', {'content-length': '101'}, 413),
                                  ('POST', {'content-length': '1', 'transfer-encoding': 'chunked'}, 400),
                                  ('POST', {'content-length': '1', 'content-encoding': 'gzip'}, 415),
                                  ('GET', {'content-length': '5'}, 400), ('PUT', {}, 501)):
        with pytest.raises(httphead.Refusal) as refused:
            httphead.body_length(method, headers, 100)
        assert refused.value.code == code


def test_the_browser_rules_keep_other_sites_out():
    port = free_port()
    rules = httphead.BrowserRules('127.0.0.1', port)
    rules.check('POST', {'host': '127.0.0.1:%d' % port, 'content-type': 'text/xml'})
    rules.check('GET', {'host': 'localhost:%d' % port, 'origin': 'http://localhost:%d' % port})
    for method, headers, code in (
            ('POST', {'host': 'evil.example:%d' % port, 'content-type': 'text/xml'}, 403),
            ('POST', {'host': '127.0.0.1:%d' % (port + 1), 'content-type': 'text/xml'}, 403),
            ('POST', {'content-type': 'text/plain'}, 415),
            ('POST', {'content-type': 'text/xml', 'origin': 'http://evil.example'}, 403),
            ('POST', {'content-type': 'text/xml', 'sec-fetch-site': 'cross-site'}, 403)):
        with pytest.raises(httphead.Refusal) as refused:
            rules.check(method, headers)
        assert refused.value.code == code


# ---- storechoice: which store, and where SQLite is refused
def test_sqlite_on_a_network_file_system_is_refused(tmp_path):
    """The mount table as Linux writes it (/proc/mounts): botssys on NFS, SMB or FUSE is refused,
    on a local file system (or under a local mount inside a network one) it is not."""
    from bots.botsjobqueue import storechoice
    from bots.botsjobqueue.configuration import ConfigError
    botssys = tmp_path / 'shared' / 'botssys'
    botssys.mkdir(parents=True)
    local = tmp_path / 'shared' / 'local'
    local.mkdir()
    mounts = tmp_path / 'mounts'
    for kind in ('nfs4', 'cifs', 'fuse.sshfs', 'fuse'):
        mounts.write_text('/dev/sda1 / ext4 rw 0 0\nserver:/export %s %s rw 0 0\n/dev/sdb1 %s ext4 rw 0 0\n'
                          % (tmp_path / 'shared', kind, local))
        with pytest.raises(ConfigError) as refusal:
            storechoice.check_sqlite_place(str(botssys), str(mounts))
        assert kind in str(refusal.value) and 'store = database' in str(refusal.value)
        assert len(str(refusal.value).splitlines()) == 1
        storechoice.check_sqlite_place(str(local), str(mounts))          # a local disk mounted below it
    mounts.write_text('/dev/sda1 / ext4 rw 0 0\ntmpfs %s tmpfs rw 0 0\n' % (tmp_path / 'shared'))
    storechoice.check_sqlite_place(str(botssys), str(mounts))
    assert storechoice.file_system(str(tmp_path)) != ''                 # this machine's own table is read


def test_the_database_of_settings_py(tmp_path):
    """store = database reads DATABASES['default'] from settings.py's text, without running it."""
    from bots.botsjobqueue import dbstore, storechoice
    (tmp_path / 'settings.py').write_text(
        "import os\nDATABASES = {\n    'default': {\n        'ENGINE': 'django.db.backends.postgresql',\n"
        "        'NAME': 'botsdb', 'USER': 'bots', 'PASSWORD': 'pw', 'HOST': 'db.example.com', 'PORT': '5433',\n"
        "        'OPTIONS': {'connect_timeout': os.environ.get('X', 5)},\n    }\n}\n")
    kind, arguments = dbstore.from_django(storechoice.settings_database(str(tmp_path)))
    assert (kind, arguments['host'], arguments['port'], arguments['database']) == ('postgresql', 'db.example.com',
                                                                                     5433, 'botsdb')
    (tmp_path / 'settings.py').write_text("DATABASES = {'default': {'ENGINE': 'django.db.backends.sqlite3', "
                                          "'NAME': os.path.join(BASE, 'botsdb')}}\n")
    with pytest.raises(ValueError) as refusal:
        dbstore.from_django(storechoice.settings_database(str(tmp_path)))
    assert 'PostgreSQL or MySQL' in str(refusal.value)
    assert dbstore.parse_url('mysql://u:p%40ss@h:3307/d') == ('mysql', dict(host='h', port=3307, user='u',
                                                                            password='p@ss', database='d'))
    with pytest.raises(ValueError):
        dbstore.parse_url('oracle://u@h/d')
