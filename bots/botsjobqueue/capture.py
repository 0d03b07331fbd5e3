"""Keeps each job's output, bounded, in a process of its own.

The server starts one keeper and hands it the reading end of each job's
output pipe over a socket (SCM_RIGHTS), with the file the output belongs in.
The keeper holds at most ``limit`` bytes per job - half from the start of its
output, half from its end, with a line saying how much was left out between -
and writes them to the file when the job (and every child holding its
output) has closed the pipe; then it says so on the socket (``!`` and the
reason first, when the file could not be written).  Because the
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
import time

CHUNK = 65536
LIVE_EVERY = 1.0       # seconds between two snapshots of a running job's output (``<file>.live``)
LIVE_SIZE = 4096       # bytes of its end in a snapshot


class Kept:
    """The start and the end of an output, ``limit`` bytes in all."""

    def __init__(self, limit):
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.shown = 0         # when the last snapshot was written (time.monotonic)
        self.changed = False

    def add(self, chunk):
        self.changed = True
        self.total += len(chunk)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        if len(self.tail) > self.tail_limit:
            del self.tail[:len(self.tail) - self.tail_limit]

    def end(self, size):
        """The last ``size`` bytes seen (for a snapshot while the job runs)."""
        data = self.tail if len(self.tail) >= size or self.total > len(self.head) + len(self.tail) \
            else self.head + self.tail
        return bytes(data[-size:])

    def value(self):
        left_out = self.total - len(self.head) - len(self.tail)
        if left_out <= 0:
            return bytes(self.head + self.tail)
        return bytes(self.head) + (b'\n[... %d bytes of output left out ...]\n' % left_out) + bytes(self.tail)


def write_file(path, data):
    """Write ``data`` to ``path`` whole: readers see the file only when it is complete."""
    part = path + '.part'
    with open(part, 'wb') as handle:
        handle.write(data)
    os.replace(part, path)


def snapshot(path, kept, now):
    """Write what a running job printed last, for the status page (no word when it cannot)."""
    kept.shown, kept.changed = now, False
    try:
        write_file(path + '.live', kept.end(LIVE_SIZE))
    except OSError:
        pass


TAKEN_OVER = b'\n[... the output keeper was restarted here: output before this line may be missing ...]\n'


def take_over(path, limit):
    """What is kept of a job whose keeper died: the end it had shown (its snapshot), and a line
    that says output may be missing - when it had read anything at all."""
    kept = Kept(limit)
    try:
        with open(path + '.live', 'rb') as handle:
            kept.add(handle.read() + TAKEN_OVER)
    except OSError:
        pass                      # it had read nothing: nothing is missing
    return kept


def serve(control, limit):
    """Keep the outputs handed over on ``control`` until it is closed and every pipe has ended."""
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, None)
    pipes = {}                      # fd -> (path, Kept)
    control_open = True
    while control_open or pipes:
        waiting = [kept for _, kept in pipes.values() if kept.changed]
        if waiting:              # what arrived since the last snapshot shows within a second
            now = time.monotonic()
            for path, kept in pipes.values():
                if kept.changed and now - kept.shown >= LIVE_EVERY:
                    snapshot(path, kept, now)
        for key, _ in selector.select(LIVE_EVERY if waiting else None):
            if key.data is None:
                try:
                    message, fds, _, _ = socket.recv_fds(control, 4096, 1)
                except OSError:
                    message, fds = b'', []
                if not message:
                    selector.unregister(control)
                    control_open = False
                    continue
                taken_over = message.startswith(b'+')      # from a keeper that died: see take_over()
                path = message[1:] if taken_over else message
                path = path.decode('utf-8', 'surrogateescape')
                pipes[fds[0]] = (path, take_over(path, limit) if taken_over else Kept(limit))
                selector.register(fds[0], selectors.EVENT_READ, True)
                continue
            path, kept = pipes[key.fd]
            try:
                chunk = os.read(key.fd, CHUNK)
            except OSError:
                chunk = b''
            if chunk:
                kept.add(chunk)
                now = time.monotonic()
                if now - kept.shown >= LIVE_EVERY:
                    snapshot(path, kept, now)
                continue
            selector.unregister(key.fd)
            os.close(key.fd)
            del pipes[key.fd]
            answer = path.encode('utf-8', 'surrogateescape')
            try:
                os.remove(path + '.live')
            except OSError:
                pass
            try:
                write_file(path, kept.value())
            except OSError as exc:
                answer = b'!%s\0%s' % (str(exc).encode('utf-8', 'replace')[:1000], answer)
            if control_open:
                try:
                    control.send(answer)
                except OSError:
                    pass


def relay(source_fd, target_fd, limit):
    """One job's output from ``source_fd``, bounded as in ``Kept``, to ``target_fd``."""
    kept = Kept(limit)
    while True:
        chunk = os.read(source_fd, CHUNK)
        if not chunk:
            break
        kept.add(chunk)
    view = memoryview(kept.value())
    while view:
        view = view[os.write(target_fd, view):]


if __name__ == '__main__':
    if sys.argv[1] == '--serve':
        serve(socket.socket(fileno=int(sys.argv[2])), int(sys.argv[3]))
    else:
        relay(0, 1, int(sys.argv[1]))
