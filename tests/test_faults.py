"""Faults aimed at the promises: a server killed at the worst instant of a start, shutdown
while a job from before a restart runs, a lost output keeper."""
import os
import re
import signal
import time

import pytest

from conftest import wait_until


def overlaps(runs):
    """Pairs of runs (by argv) that ran at the same time."""
    return [(a['argv'], b['argv']) for a, b in zip(runs, runs[1:]) if b['start'] < a['time']]


def test_a_kill_between_fork_and_stored_pid_never_runs_the_job_twice(environment):
    """The server dies right after forking the job, before it stored the pid (forced by a test
    hook): the restarted server must find the job and wait for it, not start a second copy; the
    job must not die of a broken pipe when it writes after its server died."""
    environment.server_env = {'BOTS_JOBQUEUE_TEST_KILL_AT': 'spawned'}
    environment.start_server()
    environment.proxy().addjob(environment.engine('first', '--sleep=2', '--late-print=200000'), 5)
    assert environment.server.wait(30) == -signal.SIGKILL
    environment.server_env = {}
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.addjob(environment.engine('second'), 5) == 0
    wait_until(lambda: len(environment.runs()) == 2, timeout=60, message='both jobs to end')
    time.sleep(0.5)
    starts = environment.runs('start')
    assert [run['argv'][0] for run in starts] == ['first', 'second'], 'the first job ran twice'
    assert overlaps(environment.runs()) == []
    assert 'Job 1 (pid %d) still runs from before the restart' % starts[0]['pid'] in environment.log()


def test_a_kill_between_the_fork_and_its_record_adopts_the_job_the_store_still_has_waiting(environment):
    """The job is forked before its record is written (the runner's lock file names it meanwhile):
    the server killed right after forking the second job, whose commit would also record the
    first one's end.  The restarted server finds the second job running although the store
    still has it waiting, and waits for it; the first is recorded or runs again - neither job
    is lost, none overlaps another."""
    environment.server_env = {'BOTS_JOBQUEUE_TEST_KILL_AT': 'spawned:2'}
    environment.start_server()
    proxy = environment.proxy()
    proxy.pause()
    proxy.addjob(environment.engine('first'), 5)
    proxy.addjob(environment.engine('second', '--sleep=2'), 5)
    proxy.resume()
    assert environment.server.wait(30) == -signal.SIGKILL
    environment.server_env = {}
    environment.start_server()
    proxy = environment.proxy()
    second = [run for run in environment.runs('start') if run['argv'][0] == 'second']
    assert len(second) == 1
    assert 'Job 2 (pid %d) still runs from before the restart' % second[0]['pid'] in environment.log()
    assert proxy.showjob(2)['state'] == 'running'
    wait_until(lambda: proxy.showjob(2).get('state') == 'finished' and proxy.showjob(1).get('state') == 'finished',
               timeout=60, message='both jobs in the history')
    time.sleep(0.5)
    runs = environment.runs()
    assert [run['argv'][0] for run in runs].count('second') == 1, 'the second job ran twice'
    assert 1 <= [run['argv'][0] for run in runs].count('first') <= 2
    assert overlaps(sorted(runs, key=lambda run: run['start'])) == []


def test_the_lock_files_deleted_while_the_server_runs_stop_no_job(environment):
    """An operator clears botssys/jobqueue/running/ (files that look stale): the next job starts
    all the same - its runner makes the directory again."""
    import shutil
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('before'), 5)
    wait_until(lambda: len(environment.runs()) == 1, message='the first job to end')
    shutil.rmtree(os.path.join(environment.botssys, 'jobqueue', 'running'))
    # The runner may hold its file for the next job already (open, now unlinked): the job after
    # that one is the first to need the directory again.
    proxy.addjob(environment.engine('after-1'), 5)
    proxy.addjob(environment.engine('after-2'), 5)
    wait_until(lambda: len(environment.runs()) == 3, timeout=30, message='the next two jobs to run')
    assert [run['argv'][0] for run in environment.runs()] == ['before', 'after-1', 'after-2']
    wait_until(lambda: os.path.isfile(os.path.join(environment.botssys, 'jobqueue', 'running', 'runner-1.lock')),
               timeout=10, message='the runner to make its lock file again')


