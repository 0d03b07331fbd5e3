"""One XML-RPC call to the job queue server, with a timeout (the standard
library's ServerProxy has none, and a stuck server must not hang a client)."""
import http.client
import xmlrpc.client

ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.Error, ValueError, IndexError)


def call(port, method, *params, timeout=10, host='127.0.0.1'):
    """The server's answer to ``method(*params)``; raises one of ERRORS on any failure."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        body = xmlrpc.client.dumps(params, method, allow_none=True).encode('utf-8')
        connection.request('POST', '/RPC2', body, {'Content-Type': 'text/xml'})
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise xmlrpc.client.ProtocolError(host, response.status, response.reason, {})
        return xmlrpc.client.loads(answer)[0][0]
    finally:
        connection.close()
