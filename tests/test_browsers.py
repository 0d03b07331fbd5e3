"""Web pages of other sites, open in the operator's browser, neither change nor read the queue
(SPEC 7): tried in a real headless Chromium, and with the raw requests a browser or a proxy
could send."""
import http.server
import json
import os
import shutil
import threading

import pytest

from conftest import free_port, wait_until
from test_hostile import raw_request

CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'


def call(method, *params):
    """The XML body of an XML-RPC call with string and int parameters."""
    values = ''.join('<param><value><int>%d</int></value></param>' % p if isinstance(p, int) else
                     '<param><value><array><data>%s</data></array></value></param>'
                     % ''.join('<value><string>%s</string></value>' % arg for arg in p) for p in params)
    return ('<?xml version="1.0"?><methodCall><methodName>%s</methodName><params>%s</params></methodCall>'
            % (method, values)).encode()


def answer_code(answer):
    return int(answer.split(b' ', 2)[1])


@pytest.fixture
def queue_with_a_waiting_job(environment):
    environment.write_ini(jobqueue='nr_threads = 1')
    environment.start_server()
    proxy = environment.proxy()
    assert proxy.addjob(environment.engine('first', '--sleep=120'), 5) == 0
    wait_until(lambda: proxy.status()['running'], message='a running job')
    assert proxy.addjob(environment.engine('waiting'), 5) == 0
    return environment


def unchanged(environment):
    proxy = environment.proxy()
    status = proxy.status()
    assert not status['paused']
    assert [job[2][-1] for job in status['waiting']] == ['waiting']
    assert len(status['running']) == 1


def test_raw_requests_a_browser_or_a_proxy_could_send_change_nothing(queue_with_a_waiting_job):
    environment = queue_with_a_waiting_job
    port = environment.port
    body = call('clearjobq')
    own = b'Host: 127.0.0.1:%d\r\n' % port

    def post(headers, data=body):
        return raw_request(port, b'POST /RPC2 HTTP/1.1\r\n%sConnection: close\r\n\r\n' % headers + data)

    length = b'Content-Length: %d\r\n' % len(body)
    refused = {
        'another site (form)': post(own + b'Content-Type: text/plain\r\n' + length),
        'no content type': post(own + length),
        'foreign Origin': post(own + b'Content-Type: text/xml\r\nOrigin: http://evil.example\r\n' + length),
        'other port Origin': post(own + b'Content-Type: text/xml\r\nOrigin: http://127.0.0.1:%d\r\n' % (port + 1)
                                  + length),
        'null Origin': post(own + b'Content-Type: text/xml\r\nOrigin: null\r\n' + length),
        'cross-site fetch': post(own + b'Content-Type: text/xml\r\nSec-Fetch-Site: same-site\r\n' + length),
        'rebound name': post(b'Host: evil.example:%d\r\nContent-Type: text/xml\r\n' % port + length),
        'underscore length': post(own + b'Content-Type: text/xml\r\nContent-Length: 1_%d\r\n' % len(body)),
        'plus length': post(own + b'Content-Type: text/xml\r\nContent-Length: +%d\r\n' % len(body)),
        'two lengths': post(own + b'Content-Type: text/xml\r\n' + length + b'Content-Length: 5\r\n'),
        'chunked': post(own + b'Content-Type: text/xml\r\nTransfer-Encoding: chunked\r\n',
                        b'%x\r\n%s\r\n0\r\n\r\n' % (len(body), body)),
        'smuggled': post(own + b'Content-Type: text/xml\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n',
                         b'%x\r\n%s\r\n0\r\n\r\n' % (len(body), body)),
    }
    codes = {name: answer_code(answer) for name, answer in refused.items()}
    print('refusals:', codes)
    assert all(400 <= code < 500 for code in codes.values()), codes
    assert codes['another site (form)'] == 415 and codes['foreign Origin'] == 403 and codes['rebound name'] == 403
    assert codes['chunked'] == 400 and codes['underscore length'] == 400
    for path in (b'/status.json', b'/output?job=1', b'/', b'/health'):
        answer = raw_request(port, b'GET %s HTTP/1.1\r\nHost: evil.example:%d\r\nConnection: close\r\n\r\n'
                             % (path, port))
        assert answer_code(answer) == 403 and b'waiting' not in answer and b'fake engine' not in answer
        answer = raw_request(port, b'GET %s HTTP/1.1\r\nHost: localhost:%d\r\nOrigin: http://evil.example\r\n'
                             b'Connection: close\r\n\r\n' % (path, port))
        assert answer_code(answer) == 403
    unchanged(environment)
    # What every client sends still works: own names and addresses, or no Host at all (HTTP/1.0).
    for host in (b'localhost:%d' % port, b'127.0.0.1:%d' % port, b'[::1]:%d' % port):
        answer = post(b'Host: %s\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: %d\r\n'
                      % (host, len(call('listjobs'))), call('listjobs'))
        assert answer_code(answer) == 200 and b'waiting' in answer
    # Each kind of refusal is logged, at a bounded rate.
    log = environment.log()
    assert 'Refused a request from 127.0.0.1: 415' in log and 'Refused a request from 127.0.0.1: 403' in log


