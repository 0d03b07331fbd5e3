"""bots-job2queue as schedulers call it: options, messages, exit codes."""
import os
import socket
import sys
import time

import pytest

from conftest import FAKE_ENGINE, wait_until


def test_adds_a_job_and_says_ok(server):
    result = server.job2queue(sys.executable, FAKE_ENGINE, '--new')
    assert result.returncode == 0
    assert result.stdout.strip() == 'OK, job is added to queue'
    wait_until(lambda: server.runs(), message='the job to run')
    assert server.runs()[0]['argv'] == ['--new']


def test_priority_and_duplicate(server):
    proxy = server.proxy()
    proxy.addjob(server.engine('blocker', '--sleep=1'), 5)
    wait_until(lambda: server.runs('start'), message='the blocker to start')
    assert server.job2queue('-p3', sys.executable, FAKE_ENGINE, 'route').returncode == 0
    result = server.job2queue('-p3', sys.executable, FAKE_ENGINE, 'route')
    assert result.returncode == 4
    assert result.stdout.strip() == 'Duplicate job, not added.'
    assert proxy.listjobs()[0][0] == 3


def test_options_after_the_task_belong_to_the_task(server):
    proxy = server.proxy()
    proxy.addjob(server.engine('blocker', '--sleep=1'), 5)
    wait_until(lambda: server.runs('start'), message='the blocker to start')
    # -p after the task is the task's; -c after the task is used and also passed on.
    result = server.run('bots-job2queue', sys.executable, FAKE_ENGINE, '-p1', '-c' + server.configdir)
    assert result.returncode == 0, result.stderr
    job = proxy.listjobs()[0]
    assert job[0] == 5
    assert job[2] == [sys.executable, FAKE_ENGINE, '-p1', '-c' + server.configdir]


def test_config_before_the_task_is_not_passed_on(server):
    server.proxy().addjob(server.engine('blocker', '--sleep=1'), 5)
    wait_until(lambda: server.runs('start'), message='the blocker to start')
    assert server.job2queue(sys.executable, FAKE_ENGINE).returncode == 0
    assert server.proxy().listjobs()[0][2] == [sys.executable, FAKE_ENGINE]


@pytest.mark.parametrize('option', ['-h', '--help', '?', '/?'])
def test_help(environment, option):
    result = environment.run('bots-job2queue', option)
    assert result.returncode == 0
    assert 'Usage:' in result.stdout and '-p<priority>' in result.stdout


@pytest.mark.parametrize('priority', ['-px', '-p0', '-p10', '-p'])
def test_bad_priority(server, priority):
    result = server.job2queue(priority, sys.executable, FAKE_ENGINE)
    assert result.returncode == 1
    assert 'priority' in result.stderr
    assert 'Traceback' not in result.stderr
    assert server.proxy().listjobs() == []


def test_no_task(server):
    result = server.job2queue()
    assert result.returncode == 2
    assert 'no task' in result.stderr


def test_not_authorized(server):
    result = server.job2queue('/bin/sh', '-c', 'true')
    assert result.returncode == 3
    assert 'not authorized' in result.stderr


def test_server_down(environment):
    result = environment.job2queue(sys.executable, FAKE_ENGINE)
    assert result.returncode == 1
    # Bots' words, then the port and the reason.
    assert result.stderr.strip() == ('Error, job not to jobqueue. Can not contact jobqueue-server (port %d: '
                                     '[Errno 111] Connection refused)' % environment.port)


def test_a_hanging_server_does_not_hang_the_client(environment):
    environment.write_ini(jobqueue='client_timeout = 1')
    with socket.socket() as silent:
        silent.bind(('127.0.0.1', environment.port))
        silent.listen()           # accepts connections, never answers
        started = time.monotonic()
        result = environment.job2queue(sys.executable, FAKE_ENGINE, timeout=30)
    assert result.returncode == 1
    assert time.monotonic() - started < 15


def test_not_enabled(environment):
    environment.write_ini(enabled=False)
    for program in ('bots-job2queue', 'bots-jobqueueserver.py'):
        result = environment.run(program, '-c' + environment.configdir, *(['x'] if 'job2' in program else []))
        assert result.returncode == 1
        assert result.stderr.strip() == 'Error: bots jobqueue cannot start; not enabled in %s' % os.path.join(
            environment.configdir, 'bots.ini')


@pytest.mark.parametrize('problem', ['missing dir', 'missing ini', 'malformed ini', 'empty -c'])
def test_configuration_errors_are_one_line(environment, problem):
    configdir = environment.configdir
    if problem == 'missing dir':
        configdir = os.path.join(environment.root, 'nowhere')
    elif problem == 'missing ini':
        os.remove(os.path.join(configdir, 'bots.ini'))
    elif problem == 'malformed ini':
        with open(os.path.join(configdir, 'bots.ini'), 'w') as handle:
            handle.write('this is [not an ini\n')
    else:
        configdir = ''
    for program in ('bots-job2queue', 'bots-jobqueueserver'):
        result = environment.run(program, '-c' + configdir, 'task')
        assert result.returncode == 1, (program, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert 'Traceback' not in result.stderr


def test_client_api(server):
    from bots.job2queue import send_job_to_jobqueue
    assert send_job_to_jobqueue(server.engine('api'), port=server.port) == 0
    assert send_job_to_jobqueue([], port=server.port) == 2
    assert send_job_to_jobqueue(['/bin/sh'], port=server.port) == 3
    assert send_job_to_jobqueue(['x'], priority=0, port=server.port) == 1     # refused: bad priority
    server.stop_server()
    assert send_job_to_jobqueue(server.engine('api'), port=server.port) == 1


def test_without_config_here_the_bundled_configuration_is_read(tmp_path):
    """Started from a directory without config/, the programs read the bundled bots.ini (which
    enables the queue) and keep botssys in the working directory.  ``bots-dirmonitor --reload``
    shows both without contacting any server (a server of the bundled configuration would use
    its fixed port, where someone's server may be)."""
    from conftest import script
    import subprocess
    import re
    result = subprocess.run([script('bots-dirmonitor'), '--reload'], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    trigger = tmp_path / 'botssys' / '.dirmonitor.trigger'
    # The installed package's own copy (site-packages, not this checkout).
    configdir = re.match(r'Warning: no bots-dirmonitor of "(.+)" runs now; the reload waits in the trigger file '
                         r'(.+), and a monitor that starts reads the configuration anyway\.$', result.stderr.strip())
    assert configdir, result.stderr
    assert configdir.group(1).endswith(os.path.join('bots', 'botsjobqueue', 'config'))
    assert os.path.isfile(os.path.join(configdir.group(1), 'bots.ini'))
    assert configdir.group(2) == str(trigger)
    assert trigger.read_text() == 'reload'


def test_arguments_with_markup_characters_arrive_unchanged(server):
    server.proxy().addjob(server.engine('blocker', '--sleep=1'), 5)
    wait_until(lambda: server.runs('start'), message='the blocker to start')
    odd = ['<route & "x">', "it's", 'ünïcödé', ']]>']
    assert server.job2queue(sys.executable, FAKE_ENGINE, *odd).returncode == 0
    assert server.proxy().listjobs()[0][2] == [sys.executable, FAKE_ENGINE] + odd
