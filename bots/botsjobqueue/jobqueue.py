"""The queue of waiting jobs.

Lower priority numbers mean more urgent (1 before 9); within a priority the
lower job number goes first, so the order is total and first come, first
served.  Waiting jobs sit in a heap of ``(priority, jobnumber)``; a dict from
task to job answers the duplicate check.  Adding, the duplicate check and
taking the next job do not grow with the length of the queue.

A priority change pushes a fresh heap entry; the stale one is skipped when it
comes up.  Every change goes to the store inside the same lock, so the stored
order is the acknowledged order.

At some 430 lines the module holds everything that the queue's one lock
guards: the heap, the duplicate index, the delayed jobs and, on a shared
store, the changes of the other servers.
"""
import heapq
import sys
import threading
import time

from .codes import ADDED, DUPLICATE
from .store import Gone, StoreBusy, patiently
from .timers import Timers


class Job:
    """A job: what to run (``task``, an argv tuple), how urgent, and its number."""

    __slots__ = ('jobnumber', 'priority', 'task', 'requeued', 'locked')

    def __init__(self, jobnumber, priority, task, requeued=0, locked=0):
        self.jobnumber = jobnumber
        self.priority = priority
        self.task = task
        self.requeued = requeued
        self.locked = locked

    def as_list(self):
        """``[priority, jobnumber, task]``, the form ``listjobs`` answers with."""
        return [self.priority, self.jobnumber, list(self.task)]


class QueueFull(Exception):
    """The waiting jobs' tasks take ``max_queue_bytes`` already: nothing more is added."""


def task_size(task):
    """The bytes a task takes as a command line: its arguments in UTF-8, each with its end."""
    return sum(len(arg.encode('utf-8', 'surrogatepass')) + 1 for arg in task)


def canonical_task(task):
    """The task as a tuple of interned strings: hashable, and cheap to keep 100,000 of."""
    return tuple(map(sys.intern, task))


