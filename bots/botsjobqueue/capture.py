"""Keeps the last bytes of each job's output, in a process of its own.

The server starts one keeper and hands it the reading end of each job's
output pipe over a socket (SCM_RIGHTS), with the file the output belongs in.
The keeper holds at most ``limit`` bytes per job - the end of its output -
and writes them to the file when the job (and every child holding its
output) has closed the pipe; then it says so on the socket.  Because the
keeper, not the server, reads the pipes, and lives in a session of its own, a
job whose server is killed neither gets a broken pipe nor blocks: the keeper
drains what is left and ends when the server is gone and no pipe is open.

Where file descriptors cannot be passed (Windows), one keeper runs per job
instead, reading its standard input and writing its standard output.

Usage: python capture.py --serve <socket-fd> <limit>   |   python capture.py <limit>
"""
import os
import selectors
import socket
import sys

CHUNK = 65536


def keep_tail(tail, chunk, limit):
    tail += chunk
    if len(tail) > limit:
        del tail[:len(tail) - limit]


def write_file(path, data):
    """Write ``data`` to ``path`` whole: readers see the file only when it is complete."""
    part = path + '.part'
    with open(part, 'wb') as handle:
        handle.write(data)
    os.replace(part, path)


def serve(control, limit):
    """Keep the outputs handed over on ``control`` until it is closed and every pipe has ended."""
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, None)
    pipes = {}                      # fd -> (path, bytearray with the end of the output)
    control_open = True
    while control_open or pipes:
        for key, _ in selector.select():
            if key.data is None:
                try:
                    message, fds, _, _ = socket.recv_fds(control, 4096, 1)
                except OSError:
                    message, fds = b'', []
                if not message:
                    selector.unregister(control)
                    control_open = False
                    continue
                pipes[fds[0]] = (message.decode('utf-8', 'surrogateescape'), bytearray())
                selector.register(fds[0], selectors.EVENT_READ, True)
                continue
            path, tail = pipes[key.fd]
            try:
                chunk = os.read(key.fd, CHUNK)
            except OSError:
                chunk = b''
            if chunk:
                keep_tail(tail, chunk, limit)
                continue
            selector.unregister(key.fd)
            os.close(key.fd)
            del pipes[key.fd]
            try:
                write_file(path, tail)
            except OSError:
                pass
            if control_open:
                try:
                    control.send(path.encode('utf-8', 'surrogateescape'))
                except OSError:
                    pass


def relay(source_fd, target_fd, limit):
    """One job's output from ``source_fd``: its last ``limit`` bytes to ``target_fd``."""
    tail = bytearray()
    while True:
        chunk = os.read(source_fd, CHUNK)
        if not chunk:
            break
        keep_tail(tail, chunk, limit)
    view = memoryview(tail)
    while view:
        view = view[os.write(target_fd, view):]


if __name__ == '__main__':
    if sys.argv[1] == '--serve':
        serve(socket.socket(fileno=int(sys.argv[2])), int(sys.argv[3]))
    else:
        relay(0, 1, int(sys.argv[1]))
