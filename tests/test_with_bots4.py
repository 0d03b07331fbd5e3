"""With the real Bots 4.0.0 (``../shared/peers/bots-4.0.0``, Django 5 from the package registry), in
throw-away environments built once per test run, as its operators set it up: its configuration
in a Bots environment (``~/.bots/env/default``, made by its first run), its engine ``bots-engine``.

Into Bots 4's own Python: our three programs start without ``-c`` on Bots 4's configuration, log
where and as Bots 4 logs, keep its TIME_ZONE's clock, and run its real engine from its monitor's
client, its Run menu (in headless Chromium) and a batch file's ``bots-engine.py``.  Beside it:
Bots 4's own ``bots-job2queue`` and Run menu talk to our server unchanged.
"""
import datetime
import os
import re
import signal
import socket
import sys
import xmlrpc.client
import zoneinfo

import pytest

from conftest import ROOT_DIR, free_port, script, wait_until
from test_with_bots import ORDINARY_PATH, Started, answering, finished_jobs, listening, pip, run, set_ini

BOTS4_SOURCE = os.path.join(os.path.dirname(ROOT_DIR), 'shared', 'peers', 'bots-4.0.0')
CHROMIUM = '/usr/bin/chromium'
ZONE = 'Europe/Amsterdam'

pytestmark = pytest.mark.timeout(900)

MONITOR_CALL = '''\
# The monitor's way (Bots 4's views.runengine): Bots' configuration loaded, then its job2queue client.
import sys
from bots import botsinit, botsglobal, job2queue
botsinit.generalinit(None)
task = ['bots-engine', '-c' + botsglobal.ini.get('directories', 'config_org'), sys.argv[1]]
code = job2queue.send_job_to_jobqueue(task)
print(code, job2queue.JOBQUEUEMESSAGE2TXT[code])
'''


class Bots4(Started):
    """A Python environment with Bots 4.0.0 and a Bots environment made by its first run."""

    def __init__(self, root, wheel=None):
        self.root = str(root)
        assert os.path.isdir(BOTS4_SOURCE), 'Bots 4.0.0 is expected in %s' % BOTS4_SOURCE
        self.venv = os.path.join(self.root, 'venv')
        run([sys.executable, '-m', 'venv', self.venv], check=True)
        self.bin = os.path.join(self.venv, 'bin')
        self.python = os.path.join(self.bin, 'python')
        pip(self.python, 'install', BOTS4_SOURCE)
        if wheel:
            pip(self.python, 'install', wheel)
        self.home = os.path.join(self.root, 'home')
        os.makedirs(self.home)
        first = run([os.path.join(self.bin, 'bots-engine'), '--new'], env=self.env, cwd=self.root)
        assert first.returncode == 0, first.stdout + first.stderr
        self.botsenv = os.path.join(self.home, '.bots', 'env', 'default')
        self.configdir = os.path.join(self.botsenv, 'config')
        self.botssys = os.path.join(self.botsenv, 'botssys')
        self.ini = os.path.join(self.configdir, 'bots.ini')
        self.port, self.web_port, self.engine_port = free_port(), free_port(), free_port()
        set_ini(self.ini, 'jobqueue', 'enabled', 'True')
        set_ini(self.ini, 'jobqueue', 'port', str(self.port))
        set_ini(self.ini, 'jobqueue', 'locked_retry_delay', '1')
        set_ini(self.ini, 'webserver', 'port', str(self.web_port))
        set_ini(self.ini, 'settings', 'port', str(self.engine_port))      # the engine's own guard
        settings = os.path.join(self.configdir, 'settings.py')
        with open(settings) as handle:
            text = handle.read()
        with open(settings, 'w') as handle:
            handle.write(re.sub(r"^TIME_ZONE = .*$", "TIME_ZONE = '%s'" % ZONE, text, flags=re.M))
        self.processes = []

    @property
    def env(self):
        return {'PATH': ORDINARY_PATH, 'HOME': self.home, 'LANG': 'C.UTF-8'}

    def log(self, name):
        try:
            with open(os.path.join(self.botssys, 'logging', name, name + '.log')) as handle:
                return handle.read()
        except FileNotFoundError:
            return ''

    def engine_log(self):
        """Every engine log file (Bots 4 keeps one per run in logging/engine/)."""
        folder = os.path.join(self.botssys, 'logging', 'engine')
        text = ''
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), errors='replace') as handle:
                text += handle.read()
        return text

    def proxy(self):
        return xmlrpc.client.ServerProxy('http://127.0.0.1:%d' % self.port, allow_none=True)

    def run_menu(self, item='Run (only new)'):
        """Log in to Bots 4's monitor in headless Chromium, open the Run menu and choose ``item``;
        the message the page shows."""
        from playwright.sync_api import sync_playwright
        assert os.path.exists(CHROMIUM), "this test needs Debian's chromium: apt-get install chromium"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page()
            page.goto('http://127.0.0.1:%d/login' % self.web_port)
            page.fill('input[name=username]', 'bots')
            page.fill('input[name=password]', 'botsbots')
            page.click('input[type=submit]')
            page.wait_for_url('**/bots/home**')
            page.hover('a.ico-run[title=Run]')
            page.click('text=%s' % item)
            page.wait_for_load_state()
            text = page.inner_text('body')
            browser.close()
        return text


