"""Where jobs are kept: an SQLite database in the environment's botssys.

Every change the queue acknowledges is committed before the answer goes out,
so a server killed at any moment comes back with every acknowledged job.  The
database runs in WAL mode with ``synchronous=NORMAL``: a commit survives the
death of the process; after a power loss the last commits may be missing.

Another process may hold the database's write lock (an operator's ``sqlite3``
session, a backup tool).  Reads go on meanwhile (WAL); a write waits at most
``BUSY_WAIT`` and then raises ``StoreBusy``, so that no lock of the server is
held for long: callers that can wait try again with ``patiently()``, an
``addjob`` is retried apart from the RPC front until the client's patience
runs out.

The module is some 460 lines: the schema, its upgrades and every
transaction of the queue are kept together, so that what one commit holds
(a start with the end before it, an end with its record) reads in
one place - as ``dbstore.py`` does for the database servers.
"""
import collections
import json
import os
import shutil
import sqlite3
import threading
import time

from .botslog import printable

SCHEMA = '''
CREATE TABLE IF NOT EXISTS job (
    jobnumber   INTEGER PRIMARY KEY AUTOINCREMENT,
    priority    INTEGER NOT NULL,
    task        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'waiting',   -- waiting | delayed | running
    not_before  REAL,                              -- delayed: when it may wait again
    requeued    INTEGER NOT NULL DEFAULT 0,        -- times put back after its run was cut off
    locked      INTEGER NOT NULL DEFAULT 0,        -- consecutive 'database locked' exits
    started     REAL,
    pid         INTEGER,
    pid_start   TEXT,                              -- start time of pid, against pid reuse
    relay_pid   INTEGER,
    output      TEXT,                              -- file the job's output is captured in
    runner      INTEGER                            -- runner that started it (its lock file)
);
CREATE TABLE IF NOT EXISTS history (
    jobnumber   INTEGER PRIMARY KEY,
    priority    INTEGER NOT NULL,
    task        TEXT NOT NULL,
    started     REAL,
    ended       REAL,
    exitcode    INTEGER,
    status      TEXT NOT NULL,
    output      TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS attempt (               -- earlier runs of a job that was queued again
    jobnumber   INTEGER NOT NULL,
    started     REAL,
    ended       REAL,
    exitcode    INTEGER,
    output      TEXT                               -- its kept output, as a finished job's
);
CREATE INDEX IF NOT EXISTS attempt_jobnumber ON attempt (jobnumber);
CREATE TABLE IF NOT EXISTS schedule (              -- when each [scheduleN] last fired
    name        TEXT PRIMARY KEY,
    fired       REAL NOT NULL,
    jobnumber   INTEGER
);
CREATE TABLE IF NOT EXISTS setting (               -- the queue's own state: paused
    name        TEXT PRIMARY KEY,
    value       TEXT
);
CREATE TABLE IF NOT EXISTS scheduled (             -- jobs queued by a schedule
    jobnumber   INTEGER PRIMARY KEY,
    schedule    TEXT NOT NULL
);
'''


COLUMNS = ('jobnumber', 'priority', 'task', 'state', 'not_before', 'requeued', 'locked',
           'started', 'pid', 'pid_start', 'relay_pid', 'output', 'runner')
HISTORY_COLUMNS = ('jobnumber', 'priority', 'task', 'started', 'ended', 'exitcode', 'status', 'output')
StoredJob = collections.namedtuple('StoredJob', COLUMNS)
StoredJob.__doc__ = 'A job as it comes back from the database at start-up (its task decoded).'


BUSY_WAIT = 0.05     # seconds a write waits for another process's lock before StoreBusy


class StoreBusy(Exception):
    """Another process holds the database's write lock; nothing was written."""


def _busy(exc):
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ('locked' in text or 'busy' in text)


