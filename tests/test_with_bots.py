"""With the real Bots: bots-ediint 3.3.1 and Django < 3 from the package registry, in throw-away
environments built once per test run.

Into Bots' own Python: our package replaces exactly Bots' three job-queue programs and nothing
else; Bots' engine, its monitor's Run menu and its job2queue client run our queue with Bots'
configuration.  Beside Bots (our own environment): Bots' own clients and its real engine work
with our server unchanged, with an ordinary PATH.
"""
import base64
import csv
import datetime
import hashlib
import http.cookiejar
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
import xmlrpc.client
import zoneinfo

import pytest

from conftest import free_port, script, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOTS_REQUIREMENTS = ['bots-ediint==3.3.1', 'Django<3']
# What our package replaces in Bots, on purpose: its three job-queue programs - the modules by the
# overlay (Bots' files stay as they are), the scripts by scripts of ours of the same names.
REPLACED = {'bots/jobqueueserver.py', 'bots/job2queue.py', 'bots/dirmonitor.py'}
WHICH_MODULES = ('import bots.jobqueueserver, bots.job2queue, bots.dirmonitor\n'
                 'for module in (bots.jobqueueserver, bots.job2queue, bots.dirmonitor): print(module.__file__)')
REPLACED_SCRIPTS = {'bots-jobqueueserver', 'bots-job2queue', 'bots-dirmonitor'}
MARKER = '# edited by the operator: keep me'
ORDINARY_PATH = os.pathsep.join(['/usr/local/bin', '/usr/bin', '/bin'])

pytestmark = pytest.mark.timeout(900)


def run(argv, **kwargs):
    kwargs.setdefault('timeout', 600)
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def pip(python, *args):
    result = run([python, '-m', 'pip', '--disable-pip-version-check', '-q'] + list(args))
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def set_ini(path, section, key, value):
    """Set ``key = value`` in ``[section]`` of an ini file, editing its text as an operator would."""
    with open(path) as handle:
        lines = handle.read().splitlines()
    start = lines.index('[%s]' % section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('[')), len(lines))
    for i in range(start + 1, end):
        if re.match(r'%s\s*=' % re.escape(key), lines[i]):
            lines[i] = '%s = %s' % (key, value)
            break
    else:
        lines.insert(start + 1, '%s = %s' % (key, value))
    with open(path, 'w') as handle:
        handle.write('\n'.join(lines) + '\n')


