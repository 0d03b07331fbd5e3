"""The job queue server as Bots' clients see it: XML-RPC calls, launch order, logs."""
import os
import shutil
import socket
import sys
import time
import xmlrpc.client

import pytest

from conftest import finished_output, FAKE_ENGINE, wait_until


def test_jobs_run_in_priority_order_then_first_come_first_served(server):
    proxy = server.proxy()
    # A first job keeps the runner busy while the others queue up behind it.
    assert proxy.addjob(server.engine('blocker', '--sleep=1.5'), 5) == 0
    wait_until(lambda: server.runs('start'), message='the blocker to start')
    for name, priority in [('p5-a', 5), ('p9', 9), ('p1', 1), ('p5-b', 5), ('p3', 3), ('p1-b', 1)]:
        assert proxy.addjob(server.engine(name), priority) == 0
    waiting = proxy.listjobs()
    assert [job[2][2] for job in waiting] == ['p1', 'p1-b', 'p3', 'p5-a', 'p5-b', 'p9']
    assert [job[0] for job in waiting] == [1, 1, 3, 5, 5, 9]
    numbers = [job[1] for job in waiting]
    assert numbers[3] < numbers[4]                    # FIFO within priority 5
    wait_until(lambda: len(server.runs()) == 7, message='all jobs to run')
    assert [run['argv'][0] for run in server.runs()] == ['blocker', 'p1', 'p1-b', 'p3', 'p5-a', 'p5-b', 'p9']


def test_only_one_job_runs_at_a_time_and_the_next_starts_at_once(server):
    proxy = server.proxy()
    for number in range(5):
        assert proxy.addjob(server.engine('job%d' % number, '--sleep=0.2'), 5) == 0
    wait_until(lambda: len(server.runs()) == 5, message='five runs')
    runs = server.runs()
    for previous, following in zip(runs, runs[1:]):
        assert following['start'] >= previous['time'], 'two jobs overlapped'
        assert following['start'] - previous['time'] < 1.0, 'the next job did not start at once'


def test_nr_threads_runs_that_many_at_once(environment):
    environment.write_ini(jobqueue='nr_threads = 2')
    environment.start_server()
    proxy = environment.proxy()
    for number in range(4):
        proxy.addjob(environment.engine('job%d' % number, '--sleep=1'), 5)
    wait_until(lambda: len(environment.runs()) == 4, message='four runs')
    runs = sorted(environment.runs(), key=lambda run: run['start'])
    overlapping = max(sum(1 for other in runs if other['start'] < run['time'] and other['time'] > run['start'])
                      for run in runs)
    assert overlapping == 2


def test_duplicate_of_a_waiting_job_is_not_added(server):
    proxy = server.proxy()
    proxy.addjob(server.engine('blocker', '--sleep=1'), 5)
    wait_until(lambda: server.runs('start'), message='the blocker to start')
    assert proxy.addjob(server.engine('route1'), 5) == 0
    assert proxy.addjob(server.engine('route1'), 5) == 4
    assert len(proxy.listjobs()) == 1
    assert 'Duplicate job not added' in server.log()


def test_duplicate_with_other_priority_changes_priority_and_keeps_its_number(server):
    proxy = server.proxy()
    proxy.addjob(server.engine('blocker', '--sleep=1'), 5)
    wait_until(lambda: server.runs('start'), message='the blocker to start')
    proxy.addjob(server.engine('a'), 5)
    proxy.addjob(server.engine('b'), 5)
    number_b = proxy.listjobs()[1][1]
    assert proxy.addjob(server.engine('b'), 2) == 0
    waiting = proxy.listjobs()
    assert [(job[0], job[1], job[2][2]) for job in waiting][0] == (2, number_b, 'b')
    assert len(waiting) == 2
    wait_until(lambda: len(server.runs()) == 3, message='three runs')
    assert [run['argv'][0] for run in server.runs()] == ['blocker', 'b', 'a']


def test_a_job_equal_to_a_running_job_is_added(server):
    proxy = server.proxy()
    task = server.engine('same', '--sleep=1')
    assert proxy.addjob(task, 5) == 0
    wait_until(lambda: server.runs('start'), message='the job to start')
    assert proxy.addjob(task, 5) == 0
    wait_until(lambda: len(server.runs()) == 2, message='both runs')


