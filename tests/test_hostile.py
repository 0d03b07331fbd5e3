"""Hostile input and load: the server refuses clearly, keeps running and loses nothing."""
import os
import socket
import threading
import time
import xmlrpc.client

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import wait_until


def raw_request(port, head, body=b'', timeout=10):
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as sock:
        sock.sendall(head + body)
        answer = b''
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    return answer


def post(port, body, headers=b''):
    head = (b'POST /RPC2 HTTP/1.1\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n'
            b'Connection: close\r\n%s\r\n' % (len(body), headers))
    return raw_request(port, head, body)


def in_threads(function, count):
    """``function(n)`` for n in range(count), each in a thread of its own, all at once."""
    threads = [threading.Thread(target=function, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def still_serves(environment):
    assert environment.proxy().addjob(['isup'], 5) == 0


def test_oversized_body_is_refused_before_it_is_read(server):
    answer = raw_request(server.port, b'POST /RPC2 HTTP/1.1\r\nContent-Type: text/xml\r\nContent-Length: 500000000\r\n\r\n')
    assert answer.startswith(b'HTTP/1.1 413')
    still_serves(server)


def test_missing_length_and_compressed_bodies_are_refused(server):
    assert raw_request(server.port, b'POST /RPC2 HTTP/1.1\r\nContent-Type: text/xml\r\nConnection: close\r\n\r\n'
                       ).startswith(b'HTTP/1.1 411')
    assert post(server.port, b'\x1f\x8b', b'Content-Encoding: gzip\r\n').startswith(b'HTTP/1.1 415')
    still_serves(server)


def test_entity_expansion_is_refused(server):
    entities = ''.join('<!ENTITY e%d "%s">' % (n, ('&e%d;' % (n - 1)) * 10) for n in range(1, 10))
    body = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e0 "lol">%s]><methodCall><methodName>addjob'
            '</methodName><params><param><value><array><data><value><string>&e9;</string></value></data>'
            '</array></value></param><param><value><int>5</int></value></param></params></methodCall>'
            % entities).encode()
    answer = post(server.port, body)
    assert b'<fault>' in answer or answer.startswith(b'HTTP/1.1 4')
    still_serves(server)
    assert server.proxy().listjobs() == []


def test_deep_nesting_is_refused(server):
    depth = 20000
    body = (b'<?xml version="1.0"?><methodCall><methodName>addjob</methodName><params><param><value>'
            + b'<array><data><value>' * depth + b'</value></data></array>' * depth
            + b'</value></param><param><value><int>5</int></value></param></params></methodCall>')
    answer = post(server.port, body)
    assert b'<fault>' in answer or answer.startswith(b'HTTP/1.1 4')
    still_serves(server)


def test_garbage_and_unknown_methods(server):
    for body in (b'\x00\xff' * 100, b'<methodCall><methodName>os.system</methodName></methodCall>',
                 b'<?xml version="1.0"?><methodCall><methodName>_dispatch</methodName><params/></methodCall>'):
        answer = post(server.port, body)
        assert b'<fault>' in answer, answer[:200]
    # Helpers of the service are not methods of the server: queueing past the checks, reloading.
    for method, params in (('add', ([server.engine('x')], 0, 'fake')), ('reconfigure', (1, 2)),
                           ('_add', ()), ('scheduler', ())):
        with pytest.raises(xmlrpc.client.Fault, match='is not supported'):
            getattr(server.proxy(), method)(*params)
    assert server.proxy().listjobs() == []
    assert raw_request(server.port, b'PUT / HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'
                       ).startswith(b'HTTP/1.1 501')
    assert raw_request(server.port, b'GET /health HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello'
                       ).startswith(b'HTTP/1.1 400')            # a GET with a body
    still_serves(server)


def closed_by_server(sock, timeout):
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_connections_beyond_the_limit_make_room_and_idle_ones_are_closed(environment):
    """max_connections idle connections do not lock anyone out: a new one closes the one that
    waited longest; idle connections are closed after request_timeout."""
    environment.write_ini(jobqueue='max_connections = 4\nrequest_timeout = 3')
    environment.start_server()
    idle = [socket.create_connection(('127.0.0.1', environment.port)) for _ in range(10)]
    try:
        still_serves(environment)
        assert all(closed_by_server(sock, 2) for sock in idle[:7])    # made room, oldest first
        assert not closed_by_server(idle[9], 0.2)
        assert all(closed_by_server(sock, 10) for sock in idle[7:])   # request_timeout
    finally:
        for sock in idle:
            sock.close()


