"""Test fixtures: a real Bots environment in a temporary directory, the real
console scripts, a real server on a free loopback port, and a fake engine."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import xmlrpc.client

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT_DIR = os.path.dirname(TESTS)
FAKE_ENGINE = os.path.join(TESTS, 'fake_engine.py')
BIN = os.path.dirname(sys.executable)


def script(name):
    """Path of an installed console script of this project."""
    path = shutil.which(name, path=BIN) or shutil.which(name)
    assert path, 'console script %s is not installed' % name
    return path


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout=20, interval=0.02, message='condition'):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError('timed out waiting for %s' % message)


def finished_output(proxy, jobnumber, timeout=20):
    """The kept output of a finished job, once it is there (its record comes at its end, its
    output moments later)."""
    return wait_until(lambda: proxy.showjob(jobnumber).get('output'), timeout=timeout,
                      message='the output of job %d' % jobnumber)


class Environment:
    """A Bots environment: config/bots.ini, botssys/, and the fake engine's record."""

    def __init__(self, root):
        self.root = str(root)
        self.configdir = os.path.join(self.root, 'config')
        self.botssys = os.path.join(self.root, 'botssys')
        self.record = os.path.join(self.root, 'runs.jsonl')
        self.port = free_port()
        self.server = None
        self.server_env = {}        # extra environment of the next server started
        os.makedirs(self.configdir)
        self.write_ini()

    def write_ini(self, jobqueue='', settings='', extra='', enabled=True):
        ini = textwrap.dedent('''\
            [directories]
            botssys = botssys
            [settings]
            python_executable_path = {python}
            botsengine_path = {engine}
            {settings}
            [jobqueue]
            enabled = {enabled}
            port = {port}
            log_console = False
            log_file_level = DEBUG
            kill_grace = 2
            {jobqueue}
            {extra}
            ''').format(python=sys.executable, engine=FAKE_ENGINE, port=self.port, enabled=enabled,
                        jobqueue=jobqueue, settings=settings, extra=extra)
        with open(os.path.join(self.configdir, 'bots.ini'), 'w') as handle:
            handle.write(ini)

    @property
    def env(self):
        env = dict(os.environ)
        env['FAKE_ENGINE_RECORD'] = self.record
        env['PATH'] = BIN + os.pathsep + env.get('PATH', '')
        return env

    def engine(self, *args):
        """A task that runs the fake engine through the configured Python."""
        return [sys.executable, FAKE_ENGINE] + list(args)

    def run(self, name, *args, timeout=30, **kwargs):
        return subprocess.run([script(name)] + list(args), cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout, **kwargs)

    def job2queue(self, *args, **kwargs):
        return self.run('bots-job2queue.py', '-c' + self.configdir, *args, **kwargs)

    def start_server(self, wait=True):
        self.server = subprocess.Popen([script('bots-jobqueueserver'), '-c' + self.configdir], cwd=self.root,
                                       env=dict(self.env, **self.server_env), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
        if wait:
            wait_until(self._listening, message='the server to listen')
        return self.server

    def _listening(self):
        if self.server.poll() is not None:
            raise AssertionError('server ended with %s: %s' % (self.server.returncode, self.server.stderr.read()))
        # Answering, not only listening: the server listens from its first instant, before its log.
        try:
            return xmlrpc.client.ServerProxy('http://127.0.0.1:%d' % self.port).addjob(['isup'], 5) == 0
        except (OSError, xmlrpc.client.Error):
            return False

    def stop_server(self, sig=signal.SIGTERM, timeout=60):
        if self.server is None or self.server.poll() is not None:
            return self.server.returncode if self.server else None
        self.server.send_signal(sig)
        try:
            self.server.wait(timeout)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
        return self.server.returncode

    def proxy(self):
        return xmlrpc.client.ServerProxy('http://127.0.0.1:%d' % self.port, allow_none=True)

    def runs(self, event='end'):
        """The fake engine's runs so far (their 'start' or 'end' records), in order."""
        try:
            with open(self.record) as handle:
                # A line still being written has no newline yet: it counts from the next look.
                entries = [json.loads(line) for line in handle if line.endswith('\n')]
        except FileNotFoundError:
            return []
        return [entry for entry in entries if entry['event'] == event]

    def log(self, name='jobqueue'):
        try:
            with open(os.path.join(self.botssys, 'logging', name + '.log')) as handle:
                return handle.read()
        except FileNotFoundError:
            return ''


@pytest.fixture
def environment(tmp_path):
    env = Environment(tmp_path)
    yield env
    if env.server is not None and env.server.poll() is None:
        env.server.kill()
        env.server.wait()
    ended = {entry['pid'] for entry in env.runs('end')}
    for entry in env.runs('start'):
        if entry['pid'] not in ended:
            try:
                os.killpg(entry['pid'], signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def server(environment):
    """A running server in a fresh environment."""
    environment.start_server()
    return environment


@pytest.fixture(scope='session')
def wheel(tmp_path_factory):
    """This project, built once as a wheel."""
    out = tmp_path_factory.mktemp('wheel')
    build = tmp_path_factory.mktemp('source')
    source = os.path.join(str(build), 'project')
    shutil.copytree(ROOT_DIR, source, ignore=shutil.ignore_patterns('.venv', '.git', 'build', '*.egg-info',
                                                                  '__pycache__', '.pytest_cache', '.hypothesis'))
    built = subprocess.run([sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q', 'wheel', '--no-deps',
                            '-w', str(out), source], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    return os.path.join(str(out), os.listdir(str(out))[0])
