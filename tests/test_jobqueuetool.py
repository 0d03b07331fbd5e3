"""bots-jobqueue, the operator's view, against a real server."""
import json

from conftest import finished_output, wait_until


def tool(environment, *args):
    return environment.run('bots-jobqueue', '-c' + environment.configdir, *args)


def test_status_shows_running_and_waiting_jobs(server):
    proxy = server.proxy()
    proxy.addjob(server.engine('running', '--sleep=2'), 5)
    wait_until(lambda: server.runs('start'), message='the job to start')
    proxy.addjob(server.engine('waiting'), 3)
    result = tool(server, 'status')
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == 'Running (1):'
    assert 'running --sleep=2' in result.stdout and 'Waiting (1):' in result.stdout
    data = json.loads(tool(server, '--json', 'status').stdout)
    assert data['running'][0]['jobnumber'] == 1 and data['running'][0]['pid'] == server.runs('start')[0]['pid']
    assert data['waiting'] == [[3, 2, server.engine('waiting')]]


def test_history_and_show(server):
    proxy = server.proxy()
    proxy.addjob(server.engine('first', '--exit=2'), 5)
    wait_until(lambda: proxy.history(5) and proxy.history(1)[0].get('output'), message='a finished job')
    result = tool(server, 'history')
    assert result.returncode == 0
    assert result.stdout.splitlines()[1].split()[:2] == ['1', '5']
    shown = tool(server, 'show', '1')
    assert 'exitcode:  2' in shown.stdout and 'fake engine started: first --exit=2' in shown.stdout
    data = json.loads(tool(server, '--json', 'history', '1').stdout)
    assert data[0]['exitcode'] == 2 and data[0]['status'] == 'failed'
    missing = tool(server, 'show', '99')
    assert missing.returncode == 2


def test_remove_and_clear(server):
    proxy = server.proxy()
    proxy.addjob(server.engine('running', '--sleep=2'), 5)
    wait_until(lambda: server.runs('start'), message='the job to start')
    for name in ('a', 'b', 'c'):
        proxy.addjob(server.engine(name), 5)
    assert tool(server, 'remove', '3').returncode == 0
    assert [job[1] for job in proxy.listjobs()] == [2, 4]
    assert tool(server, 'remove', '3').returncode == 2
    assert tool(server, 'clear').returncode == 0
    assert proxy.listjobs() == []


def test_server_down_and_bad_usage(environment):
    result = tool(environment, 'status')
    assert result.returncode == 1 and 'cannot contact the jobqueue-server' in result.stderr
    result = tool(environment, 'frobnicate')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    result = tool(environment, 'show', 'x')
    assert result.returncode == 1 and 'Traceback' not in result.stderr


def test_control_bytes_in_output_are_shown_escaped_everywhere(server):
    """ANSI colours, a form feed, NUL and the EDIFACT level-B separators in a job's output:
    history, history --json and show answer (escaped as \\x1c), and the log has no raw escape."""
    raw = b'\x1b[31mred\x1b[0m page\x0cbreak nul\x00 UNB\x1cseg\x1dgrp\x1eel\x1fend \x7f\xc2\x9b\r\nline two\r\n'
    proxy = server.proxy()
    assert proxy.addjob(server.engine('control', '--bytes=' + raw.hex()), 5) == 0
    finished_output(proxy, 1)
    for args in (('history',), ('--json', 'history'), ('show', '1'), ('--json', 'show', '1')):
        result = tool(server, *args)
        assert result.returncode == 0 and 'Traceback' not in result.stderr, (args, result.stderr)
    shown = tool(server, 'show', '1').stdout
    assert '\\x1b[31mred\\x1b[0m page\\x0cbreak nul\\x00 UNB\\x1cseg\\x1dgrp\\x1eel\\x1fend \\x7f\\x9b' in shown
    assert 'line two' in shown and '\\x0d' not in shown           # Windows line ends stay line ends
    output = json.loads(tool(server, '--json', 'show', '1').stdout)['output']
    assert '\\x1c' in output and '\x1c' not in output
    wait_until(lambda: 'Output of job 1' in server.log(), message='the output in the log')
    log = server.log()
    assert '\x1b' not in log and '\x00' not in log and '\x1c' not in log and '\\x1b[31mred' in log