def test_a_request_must_arrive_whole_within_request_timeout(environment):
    """A client that sends a byte now and then is closed request_timeout after it connected,
    with 408, however often it sends."""
    environment.write_ini(jobqueue='request_timeout = 2')
    environment.start_server()
    sock = socket.create_connection(('127.0.0.1', environment.port))
    started = time.monotonic()
    answer = b''
    try:
        sock.settimeout(0.3)
        for byte in b'POST /RPC2 HTTP/1.1\r\nContent-Type: text/xml\r\nX-Slow: ' + b'y' * 100:
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(1000)
            except socket.timeout:
                continue
            except OSError:
                break
            if answer:
                break
    finally:
        sock.close()
    assert answer.startswith(b'HTTP/1.1 408'), answer
    assert time.monotonic() - started < 4
    still_serves(environment)


def test_header_bytes_are_bounded(server):
    """Header lines of 64 KB each: refused once the head passes 64 KB, not read on."""
    line = b'X-Big: ' + b'y' * 65000 + b'\r\n'
    answer = raw_request(server.port, b'POST /RPC2 HTTP/1.1\r\n' + line * 2)
    assert answer.startswith(b'HTTP/1.1 431'), answer[:100]
    still_serves(server)


def test_many_concurrent_clients_lose_nothing_and_never_duplicate(server):
    proxy = server.proxy()
    proxy.addjob(server.engine('blocker', '--sleep=3'), 5)
    wait_until(lambda: server.runs('start'), message='the blocker to start')
    answers = []
    errors = []

    def client(number):
        try:
            local = server.proxy()
            for call in range(40):
                task = server.engine('route%d' % ((number + call) % 10))
                answers.append((tuple(task), local.addjob(task, 1 + (number * call) % 9)))
        except Exception as exc:          # collected and asserted below
            errors.append(exc)

    in_threads(client, 24)
    assert errors == []
    assert len(answers) == 24 * 40
    assert {code for _, code in answers} <= {0, 4}
    waiting = proxy.listjobs()
    tasks = [tuple(job[2]) for job in waiting]
    assert len(tasks) == len(set(tasks)) == 10
    numbers = [job[1] for job in waiting]
    assert len(set(numbers)) == 10


def test_a_job_flooding_its_output_keeps_server_memory_and_disk_bounded(environment):
    environment.write_ini(jobqueue='output_limit = 65536')
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('flood', '--print=300000000'), 5)
    wait_until(lambda: 'Finished job 1' in environment.log(), timeout=120, message='the flood to end')
    rss_kb = _rss_kb(environment.server.pid)
    assert rss_kb < 100 * 1024, rss_kb
    size = sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(environment.botssys) for name in names)
    assert size < 5 * 1024 * 1024, size
    assert wait_until(lambda: proxy.history(1), message='the history')[0]['exitcode'] == 0


def _rss_kb(pid):
    with open('/proc/%d/status' % pid) as handle:
        for line in handle:
            if line.startswith('VmHWM:'):
                return int(line.split()[1])
    raise AssertionError('no VmHWM for %d' % pid)


xmlrpc_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 31, 2 ** 31 - 1) | st.floats(allow_nan=False)
    | st.text(st.characters(blacklist_categories=('Cs',), blacklist_characters='\x00\r'), max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(['addjob', 'listjobs', 'clearjobq', 'removejob', 'showjob', 'history',
                               'status', 'getjob', 'nosuchmethod']),
       params=st.lists(xmlrpc_values, max_size=3))
