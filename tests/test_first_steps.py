"""The README's first five minutes, step by step, on this machine without Bots: the copied
bundled configuration is the one read, a queued job really runs, and the directory monitor
queues the engine for a dropped file.  Only the port differs: a free one of the test's own."""
import os
import re
import shutil
import signal
import subprocess

import bots.botsjobqueue.configuration as configuration

from conftest import BIN, TESTS, free_port, script, wait_until

README = os.path.join(os.path.dirname(TESTS), 'README.rst')


def readme():
    with open(README, encoding='utf-8') as handle:
        return handle.read()


COPY_STEP = '{ [ -d config ] || cp -r bots/botsjobqueue/config config; }'


def test_the_opening_copy_is_safe_to_type_again(tmp_path):
    """Typed a second time, the README's copy step neither nests config/config nor undoes an edit."""
    os.symlink(os.path.join(os.path.dirname(TESTS), 'bots'), str(tmp_path / 'bots'))
    for _ in range(2):
        assert subprocess.run(['sh', '-c', COPY_STEP], cwd=str(tmp_path), timeout=30).returncode == 0
        with open(str(tmp_path / 'config' / 'bots.ini'), 'a') as handle:
            handle.write('# edited\n')
    assert not (tmp_path / 'config' / 'config').exists()
    assert (tmp_path / 'config' / 'bots.ini').read_text().count('# edited') == 2


def test_the_readme_gives_these_steps():
    text = readme()
    assert COPY_STEP in text.split('The first five minutes')[0]
    for command in ('. .venv/bin/activate', 'bots-job2queue.py bots-jobqueue-demo hello',
                    'bots-job2queue.py bots-jobqueue-demo --sleep=10 slow', 'bots-dirmonitor',
                    'echo test > botssys/infile/order.edi', 'bots-jobqueue history'):
        assert command in text, command


def test_first_five_minutes(tmp_path):
    # the README's copy step (the installed copy is the same directory)
    shutil.copytree(configuration.BUNDLED_CONFIG, str(tmp_path / 'config'))
    inifile = tmp_path / 'config' / 'bots.ini'
    port = free_port()
    text, replaced = re.subn(r'(?m)^port = \d+$', 'port = %d' % port, inifile.read_text())
    assert replaced == 1
    inifile.write_text(text)
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get('PATH', ''))    # the activated venv

    def run(*argv):
        return subprocess.run(list(argv), cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=30)

    server = subprocess.Popen([script('bots-jobqueueserver')], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    monitor = None
    try:
        wait_until(lambda: run('bots-jobqueue', 'status').returncode == 0, message='the server')
        added = run('bots-job2queue.py', 'bots-jobqueue-demo', 'hello')
        assert (added.returncode, added.stdout.strip()) == (0, 'OK, job is added to queue'), added.stderr
        wait_until(lambda: 'bots-jobqueue-demo hello' in run('bots-jobqueue', 'history').stdout,
                   message='the first job in the history')
        history = run('bots-jobqueue', 'history').stdout.splitlines()
        assert re.search(r'^1\s+5\s+.*\s0\s+ok\s+bots-jobqueue-demo hello$', history[1]), history
        shown = run('bots-jobqueue', 'show', '1').stdout
        assert 'bots-jobqueue-demo ran (pid' in shown and 'with arguments: hello' in shown
        assert run('bots-job2queue.py', 'bots-jobqueue-demo', '--sleep=10', 'slow').returncode == 0

        monitor = subprocess.Popen([script('bots-dirmonitor')], cwd=str(tmp_path), env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = tmp_path / 'botssys' / 'logging' / 'dirmonitor.log'
        wait_until(lambda: log.exists() and 'infile' in log.read_text(), message='the monitor to watch')
        os.makedirs(str(tmp_path / 'botssys' / 'infile'), exist_ok=True)
        (tmp_path / 'botssys' / 'infile' / 'order.edi').write_text('test\n')
        # As the README says: the monitor's job waits for "slow" (one job at a time), then runs.
        wait_until(lambda: re.search(r'bots-jobqueue-demo -c\S+ demo', run('bots-jobqueue', 'history').stdout),
                   timeout=40, message='the engine for route "demo" in the history')
        history = run('bots-jobqueue', 'history').stdout.splitlines()
        assert ' 0      ok ' in history[1] and history[1].endswith(' demo') and history[2].endswith(' slow'), history
    finally:
        for process in (monitor, server):
            if process is not None:
                process.send_signal(signal.SIGINT)
                process.wait(30)
    console = server.stdout.read()
    assert 'configdir: "%s"' % (tmp_path / 'config') in console     # the copy is the file read
    assert 'Finished job 1' in console and 'bots-jobqueue-demo ran' in console
    assert 'bundled configuration' not in console
    assert server.returncode == 0 and monitor.returncode == 0
