"""No run lost: kill -9 and restart, SIGTERM, engine exit codes, the history."""
import os
import re
import signal
import time

from bots.botsjobqueue.processes import is_alive
from conftest import finished_output, wait_until


def add_many(proxy, environment, count, prefix='job'):
    for number in range(count):
        assert proxy.addjob(environment.engine('%s%d' % (prefix, number)), 1 + number % 9) == 0


def test_kill_9_and_restart_keeps_every_acknowledged_job_in_order(environment):
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('running', '--sleep=3'), 5)
    wait_until(lambda: environment.runs('start'), message='the first job to start')
    add_many(proxy, environment, 300)
    before = proxy.listjobs()
    assert len(before) == 300
    environment.stop_server(signal.SIGKILL)

    environment.start_server()
    proxy = environment.proxy()
    assert proxy.listjobs() == before
    # The job from before the restart still runs: nothing starts until it ends.
    assert len(environment.runs('start')) == 1
    assert proxy.status()['running'][0]['jobnumber'] == 1
    wait_until(lambda: len(environment.runs()) == 301, timeout=120, message='all jobs to run')
    runs = environment.runs()
    assert runs[0]['argv'][0] == 'running'
    assert sorted(run['argv'][0] for run in runs[1:]) == sorted('job%d' % n for n in range(300))
    for previous, following in zip(runs, runs[1:]):
        assert following['start'] >= previous['time'], 'two jobs ran at once'
    # Launch order after the restart is the acknowledged order.
    assert [run['argv'][0] for run in runs[1:]] == [job[2][2] for job in before]
    assert 'still runs from before the restart' in environment.log()


def test_job_numbers_keep_increasing_across_restarts(environment):
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('one'), 5)
    wait_until(lambda: environment.runs(), message='the first run')
    environment.stop_server(signal.SIGKILL)
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('blocker', '--sleep=1'), 5)
    proxy.addjob(environment.engine('two'), 5)
    assert proxy.listjobs()[-1][1] == 3


def test_a_running_job_that_died_with_the_server_is_queued_again_once(environment):
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('cut-off', '--sleep=30'), 5)
    start = wait_until(lambda: environment.runs('start'), message='the job to start')[0]
    environment.stop_server(signal.SIGKILL)
    os.killpg(start['pid'], signal.SIGKILL)
    wait_until(lambda: not is_alive(start['pid'], ''), message='the job to die')

    environment.start_server()
    wait_until(lambda: len(environment.runs('start')) == 2, message='the job to run again')
    assert 'was running when the server stopped and did not finish; queued again' in environment.log()


def test_sigterm_lets_a_short_job_finish(environment):
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('short', '--sleep=1'), 5)
    proxy.addjob(environment.engine('waits'), 5)
    wait_until(lambda: environment.runs('start'), message='the job to start')
    assert environment.stop_server(signal.SIGTERM) == 0
    assert [run['argv'][0] for run in environment.runs()] == ['short']
    environment.start_server()
    wait_until(lambda: len(environment.runs()) == 2, message='the waiting job after the restart')


def test_sigterm_stops_a_long_job_after_the_grace_and_keeps_it(environment):
    environment.write_ini(jobqueue='shutdown_grace = 1')
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('long', '--sleep=60'), 5)
    wait_until(lambda: environment.runs('start'), message='the job to start')
    started = time.monotonic()
    assert environment.stop_server(signal.SIGTERM) == 0
    assert time.monotonic() - started < 20
    assert environment.runs() == []
    assert 'it will run again at the next start' in environment.log()
    environment.start_server()
    wait_until(lambda: len(environment.runs('start')) == 2, message='the stopped job to start again')


def test_engine_exit_code_3_is_queued_again(environment, tmp_path):
    exit_file = tmp_path / 'exit'
    exit_file.write_text('3')
    environment.write_ini(jobqueue='locked_retry_delay = 0.5')
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('locked', '--exit-file=%s' % exit_file), 5)
    wait_until(lambda: environment.runs(), message='the first run')
    exit_file.write_text('0')
    wait_until(lambda: len(environment.runs()) == 2, message='the run again')
    assert 'database is locked by another run; queued again in 0.5 seconds' in environment.log()
    history = wait_until(lambda: proxy.history(10), message='the history')
    assert len(history) == 1 and history[0]['exitcode'] == 0
    assert [attempt['exitcode'] for attempt in history[0]['attempts']] == [3]      # both runs are kept
    shown = environment.run('bots-jobqueue', '-c' + environment.configdir, 'history')
    assert 'ok (run 2)' in shown.stdout
    # The output of the run that was queued again is kept like any run's, and logged as a warning.
    attempt = wait_until(lambda: proxy.showjob(1)['attempts'][0].get('output'), message="the first run's output")
    assert 'fake engine started: locked' in attempt
    assert 'exit code 3' in environment.run('bots-jobqueue', '-c' + environment.configdir, 'show', '1').stdout
    assert re.search(r'WARNING  : Finished job 1, elapsed time \S+, exit code 3', environment.log())