def test_clearjobq_removes_waiting_jobs_not_the_running_one(server):
    proxy = server.proxy()
    proxy.addjob(server.engine('running', '--sleep=1'), 5)
    wait_until(lambda: server.runs('start'), message='the job to start')
    for number in range(3):
        proxy.addjob(server.engine('waiting%d' % number), 5)
    assert proxy.clearjobq() == 0
    assert proxy.listjobs() == []
    wait_until(lambda: server.runs(), message='the running job to end')
    time.sleep(0.5)
    assert [run['argv'][0] for run in server.runs()] == ['running']


def test_isup_and_empty_task(server):
    proxy = server.proxy()
    assert proxy.addjob(['isup'], 5) == 0
    assert proxy.addjob([], 5) == 2
    assert proxy.listjobs() == []


@pytest.mark.parametrize('task, priority', [
    ('bots-engine.py', 5),                 # not a list
    ([1, 2], 5),                           # not strings
    ([['nested']], 5),
    (['bots-engine.py'], 0),               # priority out of range
    (['bots-engine.py'], 10),
    (['bots-engine.py'], '5'),             # priority not an int
    (['bots-engine.py'], True),
    (['bots-engine.py'], 5.0),
])
def test_bad_arguments_give_a_fault_and_the_server_keeps_running(server, task, priority):
    proxy = server.proxy()
    with pytest.raises(xmlrpc.client.Fault) as fault:
        proxy.addjob(task, priority)
    assert 'task' in fault.value.faultString or 'priority' in fault.value.faultString
    assert proxy.addjob(['isup'], 5) == 0
    assert proxy.listjobs() == []


def test_unknown_method_and_malformed_xml(server):
    proxy = server.proxy()
    with pytest.raises(xmlrpc.client.Fault):
        proxy.getjob()
    with socket.create_connection(('127.0.0.1', server.port), timeout=5) as sock:
        body = b'<?xml version="1.0"?><methodCall><methodName>addjob</methodName><params><par'
        sock.sendall(b'POST /RPC2 HTTP/1.1\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n'
                     b'Connection: close\r\n\r\n%s' % (len(body), body))
        answer = sock.recv(65536)
    assert b'200' in answer.split(b'\r\n')[0] and b'<fault>' in answer
    assert proxy.addjob(['isup'], 5) == 0


def test_unauthorized_tasks_are_refused_and_never_run(server, tmp_path):
    marker = tmp_path / 'ran'
    proxy = server.proxy()
    # A shell, Python running code, a copy of the engine elsewhere, a relative name not on the PATH.
    impostor = tmp_path / 'bots-engine.py'
    impostor.write_text('import pathlib; pathlib.Path(%r).write_text("x")\n' % str(marker))
    tasks = [
        ['/bin/sh', '-c', 'touch %s' % marker],
        [sys.executable, '-c', 'open(%r, "w")' % str(marker)],
        [sys.executable, str(impostor)],
        [str(impostor)],
        ['no-such-program-on-the-path'],
    ]
    for task in tasks:
        assert proxy.addjob(task, 5) == 3, task
    assert proxy.listjobs() == []
    assert 'Refused job from 127.0.0.1, not an authorized task' in server.log()
    time.sleep(0.5)
    assert not marker.exists()


def test_authorized_tasks_allows_listed_programs(environment, tmp_path):
    program = tmp_path / 'my_program.sh'
    marker = tmp_path / 'ran'
    program.write_text('#!/bin/sh\necho "$@" > %s\n' % marker)
    program.chmod(0o755)
    environment.write_ini(jobqueue='authorized_tasks = %s, true' % program)
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.addjob([str(program), 'my_parm_1', 'my_parm_2'], 5) == 0
    assert proxy.addjob(['true'], 5) == 0
    assert proxy.addjob(['false'], 5) == 3
    wait_until(marker.exists, message='the authorized program to run')
    wait_until(lambda: marker.read_text() == 'my_parm_1 my_parm_2\n', message='its arguments')


def test_authorized_tasks_take_bots_4_separators(environment, tmp_path):
    programs = []
    for name in ('first', 'second', 'third', 'fourth'):
        program = tmp_path / name
        program.write_text('#!/bin/sh\necho %s >> %s\n' % (name, tmp_path / 'ran'))
        program.chmod(0o755)
        programs.append(str(program))
    environment.write_ini(jobqueue='authorized_tasks = %s %s;%s,\n    %s' % tuple(programs))
    environment.start_server()
    proxy = environment.proxy()
    assert [proxy.addjob([program], 5) for program in programs] == [0, 0, 0, 0]
    wait_until(lambda: (tmp_path / 'ran').exists() and len((tmp_path / 'ran').read_text().split()) == 4,
               message='the four programs')


