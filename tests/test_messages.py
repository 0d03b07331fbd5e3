"""What an operator reads: every wrong command line or bots.ini is one line that starts with
``Error:`` and exits as documented; signals mean the same to both daemons; shutdown says what
it waits for."""
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import script, wait_until

PROGRAMS = ('bots-jobqueueserver', 'bots-dirmonitor', 'bots-job2queue', 'bots-jobqueue')


def one_error_line(result, *expected):
    lines = result.stderr.splitlines()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith('Error: '), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def run_in(root, name, *args):
    return subprocess.run([script(name)] + list(args), cwd=str(root), capture_output=True, text=True, timeout=30)


def with_ini(tmp_path, name, text):
    """Run program ``name`` (with a task where it needs one) on a bots.ini of ``text``."""
    inifile = tmp_path / 'config' / 'bots.ini'
    inifile.parent.mkdir(exist_ok=True)
    inifile.write_text(text)
    return run_in(tmp_path, name, *(['task'] if name == 'bots-job2queue' else [])), str(inifile)


@pytest.mark.parametrize('name', PROGRAMS)
def test_a_bots_ini_syntax_error_names_file_and_line(tmp_path, name):
    result, inifile = with_ini(tmp_path, name, '[jobqueue]\nenabled = True\nnr_threads 2\n')
    one_error_line(result, inifile, 'line 3', '"nr_threads 2"')
    result, inifile = with_ini(tmp_path, name, 'enabled = True\n[jobqueue]\n')
    one_error_line(result, 'line 1', 'before any [section]')


@pytest.mark.parametrize('name', PROGRAMS)
def test_a_wrong_value_names_section_key_value_and_file(tmp_path, name):
    result, inifile = with_ini(tmp_path, name, '[jobqueue]\nenabled = True\nport = abc\n')
    one_error_line(result, "[jobqueue] port should be a whole number, not 'abc'", inifile)


@pytest.mark.parametrize('args, expected', [
    (['show'], 'write "bots-jobqueue show N" (a job number)'),
    (['remove'], 'write "bots-jobqueue remove N"'),
    (['remove', 'x'], 'needs a whole number, not "x"'),
    (['--jsn', 'status'], 'unknown option "--jsn"'),
    (['status', 'extra'], '"status" takes no arguments'),
    (['-p3', 'status'], 'unknown option "-p3"'),
    (['frobnicate'], 'unknown command "frobnicate"'),
])
def test_bots_jobqueue_says_what_is_wrong_with_the_command_line(environment, args, expected):
    line = one_error_line(environment.run('bots-jobqueue', '-c' + environment.configdir, *args), expected)
    assert line.endswith('see bots-jobqueue --help')


@pytest.mark.parametrize('args, expected', [
    (['-x', 'task'], 'unknown option "-x" (options come before the task)'),
    (['-p', '3', 'task'], 'write -p3, not -p 3'),
    (['-pthree', 'task'], 'priority should be numeric'),
    (['-p0', 'task'], 'from 1 (highest) to 9 (lowest), not 0'),
])
def test_bots_job2queue_says_what_is_wrong_with_the_command_line(environment, args, expected):
    line = one_error_line(environment.job2queue(*args), expected)
    assert line.endswith('see bots-job2queue.py --help')


