"""The shared secret (SPEC 11): what a client on another machine must give, sent by every client of ours.

Only loopback is reachable here, so the server is told to ask every client for it
(``require_secret = always``): the same check a client of another machine meets.
"""
import configparser
import os
import sys
import textwrap
import urllib.error
import urllib.request
import xmlrpc.client

import pytest

from conftest import FAKE_ENGINE, wait_until
from test_dirmonitor import Monitor

SECRET = 's3cr3t-of-this-environment'


@pytest.fixture
def guarded(environment):
    with open(os.path.join(environment.configdir, 'secret.txt'), 'w') as handle:
        handle.write(SECRET + '\n')
    environment.write_ini(jobqueue='secret_file = secret.txt\nrequire_secret = always')
    environment.start_server(wait=False)
    wait_until(lambda: 'listens for xmlrpc' in environment.log(), message='the server to start')
    return environment


def other_config(environment, name, secret_line):
    """A configuration of the same environment with another (or no) secret: a client elsewhere."""
    configdir = os.path.join(environment.root, name)
    os.makedirs(configdir)
    with open(os.path.join(environment.configdir, 'bots.ini')) as handle:
        ini = handle.read().replace('secret_file = secret.txt', secret_line)
    with open(os.path.join(configdir, 'bots.ini'), 'w') as handle:
        handle.write(ini)
    return configdir


def test_clients_send_the_secret(guarded):
    env = guarded
    done = env.job2queue(*env.engine('--tag=with-secret'))
    assert done.returncode == 0, done.stderr
    wait_until(lambda: len(env.runs()) == 1, message='the job to run')
    status = env.run('bots-jobqueue', '-c' + env.configdir, 'status')
    assert status.returncode == 0, status.stderr
    # Another machine's configuration with the secret written in bots.ini itself.
    inline = other_config(env, 'inline', 'secret = ' + SECRET)
    done = env.run('bots-job2queue', '-c' + inline, *env.engine('--tag=inline'))
    assert done.returncode == 0, done.stderr


def test_missing_or_wrong_secret_is_refused(guarded):
    env = guarded
    none = other_config(env, 'nosecret', '')
    refused = env.run('bots-job2queue', '-c' + none, *env.engine('--tag=none'))
    assert refused.returncode == 1
    assert 'shared secret' in refused.stderr and 'Traceback' not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    wrong = other_config(env, 'wrong', 'secret = not-the-one')
    refused = env.run('bots-job2queue', '-c' + wrong, *env.engine('--tag=wrong'))
    assert refused.returncode == 1 and 'secret is wrong' in refused.stderr
    tool = env.run('bots-jobqueue', '-c' + wrong, 'status')
    assert tool.returncode != 0 and 'secret is wrong' in tool.stderr and 'Traceback' not in tool.stderr
    # Bots' own client sends no secret: refused too, nothing queued.
    with pytest.raises(xmlrpc.client.ProtocolError) as refusal:
        env.proxy().addjob(env.engine('--tag=bots-client'), 5)
    assert refusal.value.errcode == 401
    with pytest.raises(urllib.error.HTTPError) as page:
        urllib.request.urlopen('http://127.0.0.1:%d/health' % env.port, timeout=5)
    assert page.value.code == 401
    request = urllib.request.Request('http://127.0.0.1:%d/health' % env.port,
                                     headers={'Authorization': 'Bearer ' + SECRET})
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200
    listed = env.run('bots-jobqueue', '-c' + env.configdir, '--all', 'status')
    assert listed.returncode == 0 and 'bots-client' not in listed.stdout and 'none' not in listed.stdout
    assert 'Refused a request from 127.0.0.1: 401' in env.log()


def test_dirmonitor_sends_the_secret(guarded, tmp_path):
    env = guarded
    inbox = tmp_path / 'inbox'
    inbox.mkdir()
    env.write_ini(jobqueue='secret_file = secret.txt\nrequire_secret = always', extra=textwrap.dedent('''\
        [dirmonitor]
        quiet_period = 0.2
        log_console = False
        [dirmonitor1]
        path = %s
        route = secretroute
        ''' % inbox))
    monitor = Monitor(env)
    monitor.start()
    try:
        (inbox / 'order.edi').write_text('UNA')
        wait_until(lambda: [run['argv'][-1] for run in env.runs()] == ['secretroute'], timeout=30,
                   message='the route to run')
        assert 'Job queued' in env.log('dirmonitor')
    finally:
        monitor.stop()


def test_the_overlaid_client_reads_bots_configuration(guarded, monkeypatch):
    """Inside Bots, the monitor's send_job_to_jobqueue takes host and secret from Bots' loaded ini."""
    from bots.botsjobqueue import job2queue
    ini = configparser.RawConfigParser()
    ini.read(os.path.join(guarded.configdir, 'bots.ini'))
    ini.set('directories', 'config', guarded.configdir)
    botsglobal = type(sys)('bots.botsglobal')
    botsglobal.ini = ini
    monkeypatch.setitem(sys.modules, 'bots.botsglobal', botsglobal)
    assert job2queue.send_job_to_jobqueue([sys.executable, FAKE_ENGINE, '--tag=monitor'], port=guarded.port) == 0
    ini.remove_option('jobqueue', 'secret_file')
    assert job2queue.send_job_to_jobqueue([sys.executable, FAKE_ENGINE, '--tag=monitor2'], port=guarded.port) == 1
