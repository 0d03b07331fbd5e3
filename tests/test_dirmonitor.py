"""bots-dirmonitor with a real server, a real monitor and real directories."""
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import script, wait_until


class Monitor:
    def __init__(self, environment):
        self.environment = environment
        self.process = None

    def start(self):
        env = self.environment
        self.process = subprocess.Popen([script('bots-dirmonitor.py'), '-c' + env.configdir], cwd=env.root,
                                        env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: 'Bots dirmonitor started.' in env.log('dirmonitor') or self.process.poll() is not None,
                   message='the monitor to start')
        assert self.process.poll() is None, self.process.stderr.read()
        time.sleep(0.3)          # let the observers set up their watches

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode if self.process else None


@pytest.fixture
def monitored(environment, tmp_path):
    """An environment with two watched directories, a server and a monitor (started by the test)."""
    inbox = tmp_path / 'in'
    other = tmp_path / 'other'
    inbox.mkdir()
    other.mkdir()
    environment.inbox = inbox
    environment.other = other
    environment.monitor = Monitor(environment)
    environment.configure = lambda extra='', general='', settings='': environment.write_ini(settings=settings, extra='''
[dirmonitor]
quiet_period = 0.5
log_console = False
log_file_level = DEBUG
retry_max = 1
%s
[dirmonitor1]
path = %s
filemask = *.edi
route = inbound
%s
[dirmonitor2]
path = %s
route = other
''' % (general, inbox, extra, other))
    environment.configure()
    yield environment
    environment.monitor.stop()


def routes(environment):
    return [run['argv'][1] if len(run['argv']) > 1 else '' for run in environment.runs()]


def engine_argv(environment, route):
    """The arguments the engine gets: the monitor's configuration directory and the route."""
    return ['-c' + environment.configdir, route]


def write(path, data=b'data\n'):
    with open(str(path), 'wb') as handle:
        handle.write(data)


def test_a_file_queues_its_route_once_with_the_engine_arguments(monitored):
    monitored.start_server()
    monitored.monitor.start()
    write(monitored.inbox / 'order1.edi')
    wait_until(lambda: monitored.runs(), message='the engine run')
    time.sleep(1.5)
    assert [run['argv'] for run in monitored.runs()] == [engine_argv(monitored, 'inbound')]
    assert 'Job queued' in monitored.log('dirmonitor')


def test_burst_of_files_gives_one_job_per_route(monitored):
    monitored.start_server()
    monitored.monitor.start()
    # Two bursts, each quicker than the quiet period between its files.
    for number in range(2000):
        write(monitored.inbox / ('f%05d.edi' % number))
    for number in range(300):
        write(monitored.other / ('o%05d.txt' % number))
    wait_until(lambda: len(monitored.runs()) >= 2, timeout=60, message='the engine runs')
    time.sleep(2)
    assert sorted(routes(monitored)) == ['inbound', 'other']


def test_events_lost_in_an_overflow_leave_no_directory_unseen(monitored):
    """The system's event queue (inotify: 16,384 events) overflows while the monitor cannot read
    it - stopped here with SIGSTOP, as a busy machine would hold it - and drops the events of the
    last file: each directory with files is queued all the same, once, and the loss is said."""
    monitored.start_server()
    monitored.monitor.start()
    monitored.monitor.process.send_signal(signal.SIGSTOP)
    try:
        for number in range(7000):          # 3 events each: the queue is full long before the end
            write(monitored.inbox / ('f%05d.edi' % number))
        write(monitored.other / 'late.txt')   # its events find the queue full
    finally:
        monitored.monitor.process.send_signal(signal.SIGCONT)
    wait_until(lambda: len(monitored.runs()) >= 2, timeout=60, message='both routes')
    time.sleep(2)
    assert sorted(routes(monitored)) == ['inbound', 'other']
    assert 'File events were lost' in monitored.log('dirmonitor')