def adopted_after_restart(environment, jobqueue, *engine_args):
    """A server killed while its job runs, and started again: it has adopted the job."""
    environment.write_ini(jobqueue=jobqueue)
    environment.start_server()
    environment.proxy().addjob(environment.engine(*engine_args), 5)
    wait_until(lambda: environment.runs('start'), message='the job to start')
    environment.stop_server(signal.SIGKILL)
    environment.start_server()
    wait_until(lambda: 'still runs from before the restart' in environment.log(), message='the adoption')


def test_shutdown_gives_an_adopted_job_its_grace(environment):
    """SIGTERM while a job adopted after a restart runs: it gets shutdown_grace like any job,
    ends normally, and does not run again at the next start."""
    adopted_after_restart(environment, 'shutdown_grace = 30', 'adopted', '--sleep=3')
    assert environment.stop_server(signal.SIGTERM) == 0
    assert [run['argv'][0] for run in environment.runs()] == ['adopted']     # it ended by itself
    assert 'Waiting up to 30 seconds for running job(s) 1 to finish; stop again' in environment.log()
    assert 'Stopping job 1' not in environment.log()
    assert re.search(r'INFO     : Finished job 1, elapsed time \S+; it ran on from before the restart, so its '
                     r'exit code cannot be known', environment.log())
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.listjobs() == [] and proxy.status()['running'] == []
    time.sleep(0.5)
    assert len(environment.runs('start')) == 1


def test_shutdown_stops_an_adopted_job_after_the_grace_and_keeps_it(environment):
    adopted_after_restart(environment, 'shutdown_grace = 1', 'long', '--sleep=60')
    assert environment.stop_server(signal.SIGTERM) == 0
    assert 'Stopping job 1: the server shuts down' in environment.log()
    environment.start_server()
    wait_until(lambda: len(environment.runs('start')) == 2, message='the stopped job to run again')


def test_a_failing_store_pauses_the_queue_and_it_goes_on(environment):
    """The store cannot be written for a while (here another process holds the database
    locked): the runner waits, says so once, and goes on the moment it can."""
    import sqlite3
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('blocker', '--sleep=1'), 5)
    wait_until(lambda: environment.runs('start'), message='the blocker to start')
    assert proxy.addjob(environment.engine('after'), 5) == 0
    blocker = sqlite3.connect(os.path.join(environment.botssys, 'jobqueue.db'), isolation_level=None)
    blocker.execute('BEGIN EXCLUSIVE')
    wait_until(lambda: 'The job store is locked by another process' in environment.log(), timeout=60,
               message='the store error')
    blocker.execute('ROLLBACK')
    blocker.close()
    wait_until(lambda: len(environment.runs()) == 2, timeout=60, message='the next job to run')
    assert [run['argv'][0] for run in environment.runs()] == ['blocker', 'after']
    assert 'The job store works again' in environment.log()


def damage_truncate(db):
    open(db, 'w').close()


def damage_garbage(db):
    with open(db, 'r+b') as handle:
        handle.write(b'\xde\xad' * 50)          # the database header


def damage_vanish(db):
    os.remove(db)


@pytest.mark.parametrize('stop, damage', [(signal.SIGKILL, damage_truncate), (signal.SIGTERM, damage_garbage),
                                          (signal.SIGKILL, damage_vanish)])