class Started:
    """The processes a test started in a Bots installation (``root``, ``env``), stopped at its end."""

    def start(self, argv, cwd=None, env=None):
        process = subprocess.Popen(argv, cwd=cwd or self.root, env=env or self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        self.processes.append(process)
        return process

    def stop_all(self):
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


class BotsInstallation(Started):
    """A Python environment with the released Bots, set up as an operator sets it up."""

    def __init__(self, root):
        self.root = str(root)
        self.venv = os.path.join(self.root, 'venv')
        run([sys.executable, '-m', 'venv', self.venv], check=True)
        self.bin = os.path.join(self.venv, 'bin')
        self.python = os.path.join(self.bin, 'python')
        pip(self.python, 'install', *BOTS_REQUIREMENTS)
        self.package = run([self.python, '-c', 'import bots.botsinit, os; print(os.path.dirname(bots.botsinit.__file__))'],
                           check=True).stdout.strip()
        self.configdir = os.path.join(self.package, 'config')
        self.ini = os.path.join(self.configdir, 'bots.ini')
        self.botssys = os.path.join(self.package, 'botssys')
        # The wheel ships the empty database in install/; an operator puts it in botssys.
        os.makedirs(os.path.join(self.botssys, 'sqlitedb'))
        shutil.copy(os.path.join(self.package, 'install', 'botsdb'), os.path.join(self.botssys, 'sqlitedb'))
        self.port = free_port()
        self.web_port = free_port()
        set_ini(self.ini, 'jobqueue', 'enabled', 'True')
        set_ini(self.ini, 'jobqueue', 'port', str(self.port))
        set_ini(self.ini, 'webserver', 'port', str(self.web_port))
        with open(self.ini, 'a') as handle:
            handle.write(MARKER + '\n')
        self.processes = []

    def record(self):
        """Bots' own list of its files: path -> sha256 (as pip's RECORD writes it)."""
        dist_info = [name for name in os.listdir(os.path.dirname(self.package))
                     if name.startswith('bots_ediint-') and name.endswith('.dist-info')]
        with open(os.path.join(os.path.dirname(self.package), dist_info[0], 'RECORD')) as handle:
            return {row[0]: row[1] for row in csv.reader(handle) if row}

    def file(self, relative):
        return os.path.normpath(os.path.join(os.path.dirname(self.package), relative))

    @property
    def env(self):
        return {'PATH': ORDINARY_PATH, 'HOME': self.root, 'LANG': 'C.UTF-8'}

    def log(self, name):
        try:
            with open(os.path.join(self.botssys, 'logging', name + '.log')) as handle:
                return handle.read()
        except FileNotFoundError:
            return ''

    def monitor_page(self, path):
        """Log in to Bots' webserver and get one of its pages; the HTTP status."""
        opener = self._logged_in()
        try:
            return opener.open('http://127.0.0.1:%d%s' % (self.web_port, path), timeout=60).status
        except urllib.error.HTTPError as exc:
            return exc.code

    def _logged_in(self):
        base = 'http://127.0.0.1:%d' % self.web_port
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        page = opener.open(base + '/login/', timeout=30).read().decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        form = urllib.parse.urlencode({'username': 'bots', 'password': 'botsbots', 'next': '/home/',
                                       'csrfmiddlewaretoken': token}).encode()
        opener.open(urllib.request.Request(base + '/login/', data=form, headers={'Referer': base + '/login/'}),
                    timeout=30)
        return opener

    def monitor_runs(self, parameter):
        """The monitor's Run menu: log in to Bots' webserver, ask for a run; the message it shows."""
        base = 'http://127.0.0.1:%d' % self.web_port
        answer = self._logged_in().open(base + '/runengine/?' + urllib.parse.urlencode({'clparameter': parameter}), timeout=60)
        assert answer.status == 200
        messages = re.findall(r'<li class="(?:info|error)">([^<]*)</li>', answer.read().decode())
        return messages


def listening(port, process):
    if process.poll() is not None:
        raise AssertionError('ended with %s: %s' % (process.returncode, process.stdout.read()))
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=1):
            return True
    except OSError:
        return False


def answering(port, process):
    """The job queue server answers calls (it listens from the very start, before its log)."""
    if process.poll() is not None:
        raise AssertionError('ended with %s: %s' % (process.returncode, process.stdout.read()))
    try:
        return xmlrpc.client.ServerProxy('http://127.0.0.1:%d' % port).addjob(['isup'], 5) == 0
    except (OSError, xmlrpc.client.Error):
        return False


def finished_jobs(log):
    """``(jobnumber, exit code)`` of each ``Finished job`` line of a jobqueue.log."""
    return [(int(number), code) for number, code in
            re.findall(r'Finished job (\d+), elapsed time [^,]+, exit code (\S+)', log)]


MONITOR_CALL = textwrap.dedent('''\
    # The monitor's way: Bots' configuration loaded, then its job2queue client.
    import sys
    from bots import botsinit, botsglobal, job2queue
    botsinit.generalinit('config')
    code = job2queue.send_job_to_jobqueue(['bots-engine', '-c' + botsglobal.ini.get('directories', 'config_org'),
                                           sys.argv[1]])
    print(code, job2queue.JOBQUEUEMESSAGE2TXT[code])
    ''')


@pytest.fixture(scope='module')
def into_bots(tmp_path_factory, wheel):
    """Bots' Python with this project installed into it."""
    bots = BotsInstallation(tmp_path_factory.mktemp('into'))
    with open(bots.ini) as handle:
        bots.ini_before = handle.read()
    bots.record_before = bots.record()
    pip(bots.python, 'install', wheel)
    yield bots
    bots.stop_all()


