"""More than one server on one shared store: who leads, and how every server keeps up.

Every server of an environment stores the jobs it is given (``dbstore.py``); one of them, the
leader, launches them and fires the schedules.  The others stand by, follow the queue, and one
of them takes over when the leader is lost.

**The lease.**  Leadership is a row in the database, ``jobqueue_lease``: a holder, a term
(counted up at each change of leader) and an expiry on the database server's clock.  The leader
renews it every ``lease_ttl / 5`` seconds; a standby takes it only once it expired
``lease_margin`` seconds ago by that same clock.  A session lock (``pg_try_advisory_lock``,
``GET_LOCK``) would be simpler, but it is held as long as the database believes the session
alive: a frozen leader keeps it for ever, a cut-off one for as long as TCP takes to give up.
A lease ends on time whatever the leader does.

**The fence: at most one engine at any instant.**  Bots' engine checks no token, so the old
leader's job must have ended before a new leader can start one.  The leader never starts a
job itself: its fence (``fence.py``), a process of its own, does.  After every renewal the
leader tells the fence until when its lease surely holds, measured on the machine's monotonic
clock from the moment the renewal was *sent* (the database set the expiry later than that):

    sent + lease_ttl * (1 - DRIFT) - SAFETY   SIGKILL to the jobs' process groups
    ...minus fence_grace                      SIGTERM, and no job starts any more

A standby may start a job only after ``expires + lease_margin`` by the database's clock, which
in real time is at least ``sent + lease_ttl + lease_margin``.  So between the fence's SIGKILL and
the first possible start of another leader lie at least ``SAFETY + lease_margin`` seconds plus
``lease_ttl * DRIFT``, whatever the old leader does: it may be killed, frozen, cut off from the
database, or stuck in a call - its fence keeps the time.  The server's handle on the fence keeps
the same two moments on timers of its own (``fence.Fence``), so a fence that is stopped while its
server runs does not let a job outlive the lease either.

Assumed: the clocks of the machines and of the database server run at the same rate within
``DRIFT`` (1 %, a hundred times what a quartz clock strays) - they need not show the same time;
the database server's wall clock is not stepped forward by more than ``lease_margin`` (NTP
slews it); a process killed with SIGKILL ends within ``SAFETY + lease_margin`` seconds (not in
an uninterruptible wait on a dead disk); the leader's machine does not freeze as a whole (a
suspended virtual machine stops the fence's clock with it); the database keeps what it
committed.  The worst case is a late run, never two: after the leader's loss the next job waits
up to ``lease_ttl + lease_margin`` seconds plus one look of the standby (``lease_ttl / 5``), and
the job the old leader ran is queued again (``requeued`` counts it) - it runs again from the
start.

**Following.**  Every change to the queue leaves a numbered row in ``jobqueue_change``; each
server reads the rows after the last one it saw every ``FOLLOW_EVERY`` seconds and brings its
copy of the queue up to date (``JobQueue.follow``).  The leader therefore starts a job added at
another server within that time; a job that another server removed meanwhile is never started
(the leader's take checks the row).
"""
import socket
import threading
import time

from . import botslog
from .dbstore import ChangesLost

DRIFT = 0.01          # the clocks' rates may differ by this much
SAFETY = 0.5          # seconds between the fence's SIGKILL and the lease's expiry, besides DRIFT
FOLLOW_EVERY = 0.1    # seconds between two looks at the change rows


class ClusterSettings:
    """The lease's times, from ``[jobqueue]``."""

    def __init__(self, ini):
        self.lease_ttl = max(3.0, ini.getfloat('jobqueue', 'lease_ttl', 20))
        self.lease_margin = max(0.5, ini.getfloat('jobqueue', 'lease_margin', 2))
        self.fence_grace = min(max(0.0, ini.getfloat('jobqueue', 'fence_grace', 2)), self.lease_ttl / 3)


