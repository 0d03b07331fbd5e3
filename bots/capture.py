"""Keeps the last bytes of a job's output: ``tail -c <limit>`` for where there is no tail.

Started by the server beside each job, in a session of its own, with the
job's stdout and stderr as its standard input and the output file as its
standard output.  Because this process (not the server) holds the reading
end, a job whose server dies keeps writing without a broken pipe and without
blocking.  Memory stays within the limit whatever the job writes.

Usage: python capture.py <limit-in-bytes>
"""
import os
import sys

CHUNK = 65536


def capture(source_fd, target_fd, limit):
    tail = bytearray()
    while True:
        chunk = os.read(source_fd, CHUNK)
        if not chunk:
            break
        tail += chunk
        if len(tail) > limit:
            del tail[:len(tail) - limit]
    view = memoryview(tail)
    while view:
        view = view[os.write(target_fd, view):]


if __name__ == '__main__':
    capture(0, 1, int(sys.argv[1]))