def test_pages_of_another_origin_in_a_real_browser_change_and_read_nothing(queue_with_a_waiting_job, tmp_path):
    """A page served from another port tries every method with fetch (simple and not), with
    forms of each encoding, and reads the status; DNS rebinding is tried with a name that
    the browser resolves to 127.0.0.1."""
    from playwright.sync_api import sync_playwright
    assert os.path.exists(CHROMIUM), "this test needs Debian's chromium: apt-get install chromium"
    environment = queue_with_a_waiting_job
    port = environment.port
    methods = [('clearjobq',), ('pause',), ('addjob', environment.engine('from-the-web'), 1), ('removejob', 2)]
    bodies = [call(*method).decode() for method in methods]
    attack = '''<!doctype html><html><body><script>
    var queue = "http://127.0.0.1:%(port)d/RPC2", bodies = %(bodies)s, results = [];
    async function attempt(name, promise) {
      try { var answer = await promise; results.push(name + ": read " + (await answer.text()).slice(0, 80)); }
      catch (error) { results.push(name + ": failed"); }
    }
    async function run() {
      for (var body of bodies) {
        await attempt("text/plain", fetch(queue, {method: "POST", body: body, headers: {"Content-Type": "text/plain"}}));
        await attempt("no-cors", fetch(queue, {method: "POST", mode: "no-cors", body: body}));
        await attempt("text/xml", fetch(queue, {method: "POST", body: body, headers: {"Content-Type": "text/xml"}}));
        await attempt("no-cors text/xml", fetch(queue, {method: "POST", mode: "no-cors", body: body,
                                                       headers: {"Content-Type": "text/xml"}}));
        await attempt("blob", fetch(queue, {method: "POST", mode: "no-cors", body: new Blob([body], {type: "text/xml"})}));
      }
      await attempt("status", fetch("http://127.0.0.1:%(port)d/status.json"));
      await attempt("output", fetch("http://127.0.0.1:%(port)d/output?job=1"));
      document.title = "done";
    }
    run();
    </script>
    %(forms)s
    </body></html>''' % {'port': port, 'bodies': json.dumps(bodies), 'forms': ''.join(
        '<iframe name="f%(n)d"></iframe><form id="form%(n)d" target="f%(n)d" method="POST" action="http://127.0.0.1:'
        '%(port)d/RPC2" enctype="%(enctype)s"><input name="%(name)s" value="%(value)s"></form>'
        % {'n': n, 'port': port, 'enctype': enctype, 'name': body[:20].replace('"', '&quot;'),
           'value': body[20:].replace('"', '&quot;')}
        for n, (enctype, body) in enumerate((enctype, body) for enctype in
                                            ('text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data')
                                            for body in bodies))}
    (tmp_path / 'attack.html').write_text(attack)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    other_port = free_port()
    site = http.server.ThreadingHTTPServer(('127.0.0.1', other_port), Quiet)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=['--host-resolver-rules=MAP evil.example 127.0.0.1'])
            page = browser.new_page()
            page.goto('http://localhost:%d/attack.html' % other_port)
            page.wait_for_function('document.title == "done"', timeout=60000)
            page.evaluate('for (var form of document.forms) form.submit()')
            page.wait_for_timeout(2000)
            results = page.evaluate('results')
            print('\n'.join(results))
            assert not [result for result in results if 'read' in result and ('waiting' in result or
                                                                               'methodResponse' in result)]
            # DNS rebinding: the attacker's name, now pointing at this machine, on the queue's port.
            rebound = browser.new_page()
            rebound.goto('http://evil.example:%d/status.json' % port)
            text = rebound.inner_text('body')
            assert 'waiting' not in text and 'not this server' in text
            rebound.goto('http://evil.example:%d/' % port)
            assert 'Bots job queue' not in rebound.title()
            browser.close()
    finally:
        site.shutdown()
        site.server_close()
    unchanged(environment)
    assert 'from-the-web' not in environment.log()