@pytest.mark.parametrize('name', PROGRAMS)
def test_help_into_a_closed_pipe_ends_quietly(tmp_path, name):
    """``--help | head -1``: the first line, and no traceback."""
    result = subprocess.run('"%s" --help | head -1' % script(name), shell=True, cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith('This is "%s"' % name)
    assert result.stderr == ''


@pytest.mark.parametrize('name', PROGRAMS)
def test_help_lists_every_option_and_the_exit_codes(tmp_path, name):
    text = run_in(tmp_path, name, '--help').stdout
    assert '-c<directory>' in text and 'Exit codes' in text
    # Our own version, and the Bots it is for (no Bots in this Python).
    from bots.botsjobqueue import __version__
    assert text.startswith('This is "%s" (bots-jobqueue %s, for Bots 3.3.1 and 4.0)' % (name, __version__)), text
    if name in ('bots-jobqueueserver', 'bots-dirmonitor'):
        for sig in ('SIGTERM', 'SIGINT', 'SIGHUP'):
            assert sig in text


def test_a_refused_second_server_leaves_nothing_behind(server, tmp_path):
    """A second server on a taken port: one line, and no lock file or log in its directory."""
    other = tmp_path / 'other'
    (other / 'config').mkdir(parents=True)
    with open(os.path.join(server.configdir, 'bots.ini')) as handle:
        ini = handle.read()
    (other / 'config' / 'bots.ini').write_text(ini)
    one_error_line(run_in(other, 'bots-jobqueueserver'), 'cannot listen on 127.0.0.1 port %d' % server.port)
    assert not (other / 'botssys').exists()


@pytest.mark.parametrize('wrong', ['[jobqueue]\nkill_grace = soon', '[jobqueue]\nlog_file_level = LOUD',
                                   '[settings]\nmaxruntime = long', '[jobqueue]\nshutdown_grace = x'])
def test_a_wrong_value_is_said_before_the_port_is_tried(server, tmp_path, wrong):
    """Another server holds the port and bots.ini has a wrong value: the value is what is said."""
    other = tmp_path / 'other'
    (other / 'config').mkdir(parents=True)
    with open(os.path.join(server.configdir, 'bots.ini')) as handle:
        ini = handle.read()
    (other / 'config' / 'bots.ini').write_text(ini + '\n' + wrong + '\n')
    key = wrong.split('\n')[1].split(' = ')[0]
    one_error_line(run_in(other, 'bots-jobqueueserver'), key)


def test_a_priority_change_is_logged_as_one(server):
    proxy = server.proxy()
    proxy.addjob(server.engine('blocker', '--sleep=5'), 1)
    wait_until(lambda: server.runs('start'), message='the blocker to start')
    task = server.engine('waiting')
    assert proxy.addjob(task, 5) == 0
    assert proxy.addjob(task, 2) == 0
    assert 'Priority of waiting job 2 changed from 5 to 2' in server.log()
    assert server.log().count('Added job 2') == 1


def test_sighup_reloads_the_server(environment, tmp_path):
    """SIGHUP re-reads bots.ini (as it does for the dirmonitor): a program allowed afterwards
    runs; a broken bots.ini is logged and the one in use kept; the server never stops."""
    program = tmp_path / 'allowed-later'
    program.write_text('#!/bin/sh\necho later\n')
    program.chmod(0o755)
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.addjob([str(program)], 5) == 3
    environment.write_ini(jobqueue='authorized_tasks = %s' % program)
    environment.server.send_signal(signal.SIGHUP)
    wait_until(lambda: 'configuration reloaded' in environment.log(), message='the reload')
    assert proxy.addjob([str(program)], 5) == 0
    with open(os.path.join(environment.configdir, 'bots.ini'), 'a') as handle:
        handle.write('this is not ini\n')
    environment.server.send_signal(signal.SIGHUP)
    wait_until(lambda: 'Reload refused; the configuration in use is kept.' in environment.log(),
               message='the refused reload')
    assert environment.server.poll() is None
    assert proxy.addjob([str(program), 'again'], 5) == 0        # still allowed: the old one is kept


def test_a_second_stop_signal_stops_running_jobs_at_once(environment):
    """Ctrl-C while a job runs: the server says what it waits for and for how long; a second
    Ctrl-C stops the job now, and it is kept for the next start."""
    environment.write_ini(jobqueue='shutdown_grace = 120')
    environment.start_server()
    environment.proxy().addjob(environment.engine('long', '--sleep=60'), 5)
    wait_until(lambda: environment.runs('start'), message='the job to start')
    environment.server.send_signal(signal.SIGINT)
    wait_until(lambda: 'Waiting up to 120 seconds for running job(s) 1 to finish; stop again (Ctrl-C, SIGTERM) '
               'to stop them now' in environment.log(), message='the waiting line')
    # Meanwhile the operator's tools get answers: the status says why, an add is refused with why.
    status = environment.run('bots-jobqueue', '-c' + environment.configdir, 'status')
    assert status.returncode == 0, status.stderr
    assert re.search(r'The server is stopping, waits for job 1 for up to 1[01]\d s; new jobs are refused',
                     status.stdout), status.stdout
    added = environment.job2queue(*environment.engine('too-late'))
    assert added.returncode == 1 and 'the server is stopping, waits for job 1' in added.stderr, added.stderr
    started = time.monotonic()
    environment.server.send_signal(signal.SIGINT)
    assert environment.server.wait(30) == 0
    assert time.monotonic() - started < 15
    log = environment.log()
    assert 'Asked to stop again: stopping running job(s) 1 now.' in log
    assert re.search(r'WARNING  : Stopped job 1 at the shutdown after \S+ \(exit code -\d+\); it is kept and '
                     r'runs again at the next start\.', log), log
    assert 'ERROR' not in log
    environment.start_server()
    assert environment.proxy().showjob(1)['state'] in ('waiting', 'starting', 'running')


def test_a_misspelt_key_is_warned_about_with_the_nearest_known_one(environment):
    """nr_thread = 2 starts, with one warning that names nr_threads; keys Bots writes are known."""
    environment.write_ini(jobqueue='nr_thread = 2\nlauchfrequency = 5\nlog_level = INFO',
                          extra='[schedule1]\nwhen = @yearly\ntask = x\nprority = 3\n')
    environment.start_server()
    log = environment.log()
    assert '[jobqueue] nr_thread is not a key the job queue knows (did you mean nr_threads?); it has no ' \
           'effect (in %s).' % os.path.join(environment.configdir, 'bots.ini') in log
    assert '[schedule1] prority is not a key the job queue knows (did you mean priority?)' in log
    assert log.count('is not a key the job queue knows') == 2      # lauchfrequency and log_level are Bots'


@pytest.mark.parametrize('name', PROGRAMS)
def test_a_space_after_c_gets_a_hint(tmp_path, name):
    result = run_in(tmp_path, name, '-c', str(tmp_path))
    one_error_line(result, 'no directory name', 'joined to -c, as -c/path/to/config, not -c /path/to/config')


@pytest.mark.parametrize('name', ('bots-job2queue', 'bots-jobqueue'))
def test_a_client_on_the_bundled_configuration_says_so(tmp_path, name):
    """No config/ here: the client says which file and port it used, in one line on stderr.  (It
    asks the bundled configuration's port, where a server of the user's may run: only calls that
    change nothing - a status, and the liveness check 'isup', which adds no job.)"""
    import re
    from bots.botsjobqueue import configuration
    port = configuration.load(configuration.BUNDLED_CONFIG).port
    result = run_in(tmp_path, name, *(['isup'] if name == 'bots-job2queue' else ['status']))
    found = re.match(r'%s: no config/ here; using the bundled configuration (.+) \(port %d\)\.$' % (name, port),
                     result.stderr.splitlines()[0])
    assert found, result.stderr
    assert found.group(1).endswith(os.path.join('bots', 'botsjobqueue', 'config', 'bots.ini'))
    assert os.path.isfile(found.group(1))        # the installed package's copy


def test_the_help_of_bots_jobqueue_keeps_its_columns(tmp_path):
    text = run_in(tmp_path, 'bots-jobqueue', '--help').stdout
    lines = [line for line in text.splitlines() if line.startswith('    bots-jobqueue ')]
    assert len(lines) == 8 and len({line.index('  ', line.index(']') + 2) for line in lines if '] ' in line}) >= 1
    assert all(line.startswith('    ') for line in text.splitlines()[2:-1] if line.strip()), text
