"""HTTP as the job queue server reads it: the request head, the browser rules, the answer.

No sockets here: the functions take bytes and headers and either return what
the server needs or raise ``Refusal`` (an HTTP error, after which the
connection is closed).  What is accepted is deliberately narrow - HTTP/1.0
and 1.1, a Content-Length body only, no second copy of a header two servers
could read in two ways (smuggling), and the browser rules of SPEC 7 - so
that a request is read one way only.
"""
import email.utils
import hmac
import ipaddress
import socket

MAX_HEAD = 65536                 # request line and headers, bytes
MAX_HEADER_LINES = 100

REASONS = {100: 'Continue', 200: 'OK', 400: 'Bad Request', 401: 'Unauthorized', 403: 'Forbidden', 404: 'Not Found',
           408: 'Request Timeout', 411: 'Length Required',
           413: 'Content Too Large', 415: 'Unsupported Media Type', 431: 'Request Header Fields Too Large',
           500: 'Internal Server Error', 501: 'Not Implemented', 503: 'Service Unavailable',
           505: 'HTTP Version Not Supported'}


class Refusal(Exception):
    """A request answered with an HTTP error, after which the connection is closed."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


# Headers whose second copy would make two servers read one request in two ways (smuggling).
SINGLE_HEADERS = frozenset(('host', 'content-length', 'transfer-encoding', 'content-type', 'origin'))


def own_names(host):
    """The names of this server a Host header may give: ``localhost``, the configured host, and
    where other machines reach it, this machine's own names."""
    names = {'localhost', host.lower()}
    if host not in ('127.0.0.1', 'localhost', '::1'):
        names.update(name.lower() for name in (socket.gethostname(), socket.getfqdn()) if name)
    return names


def split_host(value):
    """``(name, port)`` of ``host:port``, ``[v6]:port`` or a bare name (port 80)."""
    if value.startswith('['):
        name, _, rest = value[1:].partition(']')
        port = rest[1:] if rest.startswith(':') else ''
    else:
        name, colon, port = value.rpartition(':')
        if not colon:
            name, port = value, ''
    if not port:
        return name, 80
    return name, int(port) if port.isdigit() and port.isascii() else -1


def head_end(data):
    """``(end, separator length)`` of the request head in ``data``, or None while it is not all
    there.  Raises Refusal when it is larger than ``MAX_HEAD``."""
    end = data.find(b'\r\n\r\n', 0, MAX_HEAD + 4)
    if end >= 0:
        return end, 4
    end = data.find(b'\n\n', 0, MAX_HEAD + 2)
    if end >= 0:
        return end, 2
    if len(data) > MAX_HEAD:
        raise Refusal(431, 'request line and headers larger than %d bytes' % MAX_HEAD)
    return None


def parse_head(data):
    """``(method, path, version, headers dict, keep_alive)`` of a request head.  Raises Refusal."""
    lines = bytes(data).decode('iso-8859-1').split('\n')
    request_line = lines[0].rstrip('\r')
    words = request_line.split()
    if len(words) != 3:
        raise Refusal(400, 'Bad request line %r' % request_line[:100])
    method, path, version = words
    if version not in ('HTTP/1.0', 'HTTP/1.1'):
        raise Refusal(505, 'HTTP version %r is not served' % version[:20])
    if len(lines) > MAX_HEADER_LINES + 3:
        raise Refusal(431, 'Too many headers')
    headers = {}
    for line in lines[1:]:
        line = line.rstrip('\r')
        if not line:
            continue
        name, colon, value = line.partition(':')
        if not colon or not name.strip():
            raise Refusal(400, 'Bad header line')
        name = name.strip().lower()
        if name in headers and name in SINGLE_HEADERS:
            raise Refusal(400, 'header %s given twice' % name)
        headers[name] = value.strip()
    connection = headers.get('connection', '').lower()
    keep_alive = connection != 'close' and (version == 'HTTP/1.1' or connection == 'keep-alive')
    return method, path, version, headers, keep_alive


