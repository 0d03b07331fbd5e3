"""Schedules: the calendar (explicit datetimes, a named zone with daylight saving), and a real
server firing [scheduleN] sections on time through the queue."""
import datetime
import json
import os
import signal
import sys
import time
import zoneinfo

import pytest

from bots.botsjobqueue.configuration import ConfigError
from bots.botsjobqueue.schedule import Schedule, expression
from conftest import FAKE_ENGINE, wait_until

AMSTERDAM = zoneinfo.ZoneInfo('Europe/Amsterdam')


def times(when, start, count, tz=AMSTERDAM):
    """The first ``count`` firing times after ``start`` (local, in ``tz``)."""
    schedule = Schedule('schedule_test', when, ['x'], 5, True, tz, 'once')
    moment = start.replace(tzinfo=tz).timestamp()
    found = []
    for _ in range(count):
        moment = schedule.next_after(moment)
        found.append(datetime.datetime.fromtimestamp(moment, tz))
    return found


def local(*fields, fold=0):
    return datetime.datetime(*fields, tzinfo=AMSTERDAM, fold=fold)


def test_a_time_in_the_skipped_hour_runs_once_right_after_the_change():
    # 2026-03-29: clocks go from 02:00 to 03:00 in Amsterdam; 02:30 does not exist that day.
    assert times('30 2 * * *', datetime.datetime(2026, 3, 28, 12, 0), 3) == [
        local(2026, 3, 29, 3, 0), local(2026, 3, 30, 2, 30), local(2026, 3, 31, 2, 30)]