@pytest.fixture(scope='module')
def beside_bots(tmp_path_factory):
    """Bots in a Python of its own; this project stays in the test's environment."""
    bots = BotsInstallation(tmp_path_factory.mktemp('beside'))
    yield bots
    bots.stop_all()


def sha256(path):
    with open(path, 'rb') as handle:
        digest = hashlib.sha256(handle.read()).digest()
    return 'sha256=' + base64.urlsafe_b64encode(digest).rstrip(b'=').decode()


def test_installed_into_bots_only_the_three_programs_are_replaced(into_bots):
    bots = into_bots
    with open(bots.ini) as handle:
        assert handle.read() == bots.ini_before          # the operator's bots.ini, marker and all
    changed = []
    for relative, digest in bots.record_before.items():
        path = bots.file(relative)
        if not digest or relative.endswith('bots.ini') and relative.startswith('bots/config/'):
            continue
        if not os.path.exists(path) or sha256(path) != digest:
            changed.append(relative)
    scripts = {relative for relative in changed if relative.startswith('../')}
    assert {os.path.basename(relative) for relative in scripts} <= REPLACED_SCRIPTS
    assert set(changed) - scripts == set()                # not one file of Bots' package is written
    # The three module names Bots imports are ours (the overlay), in Bots' own Python.
    modules = run([bots.python, '-c', WHICH_MODULES], cwd=bots.root, env=bots.env).stdout.split()
    assert [os.path.relpath(path, bots.package) for path in modules] == [
        os.path.join('botsjobqueue', name) for name in ('jobqueueserver.py', 'job2queue.py', 'dirmonitor.py')]
    # No module of ours has the name of a module or package of Bots', nor the reverse.
    ours = run([bots.python, '-m', 'pip', 'show', '-f', 'bots-jobqueue']).stdout
    our_files = {line.strip() for line in ours.splitlines() if line.startswith('  bots/')}
    bots_names = {relative.split('/')[1].split('.')[0] for relative in bots.record_before
                  if relative.startswith('bots/')}
    for relative in our_files:
        assert '__pycache__' in relative or relative.split('/')[1].split('.')[0] not in bots_names, relative