def test_a_damaged_database_is_refused_in_one_line(environment, stop, damage):
    environment.write_ini(jobqueue='shutdown_grace = 0.1')
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('blocker', '--sleep=30'), 5)
    for number in range(50):
        proxy.addjob(environment.engine('waiting%d' % number), 5)
    environment.stop_server(stop)    # SIGKILL leaves the write-ahead log; SIGTERM writes all into the database
    db = os.path.join(environment.botssys, 'jobqueue.db')
    damage(db)
    environment.start_server(wait=False)
    assert environment.server.wait(30) == 1
    stderr = environment.server.stderr.read()
    assert len(stderr.splitlines()) == 1 and stderr.startswith('Error: the job store ') and 'damaged' in stderr
    kept = re.search(r'a copy is kept as (\S+?)\.  ', stderr)
    assert kept and os.path.isfile(kept.group(1)), stderr


@pytest.mark.timeout(400)
def test_kills_aimed_at_the_end_of_a_job_leave_it_recorded_or_run_again(environment):
    """The server killed within milliseconds of a job's end, again and again (with and without a
    next job waiting): each job is afterwards in the history, having run once or run again -
    never neither."""
    environment.write_ini(jobqueue='nr_threads = 1')
    without_trace, recorded_once, ran_again = [], 0, 0
    rounds = 30
    jobnumber = 0
    for n in range(rounds):
        environment.start_server()
        proxy = environment.proxy()
        marker = os.path.join(environment.root, 'killed-%d' % n)
        delay = (n * 7) % 40            # 0..39 ms after the job's end
        assert proxy.addjob(environment.engine('end-%d' % n, '--kill-once=%s:%d:%d'
                                               % (marker, environment.server.pid, delay)), 5) == 0
        jobnumber += 1
        first = jobnumber
        if n % 2:
            proxy.addjob(environment.engine('next-%d' % n), 5)
            jobnumber += 1
        assert environment.server.wait(30) == -signal.SIGKILL
        environment.start_server()
        proxy = environment.proxy()
        try:
            wait_until(lambda: proxy.showjob(first).get('state') == 'finished', timeout=15,
                       message='job %d in the history' % first)
        except AssertionError:
            without_trace.append((first, delay, proxy.showjob(first)))
        else:
            # Its output is kept too (collected at the restart when the server died before it could).
            wait_until(lambda: 'fake engine started: end-%d' % n in proxy.showjob(first).get('output', ''),
                       timeout=15, message='the output of job %d' % first)
        runs = [run for run in environment.runs() if run['argv'][0] == 'end-%d' % n]
        if len(runs) == 1:
            recorded_once += 1
        else:
            ran_again += 1
        wait_until(lambda: not proxy.status()['running'] and not proxy.listjobs(), timeout=15, message='idle')
        environment.stop_server()
    print('\n%d aimed kills: %d recorded after one run, %d run again, %d without a trace'
          % (rounds, recorded_once, ran_again, len(without_trace)))
    assert without_trace == []
    assert overlaps(sorted(environment.runs(), key=lambda run: run['start'])) == []


