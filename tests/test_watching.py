"""Watching and steering the queue: /health and /metrics against a known run of jobs, pause and
resume across a restart, and the status page in a real headless Chromium (playwright)."""
import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import finished_output, TESTS, wait_until

CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
SCREENSHOT = os.path.join(TESTS, 'screenshots', 'status-page.png')     # shown in README.rst
HOSTILE = '<script>document.title="owned"</script><img src=x onerror="document.title=1">&amp;'


def get(environment, path):
    """``(status, headers, body)`` of a GET on the server."""
    try:
        with urllib.request.urlopen('http://127.0.0.1:%d%s' % (environment.port, path), timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def metrics(environment):
    """The samples of /metrics, read by Prometheus' own text-format parser: {(name, labels): value}."""
    status, headers, body = get(environment, '/metrics')
    assert status == 200 and headers['Content-Type'].startswith('text/plain; version=')
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode('utf-8')) for sample in family.samples}


def test_health_and_metrics_follow_a_known_run_of_jobs(environment, tmp_path):
    environment.write_ini(jobqueue='nr_threads = 1')
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.addjob(environment.engine('ok'), 5) == 0
    assert proxy.addjob(environment.engine('warns', '--exit=2'), 5) == 0
    assert proxy.addjob(environment.engine('fails', '--exit=1'), 5) == 0
    assert proxy.addjob(['/bin/sh', '-c', 'true'], 5) == 3
    wait_until(lambda: len(proxy.history(10)) == 3, message='three finished jobs')
    assert proxy.addjob(environment.engine('blocker', '--sleep=30'), 1) == 0
    wait_until(lambda: proxy.status()['running'], message='the blocker to run')
    assert proxy.addjob(environment.engine('waits'), 5) == 0
    assert proxy.addjob(environment.engine('waits'), 5) == 4
    time.sleep(1.1)
    status, headers, body = get(environment, '/health')
    health = json.loads(body)
    assert status == 200 and headers['Content-Type'] == 'application/json'
    assert (health['healthy'], health['accepting'], health['paused'], health['running'], health['waiting']) == \
        (True, True, False, 1, 1)
    assert health['oldest_waiting_age'] >= 1.0
    assert health['last_finished']['jobnumber'] == 3 and health['last_finished']['exitcode'] == 1
    samples = metrics(environment)
    assert samples[('botsjobqueue_jobs_added_total', ())] == 5
    assert samples[('botsjobqueue_jobs_not_added_total', (('reason', 'duplicate'),))] == 1
    assert samples[('botsjobqueue_jobs_not_added_total', (('reason', 'not authorized'),))] == 1
    for code, state in (('0', 'ok'), ('2', 'failed'), ('1', 'failed')):
        assert samples[('botsjobqueue_jobs_finished_total', (('exitcode', code), ('status', state)))] == 1
    assert samples[('botsjobqueue_job_duration_seconds_count', ())] == 3
    assert (samples[('botsjobqueue_waiting_jobs', ())], samples[('botsjobqueue_running_jobs', ())]) == (1, 1)
    assert samples[('botsjobqueue_oldest_waiting_seconds', ())] >= 1.0
    assert samples[('botsjobqueue_paused', ())] == 0


def test_pause_keeps_accepting_survives_a_restart_and_resume_runs(environment):
    environment.start_server()
    result = environment.run('bots-jobqueue', '-c' + environment.configdir, 'pause')
    assert result.returncode == 0 and 'paused' in result.stdout
    proxy = environment.proxy()
    assert proxy.addjob(environment.engine('held'), 5) == 0          # still accepted
    environment.stop_server(signal.SIGKILL)
    environment.start_server()
    assert 'The queue is paused (since ' in environment.log()
    status, _, body = get(environment, '/health')
    assert status == 200 and json.loads(body)['paused'] is True      # paused is healthy, not down
    assert metrics(environment)[('botsjobqueue_paused', ())] == 1
    assert 'PAUSED' in environment.run('bots-jobqueue', '-c' + environment.configdir, 'status').stdout
    time.sleep(1)
    assert environment.runs('start') == [] and [job[1] for job in proxy.listjobs()] == [1]
    assert proxy.resume() == 0
    wait_until(lambda: environment.runs(), message='the held job to run after resume')
    assert 'Queue resumed' in environment.log()


def test_a_stopped_or_killed_server_fails_the_probe(environment):
    environment.start_server()
    assert get(environment, '/health')[0] == 200
    environment.stop_server(signal.SIGKILL)
    with pytest.raises(urllib.error.URLError):
        get(environment, '/health')