def amsterdam_now_hour():
    return datetime.datetime.now(zoneinfo.ZoneInfo(ZONE)).strftime('%Y.%m.%d %H')


def stop(process):
    process.send_signal(signal.SIGTERM)
    assert process.wait(90) == 0


@pytest.fixture(scope='module')
def into_bots4(tmp_path_factory, wheel):
    bots = Bots4(tmp_path_factory.mktemp('into4'), wheel)
    yield bots
    bots.stop_all()


@pytest.fixture(scope='module')
def beside_bots4(tmp_path_factory):
    bots = Bots4(tmp_path_factory.mktemp('beside4'))
    yield bots
    bots.stop_all()


def test_inside_bots4_without_c_our_server_runs_bots4s_engine(into_bots4):
    """Started as Bots 4's service starts its own (no -c): Bots 4's configuration, its botssys,
    its log folder and line format, its TIME_ZONE; the monitor's client queues the real engine."""
    bots = into_bots4
    server = bots.start([os.path.join(bots.bin, 'bots-jobqueueserver')])
    wait_until(lambda: answering(bots.port, server), timeout=60, message='the server to answer')
    log = bots.log('jobqueue')
    assert 'configuration directory chosen by the default Bots 4 environment (~/.bots/env/default/config' in log
    assert 'configdir: "%s"' % bots.configdir in log
    assert 'serves Bots 4.0.0' in log and '(installed inside it); botssys: "%s"' % bots.botssys in log
    assert 'keeps the time of %s' % ZONE in log
    first = log.splitlines()[0]
    assert re.match(r'\d{4}\.\d\d\.\d\d \d\d:\d\d:\d\d STARTINFO \[bots\.jobqueueserver\] Bots jobqueue started\.$',
                    first), first
    assert first.startswith(amsterdam_now_hour()) or amsterdam_now_hour() in log   # Amsterdam's clock
    call = run([bots.python, '-c', MONITOR_CALL, '--new'], env=bots.env, cwd=bots.root)
    assert call.stdout.strip().endswith('0 OK, job is added to queue'), call.stdout + call.stderr
    wait_until(lambda: finished_jobs(bots.log('jobqueue')), timeout=120, message='the engine job')
    assert finished_jobs(bots.log('jobqueue')) == [(1, '0')]
    # One clock in both logs: the engine's lines and ours carry the same hour.
    engine_hours = set(re.findall(r'^(\d{4}\.\d\d\.\d\d \d\d):', bots.engine_log(), re.M))
    finished = [line for line in bots.log('jobqueue').splitlines() if 'Finished job 1' in line][0]
    assert finished[:13] in engine_hours, (finished, engine_hours)
    record = wait_until(lambda: bots.proxy().showjob(1).get('output'), message='the output')
    assert '[bots.engine]' in record
    stop(server)


def test_inside_bots4_exit_code_3_is_queued_again(into_bots4):
    """The engine finds its guard taken (another engine outside the queue): exit code 3, a
    warning, queued again; it runs once the other engine is gone."""
    bots = into_bots4
    server = bots.start([os.path.join(bots.bin, 'bots-jobqueueserver')])
    wait_until(lambda: answering(bots.port, server), timeout=60, message='the server to answer')
    before = len(finished_jobs(bots.log('jobqueue')))
    other_engine = socket.socket()
    other_engine.bind(('127.0.0.1', bots.engine_port))
    try:
        assert bots.proxy().addjob(['bots-engine', '--new'], 5) == 0
        wait_until(lambda: len(finished_jobs(bots.log('jobqueue'))) > before, timeout=120, message='the locked run')
    finally:
        other_engine.close()
    assert finished_jobs(bots.log('jobqueue'))[before][1] == '3'
    assert re.search(r'WARNING   \[bots\.jobqueueserver\] Finished job \d+, elapsed time \S+, exit code 3',
                     bots.log('jobqueue'))
    wait_until(lambda: len(finished_jobs(bots.log('jobqueue'))) > before + 1, timeout=120, message='the re-run')
    assert finished_jobs(bots.log('jobqueue'))[before + 1][1] == '0'
    stop(server)