def test_bots_engine_still_runs_inside_bots(into_bots):
    result = run([os.path.join(into_bots.bin, 'bots-engine'), '--new'], env=into_bots.env, cwd=into_bots.root)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bots_clients_run_the_real_engine_through_our_server_inside_bots(into_bots, tmp_path):
    bots = into_bots
    # Started as the operator's service starts Bots' own: Bots' script name, no -c, any directory.
    server = bots.start([os.path.join(bots.bin, 'bots-jobqueueserver')], cwd=str(tmp_path))
    wait_until(lambda: answering(bots.port, server), timeout=60, message='the server to answer')
    log = bots.log('jobqueue')
    assert 'serves Bots 3.3.1 in "%s" (installed inside it)' % bots.package in log
    assert 'configdir: "%s"' % bots.configdir in log
    assert not os.path.exists(os.path.join(str(tmp_path), 'botssys'))
    # Bots 3.3.1's settings.py says TIME_ZONE = 'Europe/Amsterdam': our log keeps that clock, as Bots' does.
    assert 'keeps the time of Europe/Amsterdam' in log
    amsterdam = datetime.datetime.now(zoneinfo.ZoneInfo('Europe/Amsterdam')).strftime('%Y%m%d %H')
    assert log.splitlines()[0].startswith(amsterdam) or amsterdam in log

    # The monitor's client, as Bots' webserver calls it.
    call = run([bots.python, '-c', MONITOR_CALL, '--new'], env=bots.env, cwd=str(tmp_path))
    assert call.stdout.strip() == '0 OK, job is added to queue', call.stdout + call.stderr
    wait_until(lambda: finished_jobs(bots.log('jobqueue')), timeout=120, message='the engine job to end')
    assert finished_jobs(bots.log('jobqueue')) == [(1, '0')]
    assert "Starting job 1: ['bots-engine', '-cconfig', '--new']" in bots.log('jobqueue')

    # The monitor's Run menu itself, in Bots' own webserver.
    web = bots.start([os.path.join(bots.bin, 'bots-webserver')])
    wait_until(lambda: listening(bots.web_port, web), timeout=60, message='the webserver to listen')
    assert bots.monitor_runs('--automaticretrycommunication') == ['OK, job is added to queue']
    wait_until(lambda: len(finished_jobs(bots.log('jobqueue'))) == 2, timeout=120, message='the second job')
    assert finished_jobs(bots.log('jobqueue'))[1] == (2, '0')

    # bots-engine.py, as Bots' documentation writes it, where pip installed only bots-engine.
    assert not os.path.exists(os.path.join(bots.bin, 'bots-engine.py'))
    result = run([os.path.join(bots.bin, 'bots-job2queue.py'), 'bots-engine.py', '--new'], env=bots.env,
                 cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: len(finished_jobs(bots.log('jobqueue'))) == 3, timeout=120, message='the third job')
    assert finished_jobs(bots.log('jobqueue'))[2] == (3, '0')
    assert "['bots-engine.py', '--new'] (runs %s)" % os.path.join(bots.bin, 'bots-engine') in bots.log('jobqueue')

    # Bots' own job2queue script name, as a scheduler's batch file calls it.
    result = run([os.path.join(bots.bin, 'bots-job2queue'), '-p3', 'bots-engine', '-cconfig', 'myroute'],
                 env=bots.env, cwd=str(tmp_path))
    assert result.returncode == 0 and 'OK, job is added to queue' in result.stdout
    server.send_signal(signal.SIGTERM)
    assert server.wait(90) == 0


def test_uninstall_leaves_bots_whole_and_its_monitor_serving(tmp_path, wheel):
    """pip uninstall of our package alone: Bots' modules are its own again (they were never
    written), its monitor serves its pages, its engine runs; the README's way back brings
    Bots' three scripts back (pip took ours of the same names) with the operator's bots.ini."""
    bots = BotsInstallation(tmp_path)
    pip(bots.python, 'install', wheel)
    pip(bots.python, 'uninstall', '-y', 'bots-jobqueue')
    with open(bots.ini) as handle:
        assert MARKER in handle.read()
    assert os.path.isfile(os.path.join(bots.configdir, 'settings.py'))
    assert not os.path.exists(os.path.join(bots.package, 'botsjobqueue'))
    record = bots.record()
    for relative in REPLACED:
        assert sha256(bots.file(relative)) == record[relative]
    modules = run([bots.python, '-c', WHICH_MODULES], cwd=bots.root, env=bots.env).stdout.split()
    assert [os.path.relpath(path, bots.package) for path in modules] == ['jobqueueserver.py', 'job2queue.py',
                                                                          'dirmonitor.py']
    web = bots.start([os.path.join(bots.bin, 'bots-webserver')])
    wait_until(lambda: listening(bots.web_port, web), timeout=60, message='the webserver to listen')
    for page in ('/home/', '/incoming/', '/outgoing/', '/reports/'):
        assert bots.monitor_page(page) == 200, page
    bots.stop_all()
    # The way back, as README.rst gives it for 3.3.1: keep the configuration, reinstall Bots, put it back.
    keep = str(tmp_path / 'config-kept')
    shutil.copytree(bots.configdir, keep)
    pip(bots.python, 'install', '--force-reinstall', '--no-deps', BOTS_REQUIREMENTS[0])
    shutil.rmtree(bots.configdir)
    shutil.copytree(keep, bots.configdir)
    with open(bots.ini) as handle:
        assert MARKER in handle.read()
    for name in REPLACED_SCRIPTS:
        assert os.path.isfile(os.path.join(bots.bin, name)), name
    result = run([os.path.join(bots.bin, 'bots-engine'), '--new'], env=bots.env, cwd=bots.root)
    assert result.returncode == 0, result.stdout + result.stderr