def test_one_server_per_botssys_even_after_its_lock_file_is_deleted(environment, tmp_path):
    """A second server on the same botssys (another configuration, another port) is refused in
    one line while the first runs, whatever files an operator deleted; it starts once the
    first has stopped."""
    import shutil
    import subprocess
    from conftest import free_port, script
    environment.start_server()
    second = tmp_path / 'second-config'
    shutil.copytree(environment.configdir, str(second))
    ini = (second / 'bots.ini').read_text().replace('port = %d' % environment.port, 'port = %d' % free_port())
    ini = ini.replace('botssys = botssys', 'botssys = %s' % environment.botssys)
    (second / 'bots.ini').write_text(ini)
    for leftover in ('jobqueue.lock', os.path.join('jobqueue', '.bots-jobqueueserver.lock')):
        try:
            os.remove(os.path.join(environment.botssys, leftover))
        except OSError:
            pass
    refused = subprocess.run([script('bots-jobqueueserver'), '-c%s' % second], cwd=environment.root,
                             env=environment.env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1
    assert refused.stderr.strip() == ('Error: another bots-jobqueueserver runs on botssys %s; only one may run '
                                      'there at a time.' % environment.botssys)
    assert environment.proxy().addjob(['isup'], 5) == 0
    environment.stop_server()
    started = subprocess.Popen([script('bots-jobqueueserver'), '-c%s' % second], cwd=environment.root,
                               env=environment.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        assert started.poll() is None, started.stderr.read()
    finally:
        started.terminate()
        started.wait(30)


@pytest.mark.timeout(180)
def test_a_store_locked_by_another_process_never_freezes_the_port(environment):
    """An operator's sqlite3 session holds the database in an exclusive transaction for 3 s while
    probes and clients come: every probe and read is answered, an add that cannot be stored
    within half of client_timeout gets a clear 'try again' (exit 1), no job whose client was
    told it failed runs, none that was acknowledged is lost, and the queue goes on at once."""
    import subprocess
    import sys
    import threading
    import urllib.request
    environment.write_ini(jobqueue='client_timeout = 4\nnr_threads = 1')
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.addjob(environment.engine('before'), 5) == 0
    wait_until(lambda: environment.runs(), message='a first run')
    holder = subprocess.Popen([sys.executable, '-c', '''if True:
        import sqlite3, sys, time
        db = sqlite3.connect(sys.argv[1], isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        db.execute("INSERT INTO setting VALUES ('held by a test', '1')")
        print("locked", flush=True)
        time.sleep(3)
        db.execute("ROLLBACK")
        ''', os.path.join(environment.botssys, 'jobqueue.db')], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    locked_at = time.monotonic()
    probes, told = [], {}

    def probe():
        for _ in range(20):
            started = time.monotonic()
            try:
                with urllib.request.urlopen('http://127.0.0.1:%d/health' % environment.port, timeout=2) as answer:
                    probes.append((answer.status, time.monotonic() - started))
            except Exception as exc:
                probes.append((repr(exc), time.monotonic() - started))
            time.sleep(0.2)

    def client(n):
        result = environment.job2queue(*environment.engine('locked-%d' % n), timeout=30)
        told[n] = (result.returncode, result.stdout + result.stderr)

    reads = []

    def read():
        reader = environment.proxy()
        while time.monotonic() - locked_at < 3:
            started = time.monotonic()
            reader.status()
            reader.history(5)
            reads.append(time.monotonic() - started)
            time.sleep(0.2)

    threads = [threading.Thread(target=probe), threading.Thread(target=read)] + [
        threading.Thread(target=client, args=(n,)) for n in range(38)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(60)
    holder.wait(30)
    acknowledged = {n for n, (code, _) in told.items() if code == 0}
    refused = {n for n, (code, _) in told.items() if code != 0}
    print('\nstore locked 3 s: %d probes answered of %d (slowest %.3f s), slowest read %.3f s, %d adds '
          'acknowledged, %d told to try again'
          % (sum(1 for status, _ in probes if status == 200), len(probes), max(t for _, t in probes),
             max(reads), len(acknowledged), len(refused)))
    assert all(status == 200 for status, _ in probes), probes
    assert max(reads) < 1.0
    assert refused and acknowledged              # the early ones waited in vain, the later ones got in
    for n in refused:
        assert told[n][0] == 1 and 'not stored, try again' in told[n][1], told[n]
    wait_until(lambda: {run['argv'][0] for run in environment.runs()} >= {'locked-%d' % n for n in acknowledged},
               timeout=60, message='every acknowledged job to run')
    time.sleep(1.5)
    ran = [run['argv'][0] for run in environment.runs()]
    assert not [n for n in refused if 'locked-%d' % n in ran], 'jobs told "failed" ran anyway'
    assert len(ran) == len(set(ran)) == len(acknowledged) + 1
    assert proxy.addjob(environment.engine('after'), 5) == 0
    wait_until(lambda: 'after' in [run['argv'][0] for run in environment.runs()], message='the queue to go on')