def test_inside_bots4_bots_engine_py_is_the_engine_and_the_run_menu_works(into_bots4):
    """``bots-job2queue.py bots-engine.py``, as Bots' pages write it, runs the engine pip
    installed as ``bots-engine``; the monitor's Run menu in a real browser runs it too."""
    bots = into_bots4
    server = bots.start([os.path.join(bots.bin, 'bots-jobqueueserver')])
    wait_until(lambda: answering(bots.port, server), timeout=60, message='the server to answer')
    before = len(finished_jobs(bots.log('jobqueue')))
    result = run([os.path.join(bots.bin, 'bots-job2queue.py'), 'bots-engine.py', '--new'], env=bots.env,
                 cwd=bots.root)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: len(finished_jobs(bots.log('jobqueue'))) > before, timeout=120, message='the engine job')
    assert finished_jobs(bots.log('jobqueue'))[-1][1] == '0'
    assert "['bots-engine.py', '--new'] (runs %s)" % os.path.join(bots.bin, 'bots-engine') in bots.log('jobqueue')
    web = bots.start([os.path.join(bots.bin, 'bots-webserver')])
    wait_until(lambda: listening(bots.web_port, web), timeout=60, message='the webserver to listen')
    assert 'OK, job is added to queue: --new' in bots.run_menu()
    wait_until(lambda: len(finished_jobs(bots.log('jobqueue'))) > before + 1, timeout=120, message='the menu job')
    number, code = finished_jobs(bots.log('jobqueue'))[-1]
    assert code == '0'
    assert '[bots.engine]' in wait_until(lambda: bots.proxy().showjob(number).get('output'), message='its output')
    stop(server)


def test_beside_bots4_its_own_job2queue_and_run_menu_talk_to_our_server(beside_bots4, tmp_path):
    """Our server in its own environment with -c naming Bots 4's configuration; Bots 4's own
    bots-job2queue (which checks the task itself) and its Run menu queue the real engine."""
    bots = beside_bots4
    env = dict(bots.env, PATH=os.pathsep.join([bots.bin, ORDINARY_PATH]))    # Bots 4's scripts, as its operator has
    server = bots.start([script('bots-jobqueueserver'), '-c' + bots.configdir], env=env)
    wait_until(lambda: answering(bots.port, server), timeout=60, message='our server to answer')
    log = bots.log('jobqueue')
    assert 'configuration directory chosen by -c' in log and '(from beside it)' in log
    assert 'botssys: "%s"' % bots.botssys in log
    result = run([os.path.join(bots.bin, 'bots-job2queue'), 'bots-engine', '--new'], env=env, cwd=str(tmp_path))
    assert result.returncode == 0 and 'OK, job added to queue.' in result.stdout, result.stdout + result.stderr
    wait_until(lambda: finished_jobs(bots.log('jobqueue')), timeout=120, message='the engine job')
    assert finished_jobs(bots.log('jobqueue')) == [(1, '0')]
    web = bots.start([os.path.join(bots.bin, 'bots-webserver')], env=env)
    wait_until(lambda: listening(bots.web_port, web), timeout=60, message='the webserver to listen')
    assert 'OK, job added to queue.: --new' in bots.run_menu()        # Bots 4's own words, its client
    wait_until(lambda: len(finished_jobs(bots.log('jobqueue'))) == 2, timeout=120, message='the menu job')
    assert finished_jobs(bots.log('jobqueue'))[-1] == (2, '0')
    assert '[bots.engine]' in wait_until(lambda: bots.proxy().showjob(2).get('output'), message='its output')
    stop(server)


FLAG_ROUTE = '''\
# A file channel and a route flagged dirmonitor, saved through Bots' own models (as its admin does).
import sys
from bots import botsinit
botsinit.generalinit(None)
from bots import models
idroute, path, remove = sys.argv[1], sys.argv[2], sys.argv[3] == 'remove'
channel = models.channel(idchannel=idroute + '_in', inorout='in', type='file', path=path, filename='*.edi',
                         remove=remove)
channel.save()
models.routes(idroute=idroute, seq=1, active=True, fromchannel=channel, fromeditype='edifact',
              frommessagetype='edifact', dirmonitor=True).save()
'''