def test_fuzz_random_calls_never_break_the_server(fuzz_server, method, params):
    try:
        body = xmlrpc.client.dumps(tuple(params), method, allow_none=True).encode('utf-8')
    except (TypeError, OverflowError, ValueError):
        return
    answer = post(fuzz_server.port, body)
    assert answer.startswith(b'HTTP/1.1 200'), answer[:200]
    proxy = fuzz_server.proxy()
    assert proxy.addjob(['isup'], 5) == 0
    tasks = [tuple(job[2]) for job in proxy.listjobs()]
    assert len(tasks) == len(set(tasks))
    assert fuzz_server.runs('start') == []        # nothing random was ever authorized to run


@pytest.fixture(scope='module')
def fuzz_server(tmp_path_factory):
    from conftest import Environment
    environment = Environment(tmp_path_factory.mktemp('fuzz'))
    environment.start_server()
    yield environment
    environment.stop_server()


def test_bad_request_lines_and_headers_get_http_errors(server):
    assert raw_request(server.port, b'BROKEN\r\n\r\n').startswith(b'HTTP/1.1 400')
    assert raw_request(server.port, b'POST /RPC2 HTTP/2.0\r\n\r\n').startswith(b'HTTP/1.1 505')
    assert raw_request(server.port, b'POST /RPC2 HTTP/1.1\r\nno colon here\r\n\r\n').startswith(b'HTTP/1.1 400')
    many = b''.join(b'X-%d: y\r\n' % number for number in range(200))
    assert raw_request(server.port, b'POST /RPC2 HTTP/1.1\r\n' + many + b'\r\n').startswith(b'HTTP/1.1 431')
    still_serves(server)


def test_keep_alive_serves_many_calls_on_one_connection(server):
    import http.client
    connection = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
    body = xmlrpc.client.dumps((['isup'], 5), 'addjob').encode()
    for _ in range(20):
        connection.request('POST', '/RPC2', body, {'Content-Type': 'text/xml'})
        response = connection.getresponse()
        assert response.status == 200 and b'<int>0</int>' in response.read()
    connection.close()


def test_tasks_are_bounded_in_arguments_and_bytes(environment):
    """A task of 20,000 empty arguments passes any character count: the count of arguments
    bounds it; multi-byte characters count as the bytes they take."""
    environment.write_ini(jobqueue='authorized_tasks = *\nmax_task_args = 256\nmax_task_size = 65536')
    environment.start_server()
    proxy = environment.proxy()
    with pytest.raises(xmlrpc.client.Fault, match='20000 arguments; at most 256'):
        proxy.addjob(['true'] + [''] * 19999, 5)
    with pytest.raises(xmlrpc.client.Fault, match='longer than 65536 bytes'):
        proxy.addjob(['true', '\u20ac' * 30000], 5)         # 30,000 characters, 90,000 bytes
    assert proxy.listjobs() == []
    assert proxy.addjob(['true'] + ['a'] * 254, 5) == 0      # 255 arguments pass
    still_serves(environment)


def test_long_tasks_in_a_long_queue_keep_every_answer_readable(environment):
    """300 waiting jobs of 60 KB each: status, listjobs and bots-jobqueue stay readable; the
    whole queue is read page by page, every job once."""
    environment.write_ini(jobqueue='authorized_tasks = *\nnr_threads = 1')
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.addjob(environment.engine('gate', '--sleep=60'), 1) == 0
    wait_until(lambda: environment.runs('start'), message='the gate job to start')
    for number in range(300):
        assert proxy.addjob(['true', str(number), 'x' * 60000], 5) == 0
    status = proxy.status(1000)
    assert status['waiting_count'] == 300 and 0 < len(status['waiting']) < 300
    first = proxy.listjobs()
    assert 0 < len(first) < 300
    result = environment.run('bots-jobqueue', '-c' + environment.configdir, '--json', '--all', 'status')
    assert result.returncode == 0, result.stderr
    import json
    waiting = json.loads(result.stdout)['waiting']
    assert [job[2][1] for job in waiting] == [str(number) for number in range(300)]
    result = environment.run('bots-jobqueue', '-c' + environment.configdir, 'status')
    assert result.returncode == 0 and 'and %d more' % (300 - len(status['waiting'])) in result.stdout


