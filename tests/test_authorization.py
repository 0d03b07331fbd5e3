"""Authorization tricks of an ordinary local user who can write to some directory: what
starts is the file that was allowed, through the path the configuration names."""
import os
import sys
import time

from conftest import FAKE_ENGINE, wait_until

PAYLOAD = '''\
import sys
open(%r, "w").write("payload ran")
'''


def gate(environment, seconds=1.5):
    """A first job that holds the only runner a while, so that what is queued next waits."""
    environment.write_ini(jobqueue='nr_threads = 1')
    environment.start_server()
    assert environment.proxy().addjob(environment.engine('gate', '--sleep=%s' % seconds), 1) == 0
    wait_until(lambda: environment.runs('start'), message='the gate job to start')


def refused_at_start(environment, jobnumber):
    wait_until(lambda: 'Error starting job %d: not an authorized task any more' % jobnumber in environment.log(),
               message='job %d to be refused at its start' % jobnumber)
    record = environment.proxy().showjob(jobnumber)
    assert record['state'] == 'finished' and record['status'] == 'cannot start', record


def test_a_script_link_swapped_after_the_check_never_starts_the_payload(environment, tmp_path):
    """A python task whose script is a link to the engine is allowed; the link is pointed at a
    payload right after the answer 0: checked again at its start, the job is refused."""
    marker = tmp_path / 'payload-ran'
    payload = tmp_path / 'payload.py'
    payload.write_text(PAYLOAD % str(marker))
    link = tmp_path / 'innocent.py'
    link.symlink_to(FAKE_ENGINE)
    gate(environment)
    assert environment.proxy().addjob([sys.executable, str(link), 'swapped'], 5) == 0
    link.unlink()
    link.symlink_to(payload)
    refused_at_start(environment, 2)
    assert [run['argv'] for run in environment.runs('start')] == [['gate', '--sleep=1.5']]
    assert not marker.exists()


def test_an_interpreter_link_in_a_venv_of_ones_own_starts_the_configured_interpreter(environment, tmp_path):
    """argv[0] a link to the allowed Python inside a made-up venv whose .pth file runs code:
    the real file is allowed, but the configured path is what starts, so the .pth is never read."""
    marker = tmp_path / 'pth-ran'
    venv = tmp_path / 'fakevenv'
    version = 'python%d.%d' % sys.version_info[:2]
    site = venv / 'lib' / version / 'site-packages'
    site.mkdir(parents=True)
    (venv / 'bin').mkdir()
    (venv / 'bin' / 'python').symlink_to(os.path.realpath(sys.executable))
    (venv / 'pyvenv.cfg').write_text('home = %s\ninclude-system-site-packages = false\n'
                                     % os.path.dirname(os.path.realpath(sys.executable)))
    (site / 'evil.pth').write_text('import os; open(%r, "w").write("pth ran")\n' % str(marker))
    environment.start_server()
    assert environment.proxy().addjob([str(venv / 'bin' / 'python'), FAKE_ENGINE, 'via-link'], 5) == 0
    wait_until(lambda: environment.runs(), message='the job to end')
    assert [run['argv'] for run in environment.runs()] == [['via-link']]
    assert not marker.exists()


def test_an_interpreter_option_is_never_taken_for_a_script(environment, tmp_path):
    """[python, '-c', code] and [python, '-m', module] with files named -c and -m (links to the
    engine) in the server's working directory: refused, and nothing runs."""
    marker = tmp_path / 'code-ran'
    for option in ('-c', '-m'):
        os.symlink(FAKE_ENGINE, os.path.join(environment.root, option))
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.addjob([sys.executable, '-c', 'open(%r, "w")' % str(marker)], 5) == 3
    assert proxy.addjob([sys.executable, '-m', 'fake_engine'], 5) == 3
    assert proxy.listjobs() == []
    time.sleep(0.5)
    assert not marker.exists() and environment.runs('start') == []


def test_a_program_link_swapped_while_waiting_is_refused_at_its_start(environment, tmp_path):
    """An allowed program named through a link, swapped while the job waits: refused at its
    start, the payload never runs.  Not swapped, the job starts the configured path."""
    marker = tmp_path / 'payload-ran'
    payload = tmp_path / 'payload'
    payload.write_text('#!/bin/sh\necho ran > %s\n' % marker)
    payload.chmod(0o755)
    engine = tmp_path / 'engine'
    engine.write_text('#!%s\nimport runpy, sys\nrunpy.run_path(%r, run_name="__main__")\n'
                      % (sys.executable, FAKE_ENGINE))
    engine.chmod(0o755)
    link = tmp_path / 'link'
    link.symlink_to(engine)
    environment.write_ini(jobqueue='nr_threads = 1\nauthorized_tasks = %s' % engine)
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.addjob(environment.engine('gate', '--sleep=1.5'), 1) == 0
    wait_until(lambda: environment.runs('start'), message='the gate job to start')
    assert proxy.addjob([str(link), 'direct'], 5) == 0
    link.unlink()
    link.symlink_to(payload)
    refused_at_start(environment, 2)
    assert not marker.exists()
    link.unlink()
    link.symlink_to(engine)
    assert proxy.addjob([str(link), 'direct'], 5) == 0
    wait_until(lambda: len(environment.runs()) == 2, message='the linked program to run')
    assert environment.runs()[1]['argv'] == ['direct']