def test_pages_are_off_where_others_reach_them_unless_asked(environment):
    environment.write_ini(jobqueue='status_page = False')
    environment.start_server()
    for path in ('/', '/health', '/metrics', '/status.json'):
        assert get(environment, path)[0] == 403
    assert environment.proxy().addjob(['isup'], 5) == 0               # XML-RPC goes on


def test_output_is_text_never_markup(environment, tmp_path):
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('hostile', HOSTILE), 5)
    finished_output(proxy, 1)
    status, headers, body = get(environment, '/output?job=1')
    assert status == 200 and headers['Content-Type'] == 'text/plain; charset=utf-8'
    assert headers['X-Content-Type-Options'] == 'nosniff' and HOSTILE.encode() in body
    assert get(environment, '/output?job=x')[0] == 400 and get(environment, '/output?job=99')[0] == 404
    assert get(environment, '/nothing')[0] == 404


def test_the_status_page_in_a_real_browser(environment, tmp_path):
    """What an operator sees while jobs wait, run and finish; hostile task arguments and output
    show as text.  The screenshot is the one in the README."""
    from playwright.sync_api import sync_playwright
    assert os.path.exists(CHROMIUM), 'this test needs Debian\'s chromium: apt-get install chromium'
    environment.write_ini(jobqueue='nr_threads = 1')
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('hostile', HOSTILE), 3)
    proxy.addjob(environment.engine('fails', '--exit=1'), 3)
    proxy.addjob(environment.engine('done'), 3)
    wait_until(lambda: len(proxy.history(10)) == 3, message='three finished jobs')
    proxy.addjob(environment.engine('runs', '--sleep=60', '--print=300'), 1)
    wait_until(lambda: proxy.status()['running'], message='a running job')
    proxy.addjob(environment.engine('waits-second'), 7)
    proxy.addjob(environment.engine('waits-first'), 2)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={'width': 1100, 'height': 900})
        page.goto('http://127.0.0.1:%d/' % environment.port)
        page.wait_for_selector('#history tbody tr:nth-child(3)')
        page.wait_for_selector('#running pre', timeout=15000)
        assert page.inner_text('#state') == 'running'
        assert 'fake engine started: runs' in page.inner_text('#running')
        waiting = page.locator('#waiting tbody tr').all_inner_texts()
        assert 'waits-first' in waiting[0] and 'waits-second' in waiting[1]     # launch order
        history = page.inner_text('#history')
        assert HOSTILE in history                  # the argument, shown as the text it is
        assert page.title() == 'Bots job queue'    # no script of the job's ran
        assert page.locator('#history img').count() == 0 and page.locator('#history script').count() == 0
        assert page.locator('#day rect').count() == 4
        frame = page.locator('#day').bounding_box()
        for bar in page.locator('#day rect').all():       # every bar inside the picture, seen
            box = bar.bounding_box()
            assert frame['x'] <= box['x'] and box['x'] + box['width'] <= frame['x'] + frame['width'] + 0.5
        assert page.locator('#day rect.running').count() == 1 and page.locator('#day rect.failed').count() == 1
        page.screenshot(path=str(tmp_path / 'status-page.png'), full_page=True)
        # Paused, the page says so at its next refresh.
        proxy.pause()
        page.wait_for_selector('#state.paused', timeout=10000)
        assert page.inner_text('#state').startswith('PAUSED')
        # The output of a finished job is one click away, as text.
        page.click('#history a >> text="1"')
        page.wait_for_load_state()
        assert HOSTILE in page.inner_text('body') and page.title() != 'owned'
        narrow = browser.new_page(viewport={'width': 380, 'height': 800})
        narrow.goto('http://127.0.0.1:%d/' % environment.port)
        narrow.wait_for_selector('#history tbody tr:nth-child(3)')
        assert narrow.evaluate('document.documentElement.scrollWidth') <= 400     # no sideways scrolling
        browser.close()
    if os.environ.get('BOTS_JOBQUEUE_SCREENSHOT'):      # set to renew the README's picture
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        shutil.copyfile(str(tmp_path / 'status-page.png'), SCREENSHOT)
    assert os.path.getsize(str(tmp_path / 'status-page.png')) > 10000


def test_the_page_lists_the_next_scheduled_runs(environment):
    environment.write_ini(extra='[schedule_yearly]\nwhen = 0 1 1 1 *\narguments = --new\n'
                                '[schedule_often]\nwhen = */5 * * * *\narguments = --new\n')
    environment.start_server()
    status, _, body = get(environment, '/status.json')
    schedules = json.loads(body)['schedules']
    assert status == 200 and [entry['schedule'] for entry in schedules] == ['schedule_often', 'schedule_yearly']
    assert schedules[0]['when'] == '*/5 * * * *' and schedules[0]['next_run'] - time.time() <= 300