def test_start_warns_once_for_each_program_that_would_be_refused(environment, tmp_path):
    missing_engine = str(tmp_path / 'nowhere' / 'bots-engine.py')
    environment.write_ini(settings='botsengine_path = %s' % missing_engine,
                          jobqueue='authorized_tasks = %s, no-such-program-here' % (tmp_path / 'gone'))
    environment.start_server()
    environment.proxy().listjobs()          # the server answers once its start-up is done
    warnings = [line for line in environment.log().splitlines() if 'WARNING' in line]
    assert len([line for line in warnings if 'botsengine_path: no program "%s"' % missing_engine in line]) == 1
    assert len([line for line in warnings if 'no program "%s"' % (tmp_path / 'gone') in line]) == 1
    assert len([line for line in warnings if 'no program "no-such-program-here" on the PATH or in' in line]) == 1


@pytest.mark.parametrize('authorized', ['', '*'])
def test_bare_engine_name_is_found_beside_the_configured_python(environment, tmp_path, authorized):
    """Beside Bots: the monitor queues the bare name bots-engine; Bots' scripts directory (that of
    python_executable_path) need not be on the server's PATH.  With ``*`` the name is started the
    way it was authorized."""
    scripts = tmp_path / 'bots-python' / 'bin'
    scripts.mkdir(parents=True)
    os.symlink(sys.executable, str(scripts / 'python'))
    engine = scripts / 'bots-engine'
    engine.write_text('#!%s\n%s' % (sys.executable, open(FAKE_ENGINE).read()))
    engine.chmod(0o755)
    environment.write_ini(settings='python_executable_path = %s\nbotsengine_path =' % (scripts / 'python'),
                          jobqueue='authorized_tasks = %s' % authorized)
    environment.start_server()
    assert shutil.which('bots-engine', path=environment.env['PATH']) is None
    proxy = environment.proxy()
    assert proxy.addjob(['bots-engine', '-cconfig', '--new'], 5) == 0
    assert proxy.addjob([str(scripts / 'python'), str(engine), '-cconfig', 'route'], 5) == 0
    wait_until(lambda: len(environment.runs()) == 2, message='both engine runs')
    assert [run['argv'] for run in environment.runs()] == [['-cconfig', '--new'], ['-cconfig', 'route']]
    assert 'WARNING' not in environment.log().replace('WARNING  : authorized_tasks = *', '')


def test_star_allows_any_program(environment, tmp_path):
    marker = tmp_path / 'ran'
    environment.write_ini(jobqueue='authorized_tasks = *')
    environment.start_server()
    assert environment.proxy().addjob(['/bin/sh', '-c', 'echo hi > %s' % marker], 5) == 0
    wait_until(marker.exists, message='the shell job to run')
    assert 'authorized_tasks = *' in environment.log()


def test_engine_direct_and_through_python_are_allowed(server):
    proxy = server.proxy()
    assert proxy.addjob([FAKE_ENGINE, 'direct'], 5) == 0
    assert proxy.addjob(server.engine('through-python'), 5) == 0
    wait_until(lambda: len(server.runs()) == 2, message='both runs')


def test_finished_jobs_are_logged_with_exit_code_and_output(server):
    proxy = server.proxy()
    proxy.addjob(server.engine('ok'), 5)
    proxy.addjob(server.engine('errors', '--exit=2'), 5)
    proxy.addjob(server.engine('broken', '--exit=1'), 5)
    wait_until(lambda: len(server.runs()) == 3, message='three runs')
    wait_until(lambda: server.log().count('Output of job') == 3, message='three outputs in the log')
    log = server.log()
    assert 'INFO     : Finished job 1, elapsed time 0:00:00, exit code 0' in log
    assert 'WARNING  : Finished job 2, elapsed time 0:00:00, exit code 2' in log
    assert 'ERROR    : Finished job 3, elapsed time 0:00:00, exit code 1' in log
    assert 'Output of job 2:\n2| fake engine started: errors --exit=2\n2| fake engine done\n' in log
    assert 'fake engine done' in log                     # stderr is captured too
    started = [line for line in log.splitlines() if 'Starting job 2: ' in line]
    added = [line for line in log.splitlines() if 'Added job 2, ' in line]
    assert started[0].split('Starting job 2: ')[1] == added[0].split(': ', 2)[2]    # the same task, written alike


