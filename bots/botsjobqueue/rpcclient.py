"""Calls to the job queue server, with a timeout (the standard library's
ServerProxy has none, and a stuck server must not hang a client).

``addjob`` is the call schedulers make every few minutes through
bots-job2queue, whose start-up time counts: it speaks HTTP over a plain socket
and writes and reads its few XML elements itself, so that neither http.client
nor xmlrpc.client (which pull in the e-mail and SSL packages) is imported.
Any other call, and any addjob with values of unusual types, goes through
xmlrpc.client.  To a server at an IPv4 address (the loopback one, as a rule)
it connects through the interpreter's own ``_socket``: the ``socket`` module
around it builds its enums at import, a cost on every start of the client.
"""
import re

try:
    import _socket
except ImportError:          # an interpreter without CPython's module: the usual one
    _socket = None

MAX_ANSWER = 16 * 1024 * 1024
FAULT_STRING = re.compile(rb'<name>faultString</name>\s*<value>(?:<string>)?([^<]*)')
INT_ANSWER = re.compile(rb'<params>\s*<param>\s*<value>\s*<(int|i4)>\s*(-?\d+)\s*</\1>')


class CallFailed(Exception):
    """The server could not be reached, did not answer in time, or answered with an error."""


def addjob(port, task, priority, timeout=10, host='127.0.0.1', secret=''):
    """The server's answer to ``addjob(task, priority)``: 0, 2, 3 or 4.  Raises CallFailed."""
    if type(priority) is not int or not all(type(arg) is str for arg in task):
        return call(port, 'addjob', list(task), priority, timeout=timeout, host=host, secret=secret)
    values = ''.join('<value><string>%s</string></value>' % _escape(arg) for arg in task)
    body = ('<?xml version="1.0"?>\n<methodCall><methodName>addjob</methodName><params>'
            '<param><value><array><data>%s</data></array></value></param>'
            '<param><value><int>%d</int></value></param></params></methodCall>\n' % (values, priority))
    answer = post(host, port, body.encode('utf-8'), timeout, secret)
    match = INT_ANSWER.search(answer)
    if match is None:
        fault = FAULT_STRING.search(answer)
        if fault is not None:              # why the server refused: its words
            raise CallFailed(fault.group(1).decode('utf-8', 'replace').replace('&lt;', '<').replace(
                '&gt;', '>').replace('&amp;', '&'))
        raise CallFailed('the server refused the request or gave an answer that is not a number')
    return int(match.group(2))


def _escape(text):
    return text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')


def post(host, port, body, timeout, secret=''):
    """POST ``body`` to the server (HTTP/1.0, so the server closes when done); the answer's body.
    ``secret``: the shared secret, sent as a bearer token (a server elsewhere asks for it)."""
    authorization = b'Authorization: Bearer %s\r\n' % secret.encode('utf-8') if secret else b''
    request = (b'POST /RPC2 HTTP/1.0\r\nHost: %s:%d\r\nContent-Type: text/xml\r\n%s'
               b'Content-Length: %d\r\n\r\n' % (host.encode('ascii', 'replace'), port, authorization, len(body))
               + body)
    try:
        sock = _connect(host, port, timeout)
        try:
            sock.sendall(request)
            chunks = []
            size = 0
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise CallFailed('the answer is too large')
        finally:
            sock.close()
    except OSError as exc:
        raise CallFailed(str(exc) or type(exc).__name__)
    head, _, answer = b''.join(chunks).partition(b'\r\n\r\n')
    status = head.split(None, 2)[1:2]
    if status != [b'200']:
        why = answer.decode('utf-8', 'replace').strip().splitlines()[:1]
        raise CallFailed('the server answered HTTP %s%s' % (status[0].decode('ascii', 'replace') if status else '?',
                                                           ': ' + why[0][:300] if why else ''))
    return answer


def _connect(host, port, timeout):
    """A connected socket (raises OSError)."""
    if _socket is not None and host.count('.') == 3 and host.replace('.', '').isdigit():
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((host.encode('ascii'), port))     # bytes: a str would go through the idna codec
        except BaseException:
            sock.close()
            raise
        return sock
    import socket
    return socket.create_connection((host, port), timeout=timeout)


def call(port, method, *params, timeout=10, host='127.0.0.1', secret=''):
    """The server's answer to ``method(*params)``.  Raises CallFailed, or xmlrpc.client.Fault."""
    import xmlrpc.client
    body = xmlrpc.client.dumps(params, method, allow_none=True).encode('utf-8')
    answer = post(host, port, body, timeout, secret)
    try:
        return xmlrpc.client.loads(answer)[0][0]
    except xmlrpc.client.Fault:
        raise
    except (xmlrpc.client.Error, ValueError, IndexError) as exc:
        raise CallFailed('unreadable answer: %s' % exc)