def body_length(method, headers, max_request_size):
    """How many body bytes follow the head: 0 for a GET or HEAD, the Content-Length of a POST.
    Raises Refusal for any other method or framing."""
    if method in ('GET', 'HEAD'):
        if headers.get('content-length', '0') not in ('', '0') or 'transfer-encoding' in headers:
            raise Refusal(400, 'a GET has no body')
        return 0
    if method != 'POST':
        raise Refusal(501, 'Unsupported method (%r): XML-RPC is served by POST' % method[:20])
    if 'transfer-encoding' in headers:
        raise Refusal(400, 'Transfer-Encoding is not accepted; send a Content-Length')
    given = headers.get('content-length')
    if given is None:
        raise Refusal(411, 'a Content-Length is required')
    if not given.isdigit() or not given.isascii():
        raise Refusal(400, 'Content-Length %r is not a number of bytes' % given[:40])
    length = int(given)
    if length > max_request_size:
        raise Refusal(413, 'request larger than %d bytes' % max_request_size)
    if headers.get('content-encoding', 'identity').lower() != 'identity':
        raise Refusal(415, 'compressed requests are not accepted')
    return length


class BrowserRules:
    """Keep web pages of other sites out (SPEC 7): the Host, Origin, Content-Type and
    Sec-Fetch-Site a request must have for a server on ``host`` and ``port``."""

    def __init__(self, host, port):
        self.port = port
        self.own_names = own_names(host)

    def check(self, method, headers):
        """Keep web pages of other sites out (SPEC 7).  Raises Refusal.

        A page of another origin in the operator's browser can send a form or a ``fetch`` to
        loopback: such a POST cannot say ``Content-Type: text/xml`` without a CORS preflight,
        which is never granted, and it says where it comes from in ``Origin``.  DNS rebinding
        (a site's name that comes to point at 127.0.0.1) shows in the ``Host`` header."""
        host = headers.get('host')
        if host is not None and not self.is_own_host(host):
            raise Refusal(403, 'Host %r is not this server' % host[:100])
        origin = headers.get('origin')
        if origin is not None and not (origin.startswith('http://') and self.is_own_host(origin[7:])):
            raise Refusal(403, 'a request from the web page of another site (Origin %r) is refused' % origin[:100])
        if method == 'POST':
            content_type = headers.get('content-type', '').partition(';')[0].strip().lower()
            if content_type != 'text/xml':
                raise Refusal(415, 'an XML-RPC request says Content-Type: text/xml')
            if headers.get('sec-fetch-site', 'same-origin') not in ('same-origin', 'none'):
                raise Refusal(403, 'a request from the web page of another site is refused')

    def is_own_host(self, value):
        """True if ``value`` (a Host header, or an Origin without its scheme) names this server:
        an address, ``localhost`` or the configured host, with this server's port.  A name of
        another site is what DNS rebinding sends; an address cannot be rebound."""
        name, port = split_host(value.strip().lower())
        if port != self.port:
            return False
        if name in self.own_names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


class SecretRule:
    """The shared secret (SPEC 11): required from every client not on this machine (or from
    every client, ``require_secret = always``), as ``Authorization: Bearer <secret>``."""

    def __init__(self, secret, require='remote'):
        self.secret = secret.encode('utf-8')
        self.always = require == 'always'

    def admits(self, headers, address):
        """True when the request carries the secret (a web page cannot know it: the browser
        rules are for the others); False for a client that need not give it.  Raises Refusal."""
        given = headers.get('authorization', '')
        if self.secret and given[:7].lower() == 'bearer ':
            if hmac.compare_digest(given[7:].strip().encode('utf-8', 'replace'), self.secret):
                return True
            raise Refusal(401, 'the shared secret is wrong (the client\'s [jobqueue] secret is not the server\'s)')
        if self.always or not is_loopback(address):
            raise Refusal(401, 'a client %s gives the shared secret ([jobqueue] secret%s)'
                          % ('of this server' if self.always else 'on another machine',
                             '' if self.secret else ', which this server has not set: it takes no client '
                                                    'of another machine'))
        return False


def is_loopback(address):
    try:
        ip = ipaddress.ip_address(address.split('%')[0])
    except ValueError:
        return False
    return ip.is_loopback or bool(getattr(ip, 'ipv4_mapped', None) and ip.ipv4_mapped.is_loopback)


# Every page answer: no guessing of types, no framing by other sites, scripts only from the server.
PAGE_HEADERS = ('X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nCache-Control: no-store\r\n'
                "Content-Security-Policy: default-src 'self'; style-src 'self' 'unsafe-inline'\r\n")


def http_answer(code, body, content_type='text/xml', close=False, extra='', length=None):
    head = ('HTTP/1.1 %d %s\r\nServer: bots-jobqueueserver\r\nDate: %s\r\nContent-Type: %s\r\n'
            'Content-Length: %d\r\n%s%s\r\n' % (code, REASONS.get(code, ''), email.utils.formatdate(usegmt=True),
                                                 content_type, len(body) if length is None else length, extra,
                                                 'Connection: close\r\n' if close else ''))
    return head.encode('ascii') + body