def test_a_delayed_job_shows_when_it_is_retried(environment):
    environment.write_ini(jobqueue='locked_retry_delay = 30')
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('locked', '--exit=3'), 5)
    wait_until(lambda: proxy.status()['retry_at'], message='the job to wait for its retry')
    status = proxy.status()
    assert status['running'] == [] and [job[1] for job in status['waiting']] == [1]
    assert 25 < status['retry_at']['1'] - time.time() <= 30
    shown = environment.run('bots-jobqueue', '-c' + environment.configdir, 'status')
    assert '(engine database was locked; retried at ' in shown.stdout


def test_delayed_job_survives_a_restart(environment, tmp_path):
    environment.write_ini(jobqueue='locked_retry_delay = 2')
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('locked', '--exit=3'), 5)
    wait_until(lambda: environment.runs(), message='the first run')
    wait_until(lambda: proxy.listjobs(), message='the job to wait again')
    environment.stop_server(signal.SIGKILL)
    environment.start_server()
    wait_until(lambda: len(environment.runs()) == 2, message='the run after the delay')


def test_history_keeps_finished_jobs_bounded(environment):
    environment.write_ini(jobqueue='history = 3')
    environment.start_server()
    proxy = environment.proxy()
    for number in range(5):
        proxy.addjob(environment.engine('h%d' % number, '--exit=%d' % (number % 3)), 5)
    wait_until(lambda: len(environment.runs()) == 5, message='five runs')
    wait_until(lambda: proxy.history(1)[0]['jobnumber'] == 5 and proxy.history(1)[0].get('output'),
               message='the newest job in the history')
    history = proxy.history(10)
    assert [record['jobnumber'] for record in history] == [5, 4, 3]
    assert [record['exitcode'] for record in history] == [1, 0, 2]
    assert 'fake engine started: h4' in history[0]['output']


def test_a_job_writing_after_its_server_was_killed_neither_dies_nor_blocks(environment):
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('orphan', '--sleep=2', '--late-print=5000000'), 5)
    wait_until(lambda: environment.runs('start'), message='the job to start')
    environment.stop_server(signal.SIGKILL)
    # Nobody reads the job's output in the server any more: the capture process does.  The
    # restarted server finds the job still running and waits for it.
    environment.start_server()
    end = wait_until(lambda: environment.runs(), timeout=30, message='the orphaned job to finish')[0]
    assert end['argv'][0] == 'orphan'
    assert len(environment.runs('start')) == 1
    history = wait_until(lambda: environment.proxy().history(5), message='the job in the history')
    assert history[0]['jobnumber'] == 1 and history[0]['status'] == 'ended'
    assert 'fake engine done' in finished_output(environment.proxy(), 1)


def test_a_lost_output_keeper_is_replaced(environment):
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('first'), 5)
    wait_until(lambda: 'Output of job 1' in environment.log(), message='the first output')
    keepers = [pid for pid in map(int, filter(str.isdigit, os.listdir('/proc'))) if _is_keeper_of(pid, environment)]
    assert len(keepers) == 1
    os.kill(keepers[0], signal.SIGKILL)
    proxy.addjob(environment.engine('second'), 5)
    wait_until(lambda: 'Output of job 2' in environment.log(), message='the second output')
    assert 'output keeper (pid %d) is gone' % keepers[0] in environment.log()


def _is_keeper_of(pid, environment):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as handle:
            argv = handle.read().split(b'\0')
        with open('/proc/%d/stat' % pid) as handle:
            parent = int(handle.read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return b'--serve' in argv and parent == environment.server.pid


def test_a_killed_output_keeper_loses_no_output_silently_and_delays_no_job(environment):
    """The keeper is killed while a job floods, one is quiet and one prints in bursts: the new
    keeper takes every pipe at once; each output that lost bytes says so in one line, none is
    empty without a note, and the next job starts at once."""
    environment.write_ini(jobqueue='nr_threads = 3')
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('flood', '--print=300000', '--sleep=3', '--late-print=5000'), 5)
    proxy.addjob(environment.engine('quiet', '--sleep=3'), 5)
    proxy.addjob(environment.engine('burst', '--print=2000', '--sleep=2.5', '--late-print=2000'), 5)
    wait_until(lambda: len(environment.runs('start')) == 3, message='three jobs to run')
    time.sleep(1.5)                       # their first output is with the keeper (and its snapshots)
    keepers = [pid for pid in map(int, filter(str.isdigit, os.listdir('/proc'))) if _is_keeper_of(pid, environment)]
    os.kill(keepers[0], signal.SIGKILL)
    wait_until(lambda: 'output keeper (pid %d) is gone' % keepers[0] in environment.log(), message='the new keeper')
    asked = time.monotonic()
    proxy.addjob(environment.engine('next'), 5)
    wait_until(lambda: 'next' in [run['argv'][0] for run in environment.runs('start')], message='the next job')
    assert time.monotonic() - asked < 3
    history = wait_until(lambda: len(proxy.history(10)) == 4 and all(r.get('output') for r in proxy.history(10))
                         and proxy.history(10), timeout=30, message='four finished jobs with outputs')
    outputs = {record['task'][2]: record['output'] for record in history}
    note = 'the output keeper was restarted here: output before this line may be missing'
    assert outputs['flood'].count(note) == 1 and 'fake engine done' in outputs['flood']
    assert outputs['burst'].count(note) == 1 and 'fake engine done' in outputs['burst']
    assert 'fake engine done' in outputs['quiet'] and outputs['next'].startswith('fake engine started: next')
    assert all(output.strip() for output in outputs.values())
