"""Keeps a job's output: reads it from a pipe and writes a bounded file.

Started by the server beside each job, in a session of its own, with the
job's stdout and stderr as its standard input.  Because this process (not the
server) holds the reading end, a job whose server dies keeps writing without
a broken pipe and without blocking.  The file holds the first half of the
limit as it comes; past that only the newest bytes are kept in memory and
written at the end, after a line that says how much was left out.

Usage: python capture.py <file> <limit-in-bytes>
"""
import os
import sys

CHUNK = 65536


def capture(source_fd, path, limit):
    head_room = limit // 2
    tail_room = limit - head_room
    tail = bytearray()
    dropped = 0
    with open(path, 'wb', buffering=0) as out:
        while True:
            chunk = os.read(source_fd, CHUNK)
            if not chunk:
                break
            if head_room:
                part = chunk[:head_room]
                out.write(part)
                head_room -= len(part)
                chunk = chunk[len(part):]
            if chunk:
                tail += chunk
                if len(tail) > tail_room:
                    dropped += len(tail) - tail_room
                    del tail[:len(tail) - tail_room]
        if dropped:
            out.write(b'\n[... %d bytes of output left out ...]\n' % dropped)
        out.write(bytes(tail))


if __name__ == '__main__':
    capture(0, sys.argv[1], int(sys.argv[2]))