def test_mask_and_recursion(monitored):
    monitored.start_server()
    monitored.monitor.start()
    write(monitored.inbox / 'readme.txt')                # does not match *.edi
    (monitored.inbox / 'sub').mkdir()                    # a directory event
    write(monitored.inbox / 'sub' / 'deep.edi')          # not recursive
    time.sleep(2)
    assert monitored.runs() == []
    monitored.monitor.stop()
    monitored.configure(extra='recursive = True')
    for path in (monitored.inbox / 'readme.txt', monitored.inbox / 'sub' / 'deep.edi'):
        os.remove(str(path))
    monitored.monitor.start()
    write(monitored.inbox / 'sub' / 'deep2.edi')
    wait_until(lambda: monitored.runs(), message='the recursive run')
    assert routes(monitored) == ['inbound']


def test_existing_files_are_processed_at_start(monitored):
    write(monitored.inbox / 'waiting.edi')
    monitored.start_server()
    monitored.monitor.start()
    wait_until(lambda: monitored.runs(), message='the run for the existing file')
    time.sleep(1)
    assert routes(monitored) == ['inbound']


def test_existing_files_are_left_alone_without_process_existing(monitored):
    write(monitored.inbox / 'waiting.edi')
    monitored.configure(general='process_existing = False')
    monitored.start_server()
    monitored.monitor.start()
    time.sleep(2)
    assert monitored.runs() == []


def test_a_slow_writer_does_not_trigger_before_the_file_is_closed(monitored):
    monitored.start_server()
    monitored.monitor.start()
    with open(str(monitored.inbox / 'slow.edi'), 'wb') as handle:
        for _ in range(3):
            handle.write(b'part\n')
            handle.flush()
            time.sleep(1.2)              # pauses longer than the quiet period
        assert monitored.runs() == []
        closed = time.time()
    start = wait_until(lambda: monitored.runs('start'), message='the run after the close')[0]
    assert start['time'] >= closed
    assert routes(monitored) == ['inbound']


def test_a_file_moved_in_counts(monitored, tmp_path):
    staging = tmp_path / 'staging.edi'
    write(staging)
    monitored.start_server()
    monitored.monitor.start()
    os.rename(str(staging), str(monitored.inbox / 'moved.edi'))
    wait_until(lambda: monitored.runs(), message='the run for the moved file')
    assert routes(monitored) == ['inbound']


def test_server_down_then_up_loses_no_trigger(monitored):
    monitored.monitor.start()
    write(monitored.inbox / 'early.edi')
    wait_until(lambda: 'Cannot contact the jobqueue-server' in monitored.log('dirmonitor'), message='a retry')
    monitored.start_server()
    wait_until(lambda: monitored.runs(), timeout=30, message='the run once the server is up')
    assert routes(monitored) == ['inbound']


def test_a_directory_that_appears_later_is_watched(monitored, tmp_path):
    late = tmp_path / 'late' / 'in'
    monitored.configure(extra='\n[dirmonitor3]\npath = %s\nroute = late\n' % late)
    monitored.start_server()
    monitored.monitor.start()
    assert 'does not exist' in monitored.log('dirmonitor')
    late.mkdir(parents=True)
    wait_until(lambda: 'appeared' in monitored.log('dirmonitor'), message='the directory to be picked up')
    time.sleep(0.3)
    write(late / 'file.txt')
    wait_until(lambda: monitored.runs(), message='the run for the late directory')
    assert routes(monitored) == ['late']


def reload_by_signal(monitored):
    monitored.monitor.process.send_signal(signal.SIGHUP)


def reload_by_option(monitored):
    """Bots 4's way, and the one on Windows: ``--reload`` writes the trigger file."""
    result = monitored.run('bots-dirmonitor', '-c' + monitored.configdir, '--reload')
    assert result.returncode == 0 and 'Reload asked for' in result.stdout, result.stderr


def reload_by_trigger_file(monitored):
    """What Bots 4's admin does when a route is saved."""
    with open(os.path.join(monitored.botssys, '.dirmonitor.trigger'), 'w') as handle:
        handle.write('reload')