def our_server(bots, tmp_path):
    """Our server, from the test's environment, with Bots' configuration directory."""
    env = dict(bots.env, PATH=ORDINARY_PATH)
    server = bots.start([script('bots-jobqueueserver'), '-c' + bots.configdir], cwd=str(tmp_path), env=env)
    wait_until(lambda: answering(bots.port, server), timeout=60, message='our server to answer')
    return server


def test_bots_monitor_and_job2queue_beside_our_server(beside_bots, tmp_path):
    bots = beside_bots
    server = our_server(bots, tmp_path)
    assert 'serves Bots 3.3.1 in "%s" (from beside it)' % bots.package in bots.log('jobqueue')
    # Bots' own job2queue module (its table knows the answers 0, 1 and 4 only).
    call = run([bots.python, '-c', MONITOR_CALL, '--new'], env=bots.env, cwd=str(tmp_path))
    assert call.stdout.strip() == '0 OK, job is added to queue', call.stdout + call.stderr
    wait_until(lambda: finished_jobs(bots.log('jobqueue')), timeout=120, message='the engine job to end')
    assert finished_jobs(bots.log('jobqueue')) == [(1, '0')]
    web = bots.start([os.path.join(bots.bin, 'bots-webserver')])
    wait_until(lambda: listening(bots.web_port, web), timeout=60, message='the webserver to listen')
    for number, parameter in enumerate(['--new', '--cleanup', '--resend'], start=2):
        assert bots.monitor_runs(parameter) == ['OK, job is added to queue']
        wait_until(lambda: len(finished_jobs(bots.log('jobqueue'))) == number, timeout=120,
                   message='job %d to end' % number)
        assert finished_jobs(bots.log('jobqueue'))[-1] == (number, '0')
    # Bots' own bots-job2queue script.
    result = run([os.path.join(bots.bin, 'bots-job2queue'), 'bots-engine', '-cconfig', '--new'],
                 env=bots.env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: len(finished_jobs(bots.log('jobqueue'))) == 5, timeout=120, message='job 5 to end')
    assert finished_jobs(bots.log('jobqueue'))[-1] == (5, '0')
    server.send_signal(signal.SIGTERM)
    assert server.wait(90) == 0


def test_dirmonitor_beside_bots_queues_the_real_engine(beside_bots, tmp_path):
    bots = beside_bots
    inbox = tmp_path / 'inbox'
    inbox.mkdir()
    set_ini(bots.ini, 'dirmonitor1', 'path', str(inbox))
    set_ini(bots.ini, 'dirmonitor1', 'filemask', '*.edi')
    set_ini(bots.ini, 'dirmonitor', 'quiet_period', '0.5')
    server = our_server(bots, tmp_path)
    before = len(finished_jobs(bots.log('jobqueue')))
    monitor = bots.start([script('bots-dirmonitor'), '-c' + bots.configdir], cwd=str(tmp_path),
                         env=dict(bots.env, PATH=ORDINARY_PATH))
    wait_until(lambda: '[dirmonitor1] watching' in bots.log('dirmonitor'), timeout=60, message='the monitor')
    assert 'would refuse' not in bots.log('dirmonitor')
    (inbox / 'order.edi').write_bytes(b'UNA:+.? \'')
    wait_until(lambda: len(finished_jobs(bots.log('jobqueue'))) > before, timeout=120, message='the engine job')
    assert finished_jobs(bots.log('jobqueue'))[-1][1] == '0'
    started = re.findall(r'Starting job \d+: (.*)', bots.log('jobqueue'))[-1]
    assert os.path.join(bots.bin, 'bots-engine') in started and '-c' + bots.configdir in started
    monitor.send_signal(signal.SIGTERM)
    assert monitor.wait(60) == 0
    server.send_signal(signal.SIGTERM)
    assert server.wait(90) == 0
