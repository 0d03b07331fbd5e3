"""Signals, caught in one place for each program.

A handler only records what the signal asks for (``stop``, ``reload``); the
main thread acts on it.  The main thread waits on a socket that the signal
module writes to (``signal.set_wakeup_fd``): a signal that the operating
system delivers to another thread does not interrupt a wait of the main
thread, so waiting on a lock or a queue could miss it.
"""
import collections
import select
import signal
import socket
import time


class Signals:
    """What the signals (and other threads, through ``put``) ask the main thread to do, in order."""

    def __init__(self, actions):
        self._asked = collections.deque()
        self._wakeup, self._waker = socket.socketpair()
        for end in (self._wakeup, self._waker):
            end.setblocking(False)
        signal.set_wakeup_fd(self._waker.fileno(), warn_on_full_buffer=False)
        for name, action in actions.items():
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), lambda signum, frame, action=action: self._asked.append(action))

    def put(self, action):
        """Ask for ``action`` from another thread."""
        self._asked.append(action)
        try:
            self._waker.send(b'\0')
        except OSError:          # the socket is full: the main thread is awake anyway
            pass

    def next(self, timeout=None):
        """Block until something is asked for (at most ``timeout`` seconds); return it, or None."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._asked:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            select.select([self._wakeup], [], [], left)
            try:
                while self._wakeup.recv(4096):
                    pass
            except OSError:
                pass
        return self._asked.popleft()