def test_a_time_in_the_repeated_hour_runs_once():
    # 2026-10-25: 02:00-03:00 happens twice in Amsterdam; the job runs in the first one only.
    found = times('30 2 * * *', datetime.datetime(2026, 10, 24, 12, 0), 2)
    assert found[0] == local(2026, 10, 25, 2, 30) and found[0].utcoffset() == datetime.timedelta(hours=2)
    assert found[1] == local(2026, 10, 26, 2, 30)
    # An hourly job runs every real hour, as in cron: 02:00 summer time, then 02:00 winter time.
    hourly = times('@hourly', datetime.datetime(2026, 10, 25, 0, 30), 4)
    assert [(t.hour, t.utcoffset().seconds // 3600) for t in hourly] == [(1, 2), (2, 2), (2, 1), (3, 1)]


def test_month_ends_and_monthly():
    assert times('0 0 31 * *', datetime.datetime(2026, 1, 31, 12, 0), 3) == [
        local(2026, 3, 31), local(2026, 5, 31), local(2026, 7, 31)]
    assert times('@monthly', datetime.datetime(2026, 1, 31, 12, 0), 2) == [local(2026, 2, 1), local(2026, 3, 1)]
    assert times('0 0 29 2 *', datetime.datetime(2026, 1, 1), 1) == [local(2028, 2, 29)]


def test_the_five_tasks_of_the_bots_documentation():
    monday = datetime.datetime(2026, 11, 23, 0, 58)             # a Monday
    assert times('*/5 * * * *', monday, 2) == [local(2026, 11, 23, 1, 0), local(2026, 11, 23, 1, 5)]
    assert times('@hourly', monday, 2) == [local(2026, 11, 23, 1, 0), local(2026, 11, 23, 2, 0)]
    assert times('0 1 * * *', monday, 2) == [local(2026, 11, 23, 1, 0), local(2026, 11, 24, 1, 0)]
    assert times('0 1 * * mon', monday, 2) == [local(2026, 11, 23, 1, 0), local(2026, 11, 30, 1, 0)]
    assert times('0 1 1 * *', monday, 2) == [local(2026, 12, 1, 1, 0), local(2027, 1, 1, 1, 0)]


def test_seconds_come_first_in_six_fields():
    assert times('15 */10 * * * *', datetime.datetime(2026, 1, 1, 0, 0, 0), 2) == [
        local(2026, 1, 1, 0, 0, 15), local(2026, 1, 1, 0, 10, 15)]


@pytest.mark.parametrize('when', ['', '61 * * * *', '* * *', 'every monday', '@fortnightly', '* * * * * * *'])
def test_bad_expressions_are_refused_by_name(when):
    with pytest.raises(ConfigError) as refused:
        expression(when, '[schedule_x]')
    assert str(refused.value).startswith('Error: [schedule_x] ')


# ---- a real server

def schedule_ini(environment, sections, jobqueue=''):
    environment.write_ini(jobqueue=jobqueue, extra=sections)


def engine_task(*args):
    return ' '.join([sys.executable, FAKE_ENGINE] + list(args))


def test_a_seconds_schedule_fires_on_time_and_its_job_runs(environment):
    schedule_ini(environment, '[schedule_fast]\nwhen = */2 * * * * *\ntask = %s tick\npriority = 3\n' % engine_task())
    environment.start_server()
    wait_until(lambda: len(environment.runs('start')) >= 3, timeout=30, message='three scheduled runs')
    for run in environment.runs('start')[:3]:
        lateness = run['time'] % 2
        assert lateness < 0.5, lateness           # started within half a second of its even second
    proxy = environment.proxy()
    record = wait_until(lambda: proxy.history(1), message='a finished scheduled job')[0]
    assert record['schedule'] == 'schedule_fast' and record['priority'] == 3
    assert 'Added job 1, priority 3 (schedule [schedule_fast])' in environment.log()
    listed = proxy.schedules()
    assert [entry['schedule'] for entry in listed] == ['schedule_fast']
    assert listed[0]['next_run'] > time.time() - 1 and 'last_run' in listed[0]
    result = environment.run('bots-jobqueue', '-c' + environment.configdir, '--json', 'schedules')
    assert json.loads(result.stdout)[0]['when'] == '*/2 * * * * *'
    assert 'Next scheduled run: [schedule_fast] at ' in environment.run(
        'bots-jobqueue', '-c' + environment.configdir, 'status').stdout


def test_an_overrun_is_not_stacked(environment):
    """A run still waits when the schedule fires again: not queued twice, said once."""
    schedule_ini(environment, '[schedule_busy]\nwhen = * * * * * *\ntask = %s scheduled\n' % engine_task(),
                 jobqueue='nr_threads = 1')
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.addjob(environment.engine('blocker', '--sleep=8'), 1) == 0
    wait_until(lambda: 'still waits; not queued again' in environment.log(), message='an overrun')
    time.sleep(2.5)
    waiting = [job for job in proxy.listjobs() if job[2][-1] == 'scheduled']
    assert len(waiting) == 1
    assert environment.log().count('still waits; not queued again') == 1


def test_catchup_fires_once_after_a_stopped_server(environment):
    schedule_ini(environment, '[schedule_slow]\nwhen = */4 * * * * *\ntask = %s caught\n' % engine_task())
    environment.start_server()
    wait_until(lambda: environment.runs(), timeout=30, message='a first run')
    assert environment.stop_server() == 0
    stopped = time.time()
    time.sleep(9)                                  # two firing times pass while it is down
    environment.start_server()
    wait_until(lambda: 'it runs now (catchup = once)' in environment.log(), message='the catch-up')
    assert environment.log().count('it runs now (catchup = once)') == 1
    wait_until(lambda: len([run for run in environment.runs('start') if run['time'] > stopped]) >= 1,
               message='the caught-up run')
    first_after = min(run['time'] for run in environment.runs('start') if run['time'] > stopped)
    assert first_after - stopped < 11


def test_catchup_none_skips_the_missed_time(environment):
    schedule_ini(environment, '[schedule]\ncatchup = none\n[schedule_slow]\nwhen = 0 0 1 1 *\ntask = %s never\n'
                 % engine_task())
    environment.start_server()
    environment.stop_server()
    # Pretend the last firing was a year and a day ago.
    import sqlite3
    with sqlite3.connect(os.path.join(environment.botssys, 'jobqueue.db')) as db:
        db.execute('INSERT OR REPLACE INTO schedule VALUES (?, ?, NULL)', ('schedule_slow', time.time() - 366 * 86400))
    environment.start_server()
    wait_until(lambda: 'skipped (catchup = none)' in environment.log(), message='the skip')
    time.sleep(0.5)
    assert environment.runs('start') == [] and environment.proxy().listjobs() == []


def test_a_bad_schedule_stops_the_start_in_one_line(environment):
    schedule_ini(environment, '[schedule_bad]\nwhen = 61 * * * *\n')
    result = environment.run('bots-jobqueueserver', '-c' + environment.configdir)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith('Error: [schedule_bad] when = "61 * * * *" is not a cron expression')


def test_reload_takes_new_schedules_and_keeps_the_old_on_errors(environment):
    schedule_ini(environment, '[schedule_a]\nwhen = @daily\ntask = %s a\n' % engine_task())
    environment.start_server()
    proxy = environment.proxy()
    assert [entry['schedule'] for entry in proxy.schedules()] == ['schedule_a']
    schedule_ini(environment, '[schedule_a]\nwhen = not cron\n')
    environment.server.send_signal(signal.SIGHUP)
    wait_until(lambda: 'Reload refused' in environment.log(), message='the refused reload')
    assert 'Error: [schedule_a] when = "not cron" is not a cron expression' in environment.log()
    assert [entry['schedule'] for entry in proxy.schedules()] == ['schedule_a']
    schedule_ini(environment, '[schedule_b]\nwhen = @weekly\ntask = %s b\n' % engine_task())
    environment.server.send_signal(signal.SIGHUP)
    wait_until(lambda: [entry['schedule'] for entry in proxy.schedules()] == ['schedule_b'], message='the reload')
    assert environment.server.poll() is None


def test_the_engine_is_the_default_task_with_quoted_arguments(environment):
    schedule_ini(environment, '[schedule_engine]\nwhen = */2 * * * * *\narguments = --new "my route"\n')
    environment.start_server()
    wait_until(lambda: environment.runs(), timeout=30, message='the scheduled engine run')
    assert environment.runs()[0]['argv'] == ['-c' + environment.configdir, '--new', 'my route']


def test_the_readme_sections_for_the_five_tasks_are_valid(tmp_path):
    """The README's rewrite of the documented five scheduled tasks reads as it says."""
    from bots.botsjobqueue import configuration
    from bots.botsjobqueue.schedule import read_schedules
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.rst')).read()
    block = readme.split('five Windows scheduled tasks and their batch files becomes::\n')[1].split('\n\n')[0]
    (tmp_path / 'config').mkdir()
    (tmp_path / 'config' / 'bots.ini').write_text('[jobqueue]\nenabled = True\n' + '\n'.join(
        line[4:] for line in block.splitlines()))
    schedules = read_schedules(configuration.load(str(tmp_path / 'config')))
    assert {name: (s.expression, s.priority, s.task[3:]) for name, s in schedules.items()} == {
        'schedule_new': ('*/5 * * * *', 1, ['--new']),
        'schedule_hourly_alerts': ('0 * * * *', 2, ['hourly_alerts']),
        'schedule_hourly_cleanup': ('0 * * * *', 6, ['ftp_cleanup', 'ProductionOrders', 'RemitAdvice']),
        'schedule_hourly_retry': ('0 * * * *', 7, ['--automaticretrycommunication']),
        'schedule_daily_housekeeping': ('0 1 * * *', 3, ['daily_housekeeping']),
        'schedule_daily_reports': ('0 1 * * *', 9, ['daily_reports', 'SAP_Expired_Contracts']),
        'schedule_weekly': ('0 1 * * mon', 5, ['weekly_reports']),
        'schedule_monthly': ('0 1 1 * *', 5, ['monthly_reports'])}


def test_a_schedule_never_fired_is_caught_up_after_a_stopped_server(environment):
    """Its first time passed while the server was down: with catchup = once it runs once."""
    schedule_ini(environment, '[schedule_new]\nwhen = */10 * * * * *\ntask = %s first-time\n' % engine_task())
    wait_until(lambda: 0.5 < time.time() % 10 < 1.5, timeout=15, message='the start of a 10-second slot')
    environment.start_server()
    assert environment.stop_server() == 0
    assert environment.runs('start') == []           # stopped before its first time
    time.sleep(10 - time.time() % 10 + 1.5)          # its first time passes while it is down
    environment.start_server()
    wait_until(lambda: 'it runs now (catchup = once)' in environment.log(), message='the catch-up')
    wait_until(lambda: environment.runs('start'), message='the caught-up run')
    assert environment.log().count('it runs now (catchup = once)') == 1


LIBFAKETIME = '/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1'


@pytest.mark.timeout(180)
def test_a_clock_stepped_back_and_forward_silences_and_repeats_nothing(environment, tmp_path):
    """libfaketime on the server process alone (never the machine's clock): its wall clock goes
    back an hour while schedules of every 2 and every 3 seconds run and a job runs; then forward
    again.  The schedules go on at their next times from the new now, the job's elapsed time is
    its real one, and the step forward fires each schedule once, not once per missed time."""
    assert os.path.exists(LIBFAKETIME), "this test needs Debian's faketime: apt-get install faketime"
    offset = tmp_path / 'faketime'
    offset.write_text('+0\n')
    environment.server_env = {'LD_PRELOAD': LIBFAKETIME, 'FAKETIME_TIMESTAMP_FILE': str(offset),
                              'FAKETIME_NO_CACHE': '1', 'FAKETIME_DONT_FAKE_MONOTONIC': '1'}
    schedule_ini(environment, '[schedule_two]\nwhen = */2 * * * * *\ntask = %s two\n'
                              '[schedule_three]\nwhen = */3 * * * * *\ntask = %s three\n'
                 % (engine_task(), engine_task()), jobqueue='nr_threads = 2')
    environment.start_server()
    proxy = environment.proxy()

    def fired(name):
        return len([run for run in environment.runs('start') if run['argv'][0] == name])

    wait_until(lambda: fired('two') >= 2 and fired('three') >= 2, timeout=30, message='runs before the step')
    proxy.addjob(environment.engine('spanning', '--sleep=5'), 5)
    wait_until(lambda: fired('spanning'), message='the spanning job to start')
    before = fired('two'), fired('three')
    offset.write_text('-3600\n')                     # the server's clock goes back an hour
    wait_until(lambda: fired('two') >= before[0] + 2 and fired('three') >= before[1] + 2, timeout=30,
               message='schedules after the clock went back')
    assert 'The clock went back' in environment.log()
    def spanning():
        return [r for r in proxy.history(50) if r['task'][-2:] == ['spanning', '--sleep=5']]

    record = wait_until(spanning, timeout=30, message='the spanning job in the history')[0]
    assert 4.5 < record['ended'] - record['started'] < 9, record
    assert '-1 day' not in environment.log()
    forward = fired('two'), fired('three')
    offset.write_text('+0\n')                        # and forward again: 1,800 times of 'two' were "missed"
    time.sleep(4)
    assert fired('two') - forward[0] <= 4 and fired('three') - forward[1] <= 4
    assert fired('two') > forward[0] and fired('three') > forward[1]
    assert environment.stop_server() == 0


def test_schedules_default_to_the_time_zone_of_settings_py(environment):
    """A configuration whose settings.py names Django's TIME_ZONE: its schedules keep that zone,
    as the log does, unless a section names its own."""
    with open(os.path.join(environment.configdir, 'settings.py'), 'w') as handle:
        handle.write("TIME_ZONE = 'Asia/Tokyo'\n")
    schedule_ini(environment, '[schedule_tokyo]\nwhen = 0 9 * * *\ntask = %s morning\n'
                              '[schedule_utc]\nwhen = 0 9 * * *\ntimezone = UTC\ntask = %s other\n'
                 % (engine_task(), engine_task()))
    environment.start_server()
    listed = {entry['schedule']: entry for entry in environment.proxy().schedules()}
    assert listed['schedule_tokyo']['timezone'] == 'Asia/Tokyo' and listed['schedule_utc']['timezone'] == 'UTC'
    tokyo = datetime.datetime.fromtimestamp(listed['schedule_tokyo']['next_run'], zoneinfo.ZoneInfo('Asia/Tokyo'))
    assert (tokyo.hour, tokyo.minute) == (9, 0)
    assert 'keeps the time of Asia/Tokyo' in environment.log()