def patiently(call, *args, patience=600.0, pause=0.05):
    """``call(*args)``, tried again while the store is busy, for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return call(*args)
        except StoreBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(pause)


class Answer(collections.namedtuple('Answer', 'rows lastrowid')):
    """What one statement of ``Store._run`` gave."""

    def fetchone(self):
        return self.rows[0] if self.rows else None


class StoreRefused(Exception):
    """The store could not be reserved for a job's start (``Store.reserve``): the job did not
    start and is first in the queue again; the runner waits and tries again."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class Reservation:
    """The store's write lock, held from just before a job's fork to the commit of its record
    (``Store.reserve``): the statements run after the fork, while the job starts, and no job is
    started that the store could not record.  Either ``commit`` or ``cancel`` ends it."""

    def __init__(self, store):
        self._store = store

    def commit(self, job, runner, started, pid, pid_start, relay_pid, output, done=None):
        """``Store.claim`` in the reserved transaction; on an error it is rolled back and raised."""
        db = self._store._db
        try:
            self._store._claim(job, runner, started, pid, pid_start, relay_pid, output, done)
            db.execute('COMMIT')
        except BaseException:
            if db.in_transaction:
                db.execute('ROLLBACK')
            raise
        finally:
            self._store._lock.release()

    def cancel(self):
        try:
            if self._store._db.in_transaction:
                self._store._db.execute('ROLLBACK')
        finally:
            self._store._lock.release()


class Gone(Exception):
    """A job taken from the queue no longer waits in a shared store: another server removed it
    (``dbstore.py``); whatever else the call was to store is stored."""


class DamagedStore(Exception):
    """The database cannot be trusted; its text is one line for the operator."""


def check_damage(path):
    """Refuse a database that is damaged or has lost its contents, before anything is written.

    SQLite never leaves an empty file once the schema is in, and a write-ahead log without its
    database means the database vanished: both would otherwise start an empty queue.
    """
    if path == ':memory:':
        return
    if os.path.exists(path):
        if os.path.getsize(path) == 0:
            raise DamagedStore(_damaged(path, 'the file is empty'))
    elif os.path.exists(path + '-wal'):
        raise DamagedStore(_damaged(path + '-wal', 'its database %s has vanished' % path))


def _damaged(path, reason):
    kept = '%s.damaged-%s' % (path, time.strftime('%Y%m%d-%H%M%S'))
    try:
        shutil.copy2(path, kept)
        copy = 'a copy is kept as %s' % kept
    except OSError as exc:
        copy = 'no copy could be kept (%s)' % (exc.strerror or exc)
    return ('Error: the job store %s is damaged (%s); %s.  Restore it from a backup, or move it away '
            'to start with an empty queue.' % (path, reason, copy))