class JobQueue:
    """Waiting jobs, backed by a store.  All public methods are thread-safe."""

    def __init__(self, store, max_bytes=None, timers=None):
        self._store = store
        self._timers = timers or Timers('delayed-jobs')   # for jobs queued again later
        self.max_bytes = max_bytes  # bound of the waiting jobs' task bytes together (None: no bound)
        self._bytes = 0             # their task bytes now
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._heap = []          # (priority, jobnumber); may hold stale entries
        self._waiting = {}       # jobnumber -> Job, for jobs in the heap
        self._delayed = {}       # jobnumber -> (Job, timers.Timer, when it waits again as wall time)
        self._by_task = {}       # task -> Job, waiting or delayed
        self.paused = False      # set by an operator: take() hands out nothing, add() goes on
        self.leading = True      # a shared store's standby hands out nothing either (cluster.py)
        self._shared = getattr(store, 'shared', False)     # the store decides what is queued (dbstore.py)
        self._closed = False

    # ---- start-up
    def restore(self, jobs):
        """Put jobs read back from the store into the queue, without storing them again.

        ``jobs``: ``(job, not_before)`` pairs; ``not_before`` is None, or when a delayed job
        may wait again.  Returns how many jobs were restored.
        """
        count = 0
        with self._lock:
            for job, not_before in jobs:
                count += 1
                self._insert(job, not_before, bulk=True)
            heapq.heapify(self._heap)
            self._changed.notify_all()
        return count

    # ---- the Bots interface
    def add(self, task, priority):
        """Add a job; return ``(code, jobnumber, previous)`` with code ADDED or DUPLICATE, and the
        previous priority of a waiting duplicate whose priority changed (else None).  Raises
        QueueFull when its task would pass ``max_bytes``."""
        task = canonical_task(task)
        if self._shared:
            return self._add_shared(task, priority)
        with self._lock:
            job = self._by_task.get(task)
            if job is not None:
                if job.priority == priority:
                    return DUPLICATE, job.jobnumber, None
                self._store.set_priority(job.jobnumber, priority)
                previous, job.priority = job.priority, priority
                if job.jobnumber in self._waiting:
                    heapq.heappush(self._heap, (priority, job.jobnumber))
                    self._compact_if_stale()
                    self._changed.notify()
                return ADDED, job.jobnumber, previous
            size = task_size(task)
            if self.max_bytes is not None and self._bytes + size > self.max_bytes:
                raise QueueFull()
            jobnumber = self._store.add(priority, list(task))
            job = Job(jobnumber, priority, task)
            self._by_task[task] = job
            self._bytes += size
            self._waiting[jobnumber] = job
            heapq.heappush(self._heap, (priority, jobnumber))
            self._changed.notify()
            return ADDED, jobnumber, None

    def _add_shared(self, task, priority):
        """``add`` where the database decides, for every server of the environment at once."""
        with self._lock:
            if task not in self._by_task and self.max_bytes is not None and \
                    self._bytes + task_size(task) > self.max_bytes:
                raise QueueFull()
            added, jobnumber, previous = self._store.admit(priority, list(task))
            if not added:
                return DUPLICATE, jobnumber, None
            self._forget(jobnumber)
            other = self._by_task.get(task)
            if other is not None:           # a copy this server had not yet seen go
                self._forget(other.jobnumber)
            self._insert(Job(jobnumber, priority, task))
            return ADDED, jobnumber, previous

    def follow(self, changes, rows, own):
        """Apply the changes other servers made to a shared store (``cluster.Follower``): each job
        named is taken as its row is now (``rows``; gone when absent)."""
        with self._lock:
            for jobnumber, kind, origin in changes:
                if origin == own:
                    continue               # done here already
                if kind == 'clear':
                    for number in [n for n in list(self._waiting) + list(self._delayed) if n <= jobnumber]:
                        self._forget(number)
                elif kind != 'pause':
                    self._forget(jobnumber)
                    row = rows.get(jobnumber)
                    if row is not None and row.state != 'running':
                        job = Job(row.jobnumber, row.priority, canonical_task(row.task), row.requeued, row.locked)
                        other = self._by_task.get(job.task)
                        if other is not None:
                            self._forget(other.jobnumber)
                        self._insert(job, row.not_before if row.state == 'delayed' else None)
            self._compact_if_stale()

    def reload(self, stored):
        """Replace the whole queue by the waiting jobs of ``stored`` (a shared store read afresh)."""
        with self._lock:
            for number in list(self._waiting) + list(self._delayed):
                self._forget(number)
            for row in stored:
                if row.state != 'running':
                    self._insert(Job(row.jobnumber, row.priority, canonical_task(row.task), row.requeued, row.locked),
                                 row.not_before if row.state == 'delayed' else None)

    def lead(self, leading):
        """A shared store's leader hands out jobs (True); a standby does not (False)."""
        with self._lock:
            self.leading = leading
            self._changed.notify_all()

    def waiting(self):
        """The waiting jobs in launch order (delayed ones last, by job number)."""
        with self._lock:
            jobs = sorted(self._waiting.values(), key=lambda job: (job.priority, job.jobnumber))
            jobs.extend(entry[0] for entry in sorted(self._delayed.values(), key=lambda d: d[0].jobnumber))
            return jobs

    def first(self, count):
        """The first ``count`` waiting jobs in launch order (cheap for a long queue)."""
        with self._lock:
            live = (entry for entry in heapq.nsmallest(count + len(self._heap) - len(self._waiting), self._heap)
                    if self._is_live(entry))
            jobs = [self._waiting[entry[1]] for entry in live][:count]
            if len(jobs) < count:
                jobs.extend(entry[0] for entry in sorted(self._delayed.values(), key=lambda d: d[0].jobnumber))
            return jobs[:count]

    def retry_times(self):
        """When each delayed job waits again: ``{jobnumber: time}``."""
        with self._lock:
            return {jobnumber: retry_at for jobnumber, (_, _, retry_at) in self._delayed.items()}

    def get(self, jobnumber):
        """The waiting (or delayed) job with this number, or None."""
        with self._lock:
            job = self._waiting.get(jobnumber)
            if job is None and jobnumber in self._delayed:
                job = self._delayed[jobnumber][0]
            return job

    def clear(self):
        """Remove every waiting job; return how many were removed."""
        with self._lock:
            count = len(self._by_task)
            if self._shared:
                count = self._store.clear()[0]
            else:
                self._store.remove_waiting()
            for _, timer, _ in self._delayed.values():
                timer.cancel()
            self._heap.clear()
            self._waiting.clear()
            self._delayed.clear()
            self._by_task.clear()
            self._bytes = 0
            return count

    def remove(self, jobnumber):
        """Remove one waiting job; return it, or None when no such job waits."""
        with self._lock:
            if self._shared:
                found = self._store.drop(jobnumber)
                job = self._forget(jobnumber)
                if found is None:
                    return None
                return job or Job(jobnumber, found[0], canonical_task(found[1]))
            job = self._waiting.pop(jobnumber, None)
            if job is None and jobnumber in self._delayed:
                job, timer, _ = self._delayed.pop(jobnumber)
                timer.cancel()
            if job is None:
                return None
            self._store.remove(jobnumber)
            del self._by_task[job.task]
            self._bytes -= task_size(job.task)
            self._compact_if_stale()
            return job

    def size(self):
        """The task bytes of the waiting jobs together."""
        with self._lock:
            return self._bytes

    def __len__(self):
        with self._lock:
            return len(self._by_task)

    # ---- for the runners
    def take(self, block=True, done=None, runner=None, taken=None, claim=True):
        """The next job, marked running.  Blocks until there is one, or returns None at once
        when ``block`` is false and there is none.  None once closed.

        ``done``: a job that has just ended (``job``, ``started``, ``ended``, ``exitcode``,
        ``status``); it moves to the history in the same transaction that marks the next one
        running (one commit between two jobs, not two).
        ``claim``: false when the caller stores the job as running itself, after its start
        (``Store.claim``, with ``done``): the job leaves only the queue's memory here, and
        ``done`` is recorded here only when no job is handed out.
        ``runner``: the number of the runner that takes it, stored with it.
        ``taken``: called with the job before the lock is let go, so that whoever asks where a
        job is finds it here or with the runner, never in neither (``jobstates``).
        When the store fails, the job stays first in the queue and the error is raised.
        """
        with self._lock:
            while True:
                if not self._closed and not self.paused and self.leading:
                    job = self._pop()
                    if job is not None and not claim:
                        if taken is not None:
                            taken(job)
                        return job
                    if job is not None:
                        try:
                            self._store.set_running(job.jobnumber, done, runner)
                        except Gone:
                            done = None            # recorded all the same; the job went elsewhere
                            continue
                        except BaseException:
                            # Not marked running: it is still the next job to take (no runner is woken
                            # for it: the store failed just now).
                            self._waiting[job.jobnumber] = job
                            self._by_task[job.task] = job
                            self._bytes += task_size(job.task)
                            heapq.heappush(self._heap, (job.priority, job.jobnumber))
                            raise
                        if taken is not None:
                            taken(job)
                        return job
                if done is not None:
                    self._store.finish_ended(done)
                    done = None
                if self._closed or not block:
                    return None
                self._changed.wait()

    def give_back(self, job):
        """A job taken with ``claim=False`` that did not start: first in the queue again, as if it
        had never been taken (unless the same task was queued meanwhile: then that one waits)."""
        with self._lock:
            if job.task in self._by_task:
                try:
                    self._store.remove(job.jobnumber)
                except Exception:        # the store fails: its row waits on, and is queued at the next start
                    pass
            else:
                self._insert(job)

    def wait_again(self, job, delay=0):
        """Put a job that did not get to run (or must run again) back in the queue."""
        with self._lock:
            other = self._by_task.get(job.task)
            if other is not None:
                # The same task was queued meanwhile: one waiting copy is enough.
                self._store.remove(job.jobnumber)
                return other
            self._by_task[job.task] = job
            self._bytes += task_size(job.task)
            # Rare (a shutdown, a locked engine database): worth a short wait for a busy store.
            try:
                stored = patiently(self._store.wait_again, job.jobnumber, time.time() + delay if delay > 0 else None,
                                   job.requeued, job.locked, patience=5)
            except BaseException:
                self._unindex(job)          # not queued: a call again must not take it for its own copy
                raise
            if stored is False:
                # A shared store's job that another server runs now (this one lost the lease), or a
                # task that waits there already: not to be kept here.
                self._unindex(job)
                return job
            if delay > 0:
                self._delay(job, delay)
            else:
                self._waiting[job.jobnumber] = job
                heapq.heappush(self._heap, (job.priority, job.jobnumber))
                self._changed.notify()
            return job

    def pause(self, paused):
        """Pause (True) or resume (False) handing out jobs; running jobs are not touched."""
        with self._lock:
            self.paused = paused
            self._changed.notify_all()

    def close(self):
        """Wake every runner; take() returns None from now on.  Waiting jobs stay stored."""
        with self._lock:
            self._closed = True
            for _, timer, _ in self._delayed.values():
                timer.cancel()
            self._changed.notify_all()

    # ---- internals, called with the lock held
    def _insert(self, job, not_before=None, bulk=False):
        """Queue a job here: waiting, or delayed until ``not_before``.  ``bulk`` (the start-up):
        the heap is made whole afterwards, and the runners woken, by the caller."""
        self._by_task[job.task] = job
        self._bytes += task_size(job.task)
        if not_before is not None and not_before > time.time():
            self._delay(job, not_before - time.time())
        elif bulk:
            self._waiting[job.jobnumber] = job
            self._heap.append((job.priority, job.jobnumber))
        else:
            self._waiting[job.jobnumber] = job
            heapq.heappush(self._heap, (job.priority, job.jobnumber))
            self._changed.notify()

    def _unindex(self, job):
        """Take a job out of the duplicate index and the byte count."""
        if self._by_task.get(job.task) is job:
            del self._by_task[job.task]
        self._bytes -= task_size(job.task)

    def _forget(self, jobnumber):
        """Drop a job from the queue here (not from the store); the job, or None."""
        job = self._waiting.pop(jobnumber, None)
        if job is None and jobnumber in self._delayed:
            job, timer, _ = self._delayed.pop(jobnumber)
            timer.cancel()
        if job is not None:
            self._unindex(job)
        return job

    def _is_live(self, entry):
        job = self._waiting.get(entry[1])
        return job is not None and job.priority == entry[0]

    def _pop(self):
        heap = self._heap
        while heap:
            entry = heapq.heappop(heap)
            if self._is_live(entry):
                job = self._waiting.pop(entry[1])
                del self._by_task[job.task]
                self._bytes -= task_size(job.task)
                return job
        return None

    def _compact_if_stale(self):
        if len(self._heap) > 2 * len(self._waiting) + 64:
            self._heap = [(job.priority, job.jobnumber) for job in self._waiting.values()]
            heapq.heapify(self._heap)

    def _delay(self, job, seconds):
        timer = self._timers.add(seconds, self._undelay, job.jobnumber)
        self._delayed[job.jobnumber] = (job, timer, time.time() + seconds)

    def _undelay(self, jobnumber):
        with self._lock:
            entry = self._delayed.pop(jobnumber, None)
            if entry is None or self._closed:
                return
            job = entry[0]
            try:
                stored = self._store.wait_again(job.jobnumber, None, job.requeued, job.locked)
            except StoreBusy:                 # another process holds the store: a moment later
                self._delay(job, 0.2)
                return
            if stored is False:               # a shared store's copy of a task that waits already
                self._unindex(job)
                return
            self._waiting[jobnumber] = job
            heapq.heappush(self._heap, (job.priority, jobnumber))
            self._changed.notify()