def test_log_format_is_bots_format(server):
    server.proxy().addjob(['isup'], 5)
    first = server.log().splitlines()[0]
    # 20260101 12:00:00 STARTINFO: Bots jobqueue started.
    date, clock, rest = first.split(' ', 2)
    assert len(date) == 8 and date.isdigit() and len(clock) == 8
    assert rest == 'STARTINFO: Bots jobqueue started.'


def test_output_of_a_job_is_bounded(environment):
    environment.write_ini(jobqueue='output_limit = 10000')
    environment.start_server()
    environment.proxy().addjob(environment.engine('chatty', '--print=5000000'), 5)
    wait_until(lambda: 'Output of job 1' in environment.log(), message='the chatty job to end')
    log = environment.log()
    assert 'fake engine done' in log                 # the end of the output is kept
    assert 'fake engine started: chatty' in log      # and its start
    assert len(log) < 30000
    output = finished_output(environment.proxy(), 1)
    total = len('fake engine started: chatty --print=5000000\n') + 5000000 + len('fake engine done\n')
    marker = '\n[... %d bytes of output left out ...]\n' % (total - 10000)
    assert marker in output and len(output) == 10000 + len(marker)
    head, tail = output.split(marker)
    assert len(head) == len(tail) == 5000


def test_output_that_cannot_be_kept_is_said(environment):
    """The output directory becomes unusable while the server runs: the job runs, and the log
    and the history say that its output could not be kept."""
    environment.start_server()
    outputdir = os.path.join(environment.botssys, 'jobqueue', 'output')
    wait_until(lambda: os.path.isdir(outputdir), message='the output directory')
    os.rmdir(outputdir)
    with open(outputdir, 'w'):
        pass                       # a file where the directory was: no output file can be written
    environment.proxy().addjob(environment.engine('unkept'), 5)
    wait_until(lambda: 'could not be kept' in environment.log(), message='the lost output to be said')
    assert 'WARNING  : The output of job 1 could not be kept: [Errno 20] Not a directory' in environment.log()
    assert finished_output(environment.proxy(), 1).startswith('[the output could not be kept: ')
    assert environment.runs()[0]['argv'] == ['unkept']


def test_job_that_cannot_start_is_logged_and_the_queue_goes_on(environment, tmp_path):
    not_executable = tmp_path / 'not_executable'
    not_executable.write_text('#!/bin/sh\n')
    environment.write_ini(jobqueue='authorized_tasks = *')
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.addjob([str(tmp_path / 'missing-program')], 5) == 0
    assert proxy.addjob([str(not_executable)], 5) == 0
    assert proxy.addjob(environment.engine('after'), 5) == 0
    wait_until(lambda: environment.runs(), message='the queue to go on')
    log = environment.log()
    assert log.count('Error starting job') == 2


def test_maxruntime_is_logged_and_with_killjobsintimeout_the_job_is_killed(environment):
    environment.write_ini(settings='maxruntime = 0.01', jobqueue='killjobsintimeout = True')   # 0.6 s
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('slow', '--sleep=30'), 5)
    proxy.addjob(environment.engine('next'), 5)
    wait_until(lambda: environment.runs(), timeout=30, message='the next job after the kill')
    assert [run['argv'][0] for run in environment.runs()] == ['next']
    log = environment.log()
    assert 'Job 1 exceeded maxruntime of 0.01 minutes' in log
    assert 'Finished job 1' in log


def test_maxruntime_without_kill_only_logs(environment):
    environment.write_ini(settings='maxruntime = 0.01')
    environment.start_server()
    environment.proxy().addjob(environment.engine('slow', '--sleep=1.5'), 5)
    wait_until(lambda: environment.runs(), message='the slow job to end by itself')
    assert 'Job 1 exceeded maxruntime' in environment.log()


def test_port_in_use_is_one_clear_line(environment):
    with socket.socket() as other:
        other.bind(('127.0.0.1', environment.port))
        other.listen()
        result = environment.run('bots-jobqueueserver', '-c' + environment.configdir)
    assert result.returncode == 1
    assert 'is another bots-jobqueueserver running?' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_second_server_on_the_same_environment_is_refused(server):
    result = server.run('bots-jobqueueserver', '-c' + server.configdir)
    assert result.returncode == 1
    assert 'another bots-jobqueueserver' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert server.proxy().addjob(['isup'], 5) == 0


def test_sigterm_stops_the_server_with_exit_code_0(server):
    assert server.proxy().addjob(['isup'], 5) == 0
    assert server.stop_server() == 0
    assert 'Bots jobqueue stopped' in server.log()