@pytest.mark.parametrize('reload', [reload_by_signal, reload_by_option, reload_by_trigger_file])
def test_reload_rereads_the_configuration(monitored, tmp_path, reload):
    third = tmp_path / 'third'
    third.mkdir()
    monitored.start_server()
    monitored.monitor.start()
    monitored.configure(extra='\n[dirmonitor3]\npath = %s\nroute = third\n' % third)
    reload(monitored)
    wait_until(lambda: 'reloads its configuration' in monitored.log('dirmonitor'), message='the reload')
    wait_until(lambda: '[dirmonitor3] watching' in monitored.log('dirmonitor'), message='the new watch')
    write(third / 'new.txt')
    wait_until(lambda: monitored.runs(), message='the run for the new section')
    assert routes(monitored) == ['third']
    assert not os.path.exists(os.path.join(monitored.botssys, '.dirmonitor.trigger'))
    assert monitored.monitor.stop() == 0


def test_polling(monitored):
    monitored.configure(general='polling = True\npolling_interval = 0.2')
    monitored.start_server()
    monitored.monitor.start()
    write(monitored.other / 'polled.txt')
    wait_until(lambda: monitored.runs(), message='the polled run')
    assert routes(monitored) == ['other']


def test_refuses_to_start_when_not_enabled(environment):
    environment.write_ini(enabled=False)
    result = environment.run('bots-dirmonitor', '-c' + environment.configdir)
    assert result.returncode == 1
    assert 'not enabled' in result.stderr


def test_a_directory_that_disappears_and_comes_back_is_watched_again(monitored):
    import shutil
    monitored.start_server()
    monitored.monitor.start()
    shutil.rmtree(str(monitored.other))
    wait_until(lambda: 'disappeared' in monitored.log('dirmonitor'), message='the disappearance in the log')
    write(monitored.inbox / 'meanwhile.edi')             # the other watch goes on
    wait_until(lambda: monitored.runs(), message='the run of the other watch')
    monitored.other.mkdir()
    wait_until(lambda: 'other appeared' in monitored.log('dirmonitor'), message='the directory to be picked up')
    time.sleep(0.3)
    write(monitored.other / 'back.txt')
    wait_until(lambda: len(monitored.runs()) == 2, message='the run for the directory that came back')
    assert routes(monitored) == ['inbound', 'other']


def test_start_warns_for_a_job_the_server_would_refuse(monitored, tmp_path):
    missing = str(tmp_path / 'no-engine.py')
    monitored.configure(settings='botsengine_path = %s' % missing)
    monitored.monitor.start()
    wait_until(lambda: '[dirmonitor2] watching' in monitored.log('dirmonitor'), message='the watches')
    log = monitored.log('dirmonitor')
    assert 'botsengine_path: no program "%s"' % missing in log
    for section in ('dirmonitor1', 'dirmonitor2'):
        assert len(re.findall(r'WARNING.*\[%s\] the job queue server would refuse its job' % section, log)) == 1


def test_one_dirmonitor_per_botssys_and_reload_says_when_none_runs(monitored):
    monitored.start_server()
    result = monitored.run('bots-dirmonitor', '-c' + monitored.configdir, '--reload')
    assert result.returncode == 0 and 'Warning: no bots-dirmonitor of "%s" runs now' % monitored.configdir \
        in result.stderr
    monitored.monitor.start()
    second = monitored.run('bots-dirmonitor', '-c' + monitored.configdir, timeout=30)
    assert second.returncode == 1
    assert second.stderr.strip() == ('Error: another bots-dirmonitor runs on botssys %s; only one may run there '
                                     'at a time.' % monitored.botssys)
    result = monitored.run('bots-dirmonitor', '-c' + monitored.configdir, '--reload')
    assert result.returncode == 0 and 'Reload asked for' in result.stdout and not result.stderr
    wait_until(lambda: 'reloads its configuration' in monitored.log('dirmonitor'), message='the reload')
    write(monitored.inbox / 'one.edi')
    wait_until(lambda: monitored.runs(), message='the run')
    time.sleep(1.5)
    assert routes(monitored) == ['inbound']           # one monitor, one run


def test_a_misspelt_key_of_a_watch_is_warned_about(monitored):
    monitored.configure(extra='filemsk = *.xml')
    monitored.start_server()
    monitored.monitor.start()
    wait_until(lambda: '[dirmonitor1] filemsk is not a key the job queue knows (did you mean filemask?)'
               in monitored.log('dirmonitor'), message='the warning')