def test_inside_bots4_routes_flagged_in_its_database_are_watched_and_reloaded(into_bots4, tmp_path):
    """A route flagged dirmonitor in Bots' database is watched at its file channel; a file
    dropped there runs the engine for that route.  A second route flagged through Bots' models
    (which write the trigger file on save, as its admin does) is watched without a restart."""
    bots = into_bots4
    first, second = tmp_path / 'first-in', tmp_path / 'second-in'
    first.mkdir()
    second.mkdir()
    (first / 'left-over.edi').write_text('UNA')          # its channel removes files: processed at start
    made = run([bots.python, '-c', FLAG_ROUTE, 'dm_first', str(first), 'remove'], env=bots.env, cwd=bots.root)
    assert made.returncode == 0, made.stdout + made.stderr
    set_ini(bots.ini, 'dirmonitor', 'quiet_period', '0.5')
    server = bots.start([os.path.join(bots.bin, 'bots-jobqueueserver')])
    wait_until(lambda: answering(bots.port, server), timeout=60, message='the server to answer')
    monitor = bots.start([os.path.join(bots.bin, 'bots-dirmonitor')])
    wait_until(lambda: 'Route "dm_first" of Bots\' database is watched: %s (*.edi)' % first in bots.log('dirmonitor'),
               timeout=60, message='the first route to be watched')

    def runs_of(route):
        return [line for line in bots.log('jobqueue').splitlines() if 'Starting job' in line and "'%s']" % route in line]

    wait_until(lambda: runs_of('dm_first'), timeout=60, message='the route run for the file found at start')
    count = len(runs_of('dm_first'))
    (first / 'order.edi').write_text("UNA:+.? 'UNB+UNOA:1+SENDER+RECEIVER+260101:1200+1'")
    wait_until(lambda: len(runs_of('dm_first')) > count, timeout=60, message='the route run for a dropped file')
    assert '-c' + bots.configdir in runs_of('dm_first')[-1]
    made = run([bots.python, '-c', FLAG_ROUTE, 'dm_second', str(second), 'keep'], env=bots.env, cwd=bots.root)
    assert made.returncode == 0, made.stdout + made.stderr
    wait_until(lambda: 'Route "dm_second" of Bots\' database is watched' in bots.log('dirmonitor'), timeout=60,
               message='the reload after the route was saved')
    assert 'files already there are not processed at start' in bots.log('dirmonitor')
    (second / 'invoice.edi').write_text('UNA')
    wait_until(lambda: runs_of('dm_second'), timeout=60, message='the second route run')
    assert monitor.poll() is None
    stop(monitor)
    stop(server)


def test_uninstall_leaves_bots4_whole_and_its_monitor_serving(tmp_path, wheel):
    """Bots 4 with our package, then without: its modules are its own, its monitor serves its
    pages, its configuration (outside its package) is untouched by the way back."""
    bots = Bots4(tmp_path, wheel)
    with open(bots.ini) as handle:
        ini_before = handle.read()
    pip(bots.python, 'uninstall', '-y', 'bots-jobqueue')
    which = run([bots.python, '-c', 'import bots.job2queue, bots.jobqueueserver, bots.dirmonitor\n'
                 'print(bots.job2queue.__file__, bots.jobqueueserver.__file__, bots.dirmonitor.__file__)'],
                env=bots.env, cwd=bots.root)
    assert which.returncode == 0 and 'botsjobqueue' not in which.stdout, which.stdout + which.stderr
    web = bots.start([os.path.join(bots.bin, 'bots-webserver')])
    wait_until(lambda: listening(bots.web_port, web), timeout=60, message='the webserver to listen')
    text = bots.run_menu()                               # every page on the way, the Run menu too
    assert 'Can not contact jobqueue-server' in text       # Bots' own client, no server: it says so
    bots.stop_all()
    pip(bots.python, 'install', '--force-reinstall', '--no-deps', BOTS4_SOURCE)    # README's way back
    for name in ('bots-jobqueueserver', 'bots-job2queue', 'bots-dirmonitor'):
        assert os.path.isfile(os.path.join(bots.bin, name)), name
    with open(bots.ini) as handle:
        assert handle.read() == ini_before


def test_inside_bots4_the_other_rules_for_the_configuration(into_bots4):
    """$BOTS_CONFIG_DIR chooses the configuration, and says so; a $BOTSENV whose environment Bots 4
    has not made yet is one line and exit 1, naming the rule."""
    bots = into_bots4
    missing = run([os.path.join(bots.bin, 'bots-jobqueueserver')], env=dict(bots.env, BOTSENV='nowhere'),
                  cwd=bots.root, timeout=60)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert 'chosen by $BOTSENV (~/.bots/env/nowhere/config), as Bots 4 does) does not exist' in missing.stderr
    server = bots.start([os.path.join(bots.bin, 'bots-jobqueueserver')], env=dict(bots.env, BOTS_CONFIG_DIR=bots.configdir))
    wait_until(lambda: answering(bots.port, server), timeout=60, message='the server to answer')
    assert 'configuration directory chosen by $BOTS_CONFIG_DIR.' in bots.log('jobqueue')
    stop(server)