class Leadership:
    """Holds, renews or waits for the lease; tells the fence, the queue and the scheduler."""

    def __init__(self, store, settings, fence, logger, address):
        self.store = store
        self.settings = settings
        self.fence = fence
        self.logger = logger
        self.address = address
        self.term = None              # our term while we lead
        self.since = None             # when we became leader (wall time)
        self.valid_until = 0.0        # monotonic: the fence's SIGTERM moment
        self.on_lead = []             # called when we become leader
        self.on_lose = []             # called when we stop leading
        self.on_held = []             # called after each renewal (the lease holds on)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='lease', daemon=True)
        self._trouble = False

    @property
    def leading(self):
        return self.term is not None and time.monotonic() < self.valid_until

    def start(self):
        self._thread.start()

    def stop(self):
        """Stop renewing; give the lease up (our jobs are stopped already), so a standby takes over now."""
        self._stop.set()
        self._thread.join(10)
        if self.term is not None:
            try:
                self.store.release(self.term)
            except OSError as exc:
                self.logger.warning('The lease could not be given up (%s); a standby takes over when it expires.',
                                    exc)
            self.term = None

    def _run(self):
        every = self.settings.lease_ttl / 5
        while not self._stop.is_set():
            pause = every
            try:
                if self.term is None:
                    pause = self._try_to_lead(every)
                else:
                    self._renew()
                self.store.seen(self.address)
                if self._trouble:
                    self._trouble = False
                    self.logger.log(25, 'The database answers again.')
            except OSError as exc:
                if not self._trouble:
                    self._trouble = True
                    self.logger.error('The lease cannot be read or renewed: %s', exc)
                pause = min(every, 1.0)
            if self.term is not None and time.monotonic() >= self.valid_until:
                self._lose('its lease could not be renewed in time')
            self._stop.wait(pause)

    def _try_to_lead(self, every):
        sent = time.monotonic()
        settings = self.settings
        term = self.store.acquire(settings.lease_ttl, settings.lease_margin)
        if term is None:
            lease = self.store.lease()
            # Look again just after it can be taken, or at the usual pace.
            return max(0.05, min(every, lease['expires'] + settings.lease_margin - lease['now'] + 0.05))
        self._held(sent)
        self.term = term
        self.since = time.time()
        self.logger.log(botslog.STARTINFO, 'This server leads now (term %d): it starts the jobs and fires the '
                        'schedules.', term)
        try:
            for call in self.on_lead:
                call()
        except OSError as exc:
            self._lose('the queue could not be read: %s' % exc)
            self.store.release(term)
        return every

    def _renew(self):
        sent = time.monotonic()
        if self.store.renew(self.term, self.settings.lease_ttl):
            self._held(sent)
            for call in self.on_held:
                call()
        else:
            self._lose('another server holds the lease')

    def _held(self, sent):
        settings = self.settings
        kill_at = sent + settings.lease_ttl * (1 - DRIFT) - SAFETY
        term_at = kill_at - settings.fence_grace
        self.fence.hold(term_at, kill_at)
        self.valid_until = term_at

    def _lose(self, why):
        if self.term is None:
            return
        self.logger.error('This server stops leading (%s): it starts no job, its running jobs are ended and '
                          'queued again; it stands by.', why)
        self.term = None
        self.valid_until = 0.0
        try:
            self.fence.hold(0.0, time.monotonic() + self.settings.fence_grace)
        except OSError as exc:        # a fence that cannot be told has its last deadline all the same
            self.logger.error('The fence could not be told at once (%s); it ends the jobs at its last deadline.',
                              exc)
        for call in self.on_lose:
            call()

    def status(self):
        """Who leads, for ``status``, ``/health`` and ``/metrics``."""
        state = {'role': 'leader' if self.leading else 'standby', 'server': self.store.name}
        try:
            lease = self.store.lease()
            servers = self.store.servers()
        except OSError as exc:
            state['error'] = str(exc)
            return state
        holder = lease['holder'] if lease['expires'] > lease['now'] else ''
        state['leader'] = holder
        state['term'] = lease['term']
        state['leader_since'] = lease['since'] if holder else None
        state['servers'] = [dict(server, leads=server['name'] == holder) for server in servers]
        return state


class Follower:
    """Brings this server's copy of the queue up to date with the changes of the others."""

    def __init__(self, store, queue, logger, seq):
        self.store = store
        self.queue = queue
        self.logger = logger
        self.seq = seq
        self._stop = threading.Event()
        self._trouble = False
        self._thread = threading.Thread(target=self._run, name='follow', daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(5)

    def catch_up(self):
        """Apply what changed since the last look; raises OSError when the store fails."""
        try:
            seq, changes, rows = self.store.changes(self.seq)
        except ChangesLost:
            self.logger.warning('This server fell behind the change rows; it reads the whole queue again.')
            jobs, seq = self.store.load()
            self.queue.reload(jobs)
            self.seq = seq
            return
        if changes:
            self.queue.follow(changes, rows, self.store.name)
            if any(kind == 'pause' for _, kind, origin in changes if origin != self.store.name):
                self.queue.pause(bool(self.store.setting('paused')))
        self.seq = seq

    def _run(self):
        while not self._stop.wait(FOLLOW_EVERY):
            try:
                self.catch_up()
                if self._trouble:
                    self._trouble = False
                    self.logger.log(25, 'The queue follows the database again.')
            except OSError as exc:
                if not self._trouble:
                    self._trouble = True
                    self.logger.error('The queue cannot follow the database: %s', exc)
                self._stop.wait(1)
            except Exception:          # a bug must not stop following; logged in full
                self.logger.exception('Unexpected error while following the queue')
                self._stop.wait(1)


def address_of(host, port):
    return '%s:%s' % (socket.gethostname() if host in ('', '0.0.0.0', '::') else host, port)

