"""Timers: call a function when its time comes, from one thread for many timers.

Used for a job's maxruntime and the kill after it, for a job queued again
later (the engine found its database locked), and for the scheduler's
wake-ups.  A thread per timer would cost every dispatch its start and
cancel; the stdlib's ``sched`` blocks the thread that runs it and cancels in
O(n).  Times are on the monotonic clock, so a step of the wall clock moves
none of them (the scheduler turns its wall-clock times into delays itself).
The HTTP front's request deadlines are not timers: only its loop may touch a
connection, and as every deadline is ``request_timeout`` long, connections
kept in the order of their deadlines give the next one due without a heap
(see ``rpcserver.py``).

A heap of ``[due, sequence, function, args, live]`` as in ``sched``: the
sequence keeps equal times in the order they were set, a cancelled timer
stays in the heap, marked, and is skipped when it comes up.  Each ``Timers``
has its own thread (started at the first ``add``): a slow call delays only
the timers of its own kind.
"""
import heapq
import itertools
import sys
import threading
import time


class Timer(list):
    """One timer: ``[due, sequence, function, args, live]``; ``cancel()`` stops it."""

    __slots__ = ()

    def cancel(self):
        self[4] = False


class Timers:
    """Timers served by one thread, named ``name``; a call that raises is logged to ``logger``
    in full (without one: printed to stderr) and the others go on."""

    def __init__(self, name='timers', logger=None):
        self.name = name
        self.logger = logger
        self._heap = []
        self._changed = threading.Condition()
        self._sequence = itertools.count()
        self._thread = None
        self._closed = False

    def add(self, seconds, function, *args):
        """Call ``function(*args)`` in ``seconds`` (at once when 0 or less); return its Timer."""
        timer = Timer((time.monotonic() + seconds, next(self._sequence), function, args, True))
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, timer)
            if self._heap[0] is timer:
                self._changed.notify()
        return timer

    def close(self, wait=0):
        """Fire nothing more; the thread ends (a call under way first: waited for up to ``wait`` s)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(wait)

    def _loop(self):
        while True:
            with self._changed:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._changed.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                timer = heapq.heappop(self._heap)
            if timer[4]:
                try:
                    timer[2](*timer[3])
                except Exception:          # one failing call must not stop every other timer
                    if self.logger is None:
                        sys.excepthook(*sys.exc_info())
                    else:
                        self.logger.exception('Unexpected error in a timer (%s)', self.name)