class Store:
    """Persistence of the queue.  Thread-safe; every method commits before it returns."""

    def __init__(self, path, history_size=1000):
        if path != ':memory:':
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.history_size = history_size
        self._finished = 0
        self._lock = threading.Lock()
        check_damage(path)
        try:
            self._db = sqlite3.connect(path, timeout=BUSY_WAIT, isolation_level=None, check_same_thread=False)
            self._db.execute('PRAGMA busy_timeout = 30000')     # at start, another process may finish first
            problems = [row[0] for row in self._db.execute('PRAGMA quick_check')]
            if problems != ['ok']:
                raise sqlite3.DatabaseError(problems[0])
            self._db.execute('PRAGMA journal_mode=WAL')
            self._db.execute('PRAGMA synchronous=NORMAL')
            self._db.executescript(SCHEMA)
            columns = [row[1] for row in self._db.execute('PRAGMA table_info(job)')]
            for column, kind in (('runner', 'INTEGER'), ('added', 'REAL')):       # a store of an older version
                if column not in columns:
                    self._db.execute('ALTER TABLE job ADD COLUMN %s %s' % (column, kind))
            if 'output' not in [row[1] for row in self._db.execute('PRAGMA table_info(attempt)')]:
                self._db.execute('ALTER TABLE attempt ADD COLUMN output TEXT')
            self._db.execute('PRAGMA busy_timeout = %d' % (BUSY_WAIT * 1000))
        except sqlite3.DatabaseError as exc:
            if _busy(exc):
                raise DamagedStore('Error: the job store %s is locked by another process (an sqlite3 session, a '
                                   'backup?); end that and start again.' % path)
            raise DamagedStore(_damaged(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))

    def close(self):
        with self._lock:
            self._db.close()

    def _run(self, sql, params=()):
        """Run one statement; its rows and lastrowid (an ``Answer``).  The cursor is read and closed
        with the lock held: a cursor let go elsewhere resets its statement, which clears the
        connection's error of a statement failing in another thread at that instant (it would
        read "not an error" in place of "database is locked")."""
        with self._lock:
            try:
                cursor = self._db.execute(sql, params)
                try:
                    return Answer(cursor.fetchall(), cursor.lastrowid)
                finally:
                    cursor.close()
            except sqlite3.OperationalError as exc:
                if _busy(exc):
                    raise StoreBusy(str(exc)) from exc
                raise

    def _transaction(self, *steps):
        """Run ``steps`` (functions of no argument) in one transaction; StoreBusy when locked."""
        with self._lock:
            try:
                self._db.execute('BEGIN')
                try:
                    for step in steps:
                        step()
                    self._db.execute('COMMIT')
                except BaseException:
                    self._db.execute('ROLLBACK')
                    raise
            except sqlite3.OperationalError as exc:
                if _busy(exc):
                    raise StoreBusy(str(exc)) from exc
                raise

    # ---- start-up
    def load(self):
        """Every stored job, in job number order (a generator: for start-up only)."""
        with self._lock:
            cursor = self._db.execute('SELECT %s FROM job ORDER BY jobnumber' % ', '.join(COLUMNS))
            while True:
                rows = cursor.fetchmany(1000)
                if not rows:
                    return
                # One JSON document for a thousand tasks: far fewer calls than one per task.
                tasks = json.loads('[%s]' % ','.join([row[2] for row in rows]))
                for row, task in zip(rows, tasks):
                    yield StoredJob(row[0], row[1], task, *row[3:])

    # ---- waiting jobs
    def add(self, priority, task):
        """Store a new waiting job; return its job number."""
        return self._run('INSERT INTO job (priority, task, added) VALUES (?, ?, ?)',
                         (priority, json.dumps(task), time.time())).lastrowid

    def oldest_waiting(self):
        """When the job that has waited longest was added (a timestamp), or None."""
        return self._run("SELECT min(added) FROM job WHERE state != 'running'").fetchone()[0]

    def set_priority(self, jobnumber, priority):
        self._run('UPDATE job SET priority = ? WHERE jobnumber = ?', (priority, jobnumber))

    def remove(self, jobnumber):
        self._run('DELETE FROM job WHERE jobnumber = ?', (jobnumber,))

    def remove_waiting(self):
        self._run("DELETE FROM job WHERE state != 'running'")

    def wait_again(self, jobnumber, not_before=None, requeued=None, locked=None):
        """Put a job back among the waiting ones (delayed until ``not_before`` when given)."""
        state = 'waiting' if not_before is None else 'delayed'
        self._run('UPDATE job SET state = ?, not_before = ?, requeued = coalesce(?, requeued), '
                  'locked = coalesce(?, locked), started = NULL, pid = NULL, pid_start = NULL, '
                  'relay_pid = NULL, output = NULL WHERE jobnumber = ?',
                  (state, not_before, requeued, locked, jobnumber))

    def add_attempt(self, jobnumber, started, ended, exitcode):
        """Keep a run of a job that goes back to the queue (the engine found its database locked);
        returns its id, for ``set_attempt_output``."""
        return self._run('INSERT INTO attempt (jobnumber, started, ended, exitcode) VALUES (?, ?, ?, ?)',
                         (jobnumber, started, ended, exitcode)).lastrowid

    def set_attempt_output(self, attempt, output):
        self._run('UPDATE attempt SET output = ? WHERE rowid = ?', (output, attempt))

    # ---- the queue's own state
    def setting(self, name, default=None):
        row = self._run('SELECT value FROM setting WHERE name = ?', (name,)).fetchone()
        return row[0] if row else default

    def set_setting(self, name, value):
        self._run('INSERT OR REPLACE INTO setting VALUES (?, ?)', (name, value))

    # ---- schedules
    def last_fired(self, name):
        """When schedule ``name`` last fired (a timestamp), or None."""
        row = self._run('SELECT fired FROM schedule WHERE name = ?', (name,)).fetchone()
        return row[0] if row else None

    def last_job(self, name):
        row = self._run('SELECT jobnumber FROM schedule WHERE name = ?', (name,)).fetchone()
        return row[0] if row else None

    def set_fired(self, name, fired, jobnumber):
        self._run('INSERT OR REPLACE INTO schedule VALUES (?, ?, ?)', (name, fired, jobnumber))

    def set_scheduled(self, jobnumber, name):
        """Job ``jobnumber`` was queued by schedule ``name`` (told in its history)."""
        self._run('INSERT OR REPLACE INTO scheduled VALUES (?, ?)', (jobnumber, name))

    # ---- running jobs
    def set_running(self, jobnumber, done=None, runner=None):
        """Mark a job running (by ``runner``); move the ended job ``done`` (see ``finish_ended``)
        to the history in the same transaction."""
        steps = [lambda: self._db.execute("UPDATE job SET state = 'running', started = ?, runner = ? "
                                          "WHERE jobnumber = ?", (time.time(), runner, jobnumber))]
        if done is not None:
            steps.insert(0, lambda: self._finish_ended(done))
        self._transaction(*steps)

    def reserve(self):
        """Take the database's write lock for a start (``BEGIN IMMEDIATE``; StoreBusy when another
        process holds it): the job is forked only once its record is sure to be written.  The
        Reservation holds the store until its ``commit`` or ``cancel``."""
        self._lock.acquire()
        try:
            self._db.execute('BEGIN IMMEDIATE')
        except BaseException as exc:
            self._lock.release()
            if isinstance(exc, sqlite3.OperationalError) and _busy(exc):
                raise StoreBusy(str(exc)) from exc
            raise
        return Reservation(self)

    def claim(self, job, runner, started, pid, pid_start, relay_pid, output, done=None):
        """Store a job that has just been started as running, with its process, and move the
        ended job ``done`` to the history, in one commit (what a Reservation's ``commit`` does,
        for when that failed)."""
        self._transaction(lambda: self._claim(job, runner, started, pid, pid_start, relay_pid, output, done))

    def _claim(self, job, runner, started, pid, pid_start, relay_pid, output, done):
        # The whole row is written: a job cleared from the queue in the instant of its start is
        # stored all the same.
        if done is not None:
            self._finish_ended(done)
        self._db.execute(
            "INSERT INTO job (jobnumber, priority, task, state, requeued, locked, started, pid, pid_start, "
            "relay_pid, output, runner) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (jobnumber) DO UPDATE SET state = 'running', started = excluded.started, "
            "pid = excluded.pid, pid_start = excluded.pid_start, relay_pid = excluded.relay_pid, "
            "output = excluded.output, runner = excluded.runner",
            (job.jobnumber, job.priority, json.dumps(list(job.task)), job.requeued, job.locked, started, pid,
             pid_start, relay_pid, output, runner))

    def finish_ended(self, done):
        """Move an ended job (``job``, ``started``, ``ended``, ``exitcode``, ``status``) from the
        queue to the history, its output to come (``set_output``)."""
        self._transaction(lambda: self._finish_ended(done))

    def _finish_ended(self, done):
        self._finish(done.job, done.started, done.ended, done.exitcode, done.status, '')

    def set_process(self, jobnumber, pid, pid_start, relay_pid, output):
        self._run('UPDATE job SET pid = ?, pid_start = ?, relay_pid = ?, output = ? '
                  'WHERE jobnumber = ?', (pid, pid_start, relay_pid, output, jobnumber))

    def finish(self, job, started, ended, exitcode, status, output):
        """Move a job from the queue to the history, in one transaction: a job that ended is
        either still stored as running (and runs again after a crash) or in the history."""
        self._transaction(lambda: self._finish(job, started, ended, exitcode, status, output))

    def set_output(self, jobnumber, output):
        """The kept output of a finished job (it follows the record, once it is collected)."""
        self._run('UPDATE history SET output = ? WHERE jobnumber = ?', (output, jobnumber))

    def without_output(self, jobnumbers):
        """Those of ``jobnumbers`` that are in the history with no output kept."""
        wanted = set(jobnumbers)
        if not wanted:
            return []
        with self._lock:
            rows = self._db.execute("SELECT jobnumber FROM history WHERE output = '' AND jobnumber BETWEEN ? AND ?",
                                    (min(wanted), max(wanted))).fetchall()
        return sorted(row[0] for row in rows if row[0] in wanted)

    def _finish(self, job, started, ended, exitcode, status, output):
        self._db.execute('DELETE FROM job WHERE jobnumber = ?', (job.jobnumber,))
        self._db.execute('INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
                         (job.jobnumber, job.priority, json.dumps(list(job.task)), started, ended, exitcode,
                          status, output))
        self._finished += 1
        if self._finished % 50 == 0:     # trimming now and then keeps each record cheap
            self._db.execute('DELETE FROM history WHERE jobnumber <= (SELECT jobnumber FROM history '
                             'ORDER BY jobnumber DESC LIMIT 1 OFFSET ?)', (self.history_size,))
            for table in ('attempt', 'scheduled'):
                self._db.execute('DELETE FROM %s WHERE jobnumber NOT IN (SELECT jobnumber FROM history) '
                                 'AND jobnumber NOT IN (SELECT jobnumber FROM job)' % table)

    def history(self, limit=20, with_output=True):
        """The newest finished jobs (at most ``history_size``), newest first, as dicts."""
        columns = HISTORY_COLUMNS if with_output else HISTORY_COLUMNS[:-1]
        with self._lock:
            rows = self._db.execute('SELECT %s FROM history ORDER BY jobnumber DESC LIMIT ?'
                                    % ', '.join(columns), (min(limit, self.history_size),)).fetchall()
            attempts = self._attempts([row[0] for row in rows])
        return [_history_dict(row, attempts, columns) for row in rows]

    def _attempts(self, jobnumbers):
        """(With the lock held.)  The earlier runs of these jobs: ``{jobnumber: [run, ...]}``, and
        the schedule of each scheduled one: ``{('schedule', jobnumber): name}``."""
        found = collections.defaultdict(list)
        if jobnumbers:
            for number, name in self._db.execute('SELECT jobnumber, schedule FROM scheduled WHERE jobnumber '
                                                 'BETWEEN ? AND ?', (min(jobnumbers), max(jobnumbers))):
                found[('schedule', number)] = name
            for number, started, ended, exitcode, output in self._db.execute(
                    'SELECT jobnumber, started, ended, exitcode, output FROM attempt WHERE jobnumber BETWEEN ? AND ? '
                    'ORDER BY rowid', (min(jobnumbers), max(jobnumbers))):
                found[number].append({'started': started, 'ended': ended, 'exitcode': exitcode,
                                      'output': printable(output or '')})
        return found

    def finished(self, jobnumber):
        with self._lock:
            row = self._db.execute('SELECT %s FROM history WHERE jobnumber = ?' % ', '.join(HISTORY_COLUMNS),
                                   (jobnumber,)).fetchone()
            attempts = self._attempts([jobnumber]) if row else {}
        return _history_dict(row, attempts) if row else None


def _history_dict(row, attempts, columns=HISTORY_COLUMNS):
    record = dict(zip(columns, row))
    record['task'] = json.loads(record['task'])
    if record.get('output'):
        record['output'] = printable(record['output'])     # a record kept before outputs were escaped
    if record['jobnumber'] in attempts:
        record['attempts'] = attempts[record['jobnumber']]
    if ('schedule', record['jobnumber']) in attempts:
        record['schedule'] = attempts[('schedule', record['jobnumber'])]
    return record