def test_refusals_are_logged_at_a_bounded_rate(server):
    """A stream of refused requests - 64 KB tasks not authorized, bad HTTP - adds a few lines to
    the log, not one (with the whole request) per refusal."""
    before = os.path.getsize(os.path.join(server.botssys, 'logging', 'jobqueue.log'))
    proxy = server.proxy()
    big = ['/bin/sh', '-c', 'x' * 60000]
    for _ in range(200):
        assert proxy.addjob(big, 5) == 3
        assert post(server.port, b'<x/>', b'Content-Length: 4\r\n').startswith(b'HTTP/1.1 400')
    still_serves(server)
    grown = os.path.getsize(os.path.join(server.botssys, 'logging', 'jobqueue.log')) - before
    log = server.log()
    print('log grew by %d bytes for 400 refusals' % grown)
    assert log.count('not an authorized task') == 1 and log.count('Refused a request from') == 1
    assert grown < 5000


def test_a_count_of_the_refusals_left_out_comes_with_the_next_line(tmp_path):
    import logging
    from bots.botsjobqueue.botslog import RateLimited
    logger = logging.getLogger('test.ratelimited')
    handler = logging.FileHandler(str(tmp_path / 'log'))
    logger.addHandler(handler)
    now = [1000.0]
    limited = RateLimited(logger, clock=lambda: now[0])
    for _ in range(5):
        limited.log(logging.WARNING, 'kind', '10.0.0.1', 'Refused %s', 'this')
    limited.log(logging.WARNING, 'kind', '10.0.0.2', 'Refused %s', 'that')
    now[0] += 61
    limited.log(logging.WARNING, 'kind', '10.0.0.1', 'Refused %s', 'this')
    handler.close()
    assert (tmp_path / 'log').read_text().splitlines() == [
        'Refused this', 'Refused that',
        'Refused this (4 more like it from 10.0.0.1 in the last 60 seconds not logged)']


def test_a_small_open_files_limit_still_serves_a_crowd(environment):
    """Started with 64 open files allowed: max_connections fits (32, said in the log), and 400
    clients at once are all served (those beyond it wait in the backlog, none is cut off)."""
    import resource
    import subprocess
    from conftest import script

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    environment.server = subprocess.Popen([script('bots-jobqueueserver'), '-c' + environment.configdir],
                                          cwd=environment.root, env=environment.env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    wait_until(environment._listening, message='the server to listen')
    assert 'may open only 64 files: at most 32 connections are served at once' in environment.log()
    results, lock = [], threading.Lock()

    def client(n):
        try:
            answer = xmlrpc.client.ServerProxy('http://127.0.0.1:%d' % environment.port).addjob(
                environment.engine('crowd-%d' % (n % 20)), 5)
        except Exception as exc:
            answer = repr(exc)
        with lock:
            results.append(answer)

    in_threads(client, 400)
    failed = [result for result in results if result not in (0, 4)]
    print('\n400 clients with 64 open files: %d failed' % len(failed))
    assert len(results) == 400 and failed == []
    still_serves(environment)


def test_the_waiting_tasks_are_bounded_in_bytes(environment):
    """max_queue_bytes: past it an add gets a Fault (not stored, try again), said once in the log;
    the jobs added before are kept, and room comes back as jobs leave."""
    environment.write_ini(jobqueue='max_queue_bytes = 1000000\nnr_threads = 1')
    environment.start_server()
    proxy = environment.proxy()
    proxy.pause()
    added = 0
    with pytest.raises(xmlrpc.client.Fault, match='the queue is full'):
        for n in range(100):
            proxy.addjob(environment.engine('%d' % n, 'x' * 60000), 5)
            added += 1
    assert 14 <= added <= 16
    for n in range(5):
        with pytest.raises(xmlrpc.client.Fault, match='not stored, try again'):
            proxy.addjob(environment.engine('more-%d' % n, 'x' * 60000), 5)
    assert len(proxy.listjobs()) == added
    assert environment.log().count('The queue is full') == 1
    assert proxy.removejob(1) == 0
    assert proxy.addjob(environment.engine('room-again', 'x' * 60000), 5) == 0
    assert 'The queue takes new jobs again.' in environment.log()
    environment.stop_server()
    environment.start_server()                   # restored jobs count too
    with pytest.raises(xmlrpc.client.Fault, match='the queue is full'):
        environment.proxy().addjob(environment.engine('after-restart', 'x' * 60000), 5)
