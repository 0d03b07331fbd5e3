"""The job store in a database server (PostgreSQL, MySQL or MariaDB), shared by several servers.

``[jobqueue] store = database`` (the database of settings.py) or ``store = <URL>`` puts the
queue, the history, the schedules' state and the pause in tables of our own, all named
``jobqueue_...`` (Bots' own tables never start so), created and brought up to date by the
first server that starts.  Several servers may use one such store: every one stores the jobs it
is given, one of them - the leader, ``cluster.py`` - launches them.

What makes the servers agree, all of it inside the database:

* Every change of the queue runs in a transaction that first locks the one row of
  ``jobqueue_meta``: changes are serialized across servers, so the duplicate rule holds for
  the whole environment and job numbers (counted in that row) are unique and increasing.
* Each such change appends a row to ``jobqueue_change`` (a sequence number counted in the same
  row, so the order of the numbers is the order of the commits).  Every server reads the rows
  after the last one it saw and brings its own copy of the queue up to date (``cluster.Follower``):
  a job added at one server is in the leader's queue moments later.
* The leader's right to launch is a lease row, ``jobqueue_lease``, with an expiry on the
  database server's clock (see ``cluster.py`` for why a lease and not a session lock).

The interface is ``store.Store``'s, plus the methods a shared queue needs (``admit``,
``take``, ``drop``, ``clear``, ``changes``) and the lease's.  A database that cannot be
reached raises ``StoreUnreachable`` (an OSError, which every caller of the store already
handles as a store that fails: the runners wait and try again, an add is refused with why);
the connection is opened again at the next call.

This module is long (some 800 lines, a hundred of them the schema) because it is the one place
that speaks SQL to a database server: ``store.Store``'s interface in two dialects, the shared
queue's statements and the lease's.  Each statement stays beside the transaction that gives it
its meaning (which row is locked, what a row count tells); split apart, the reasoning would be.
"""
import hashlib
import json
import os
import socket
import threading
import time
import urllib.parse

from .botslog import printable
from .store import COLUMNS, HISTORY_COLUMNS, Gone, StoredJob

PREFIX = 'jobqueue_'
SCHEMA_VERSION = 1

SCHEMA = '''
CREATE TABLE IF NOT EXISTS jobqueue_meta (
    id          INTEGER PRIMARY KEY,
    next_job    BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    trimmed     BIGINT NOT NULL,
    version     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobqueue_job (
    jobnumber   BIGINT PRIMARY KEY,
    priority    INTEGER NOT NULL,
    task        {longtext} NOT NULL,
    task_key    CHAR(64) NOT NULL,
    state       VARCHAR(10) NOT NULL,
    not_before  {double},
    requeued    INTEGER NOT NULL,
    locked      INTEGER NOT NULL,
    started     {double},
    pid         INTEGER,
    pid_start   VARCHAR(40),
    relay_pid   INTEGER,
    output      {text},
    runner      INTEGER,
    added       {double},
    server      VARCHAR(200)
);
CREATE INDEX {if_not_exists} jobqueue_job_task_key ON jobqueue_job (task_key);
{waiting_index}
CREATE TABLE IF NOT EXISTS jobqueue_history (
    jobnumber   BIGINT PRIMARY KEY,
    priority    INTEGER NOT NULL,
    task        {longtext} NOT NULL,
    started     {double},
    ended       {double},
    exitcode    INTEGER,
    status      VARCHAR(40) NOT NULL,
    output      {longtext} NOT NULL,
    server      VARCHAR(200)
);
CREATE TABLE IF NOT EXISTS jobqueue_attempt (
    id          {autoid},
    jobnumber   BIGINT NOT NULL,
    started     {double},
    ended       {double},
    exitcode    INTEGER,
    output      {longtext}
);
CREATE INDEX {if_not_exists} jobqueue_attempt_jobnumber ON jobqueue_attempt (jobnumber);
CREATE TABLE IF NOT EXISTS jobqueue_schedule (
    name        VARCHAR(200) PRIMARY KEY,
    fired       {double} NOT NULL,
    jobnumber   BIGINT
);
CREATE TABLE IF NOT EXISTS jobqueue_setting (
    name        VARCHAR(200) PRIMARY KEY,
    value       {text}
);
CREATE TABLE IF NOT EXISTS jobqueue_scheduled (
    jobnumber   BIGINT PRIMARY KEY,
    schedule    VARCHAR(200) NOT NULL
);
CREATE TABLE IF NOT EXISTS jobqueue_change (
    seq         BIGINT PRIMARY KEY,
    jobnumber   BIGINT NOT NULL,
    kind        VARCHAR(10) NOT NULL,
    origin      VARCHAR(200) NOT NULL
);
CREATE TABLE IF NOT EXISTS jobqueue_lease (
    id          INTEGER PRIMARY KEY,
    holder      VARCHAR(200) NOT NULL,
    term        BIGINT NOT NULL,
    expires     {double} NOT NULL,
    since       {double} NOT NULL
);
CREATE TABLE IF NOT EXISTS jobqueue_server (
    name        VARCHAR(200) PRIMARY KEY,
    address     VARCHAR(200) NOT NULL,
    started     {double} NOT NULL,
    seen        {double} NOT NULL
);
'''

CHANGES_KEPT = 20000      # change rows kept; a server further behind reads the whole queue again


class StoreUnreachable(OSError):
    """The database server cannot be reached, or failed the statement; nothing was changed."""


class ChangesLost(Exception):
    """The change rows after the ones a server saw are trimmed: it must read the queue afresh."""


def task_key(task):
    """What the duplicate rule compares, indexed: a digest (SHA-256) of the task's JSON form."""
    return hashlib.sha256(json.dumps(list(task)).encode('utf-8', 'surrogatepass')).hexdigest()


class Dialect:
    """What differs between the two kinds of database server."""

    def __init__(self, kind):
        self.kind = kind
        if kind == 'postgresql':
            # PostgreSQL: at most one waiting job per task, kept by the database itself (``admit``).
            self.types = dict(double='DOUBLE PRECISION', text='TEXT', longtext='TEXT', autoid='BIGSERIAL PRIMARY KEY',
                              if_not_exists='IF NOT EXISTS',
                              waiting_index="CREATE UNIQUE INDEX IF NOT EXISTS jobqueue_job_waiting_task ON "
                                            "jobqueue_job (task_key) WHERE state != 'running';")
            self.now = 'CAST(extract(epoch from clock_timestamp()) AS DOUBLE PRECISION)'
        else:
            self.types = dict(double='DOUBLE', text='TEXT', longtext='LONGTEXT',
                              autoid='BIGINT AUTO_INCREMENT PRIMARY KEY', if_not_exists='', waiting_index='')
            self.now = '(UNIX_TIMESTAMP(SYSDATE(6)) + 0e0)'

    def upsert(self, table, key, columns):
        """An INSERT that replaces the row with the same ``key``."""
        names = (key,) + tuple(columns)
        marks = ', '.join(['%s'] * len(names))
        if self.kind == 'postgresql':
            return 'INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (%s) DO UPDATE SET %s' % (
                table, ', '.join(names), marks, key, ', '.join('%s = EXCLUDED.%s' % (c, c) for c in columns))
        return 'INSERT INTO %s (%s) VALUES (%s) ON DUPLICATE KEY UPDATE %s' % (
            table, ', '.join(names), marks, ', '.join('%s = VALUES(%s)' % (c, c) for c in columns))


def parse_url(url):
    """``(kind, connection arguments)`` of a store URL; raises ValueError with the words for the operator."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.split('+')[0].lower()
    kind = {'postgresql': 'postgresql', 'postgres': 'postgresql', 'mysql': 'mysql', 'mariadb': 'mysql'}.get(scheme)
    if kind is None:
        raise ValueError('a store URL starts with postgresql:// or mysql:// (not "%s")' % (parts.scheme or url))
    database = parts.path.lstrip('/')
    if not parts.hostname or not database:
        raise ValueError('a store URL names a host and a database: %s://user:password@host:port/dbname' % scheme)
    arguments = dict(host=parts.hostname, port=parts.port, user=urllib.parse.unquote(parts.username or ''),
                     password=urllib.parse.unquote(parts.password or ''), database=database)
    return kind, arguments


def from_django(entry):
    """``(kind, connection arguments)`` of a Django ``DATABASES`` entry; ValueError for SQLite and others."""
    engine = entry.get('ENGINE', '')
    kind = 'postgresql' if 'postgres' in engine else 'mysql' if 'mysql' in engine else None
    if kind is None:
        raise ValueError('store = database needs PostgreSQL or MySQL/MariaDB as Bots\' database; settings.py '
                         'has %s' % (engine or 'no ENGINE'))
    arguments = dict(host=entry.get('HOST') or '127.0.0.1', port=int(entry['PORT']) if entry.get('PORT') else None,
                     user=entry.get('USER', ''), password=entry.get('PASSWORD', ''), database=entry.get('NAME', ''))
    return kind, arguments


def safe_url(kind, arguments):
    """The store as the log names it: no password."""
    return '%s://%s@%s:%s/%s' % (kind, arguments['user'], arguments['host'],
                                 arguments['port'] or ('5432' if kind == 'postgresql' else '3306'),
                                 arguments['database'])


class Connection:
    """One connection to the database server, opened when first needed and again after a failure."""

    def __init__(self, kind, arguments, name, timeout):
        self.kind = kind
        self.arguments = arguments
        self.name = name            # who this is, for the database's list of sessions
        self.timeout = timeout      # seconds to give up on a server that does not answer
        self._raw = None
        if kind == 'postgresql':
            import psycopg
            self._driver = psycopg
        else:
            import pymysql
            self._driver = pymysql

    def _open(self):
        arguments = self.arguments
        timeout = max(1, int(self.timeout))
        if self.kind == 'postgresql':
            return self._driver.connect(
                host=arguments['host'], port=arguments['port'] or 5432, user=arguments['user'],
                password=arguments['password'], dbname=arguments['database'], connect_timeout=timeout,
                application_name=self.name[:63], keepalives=1, keepalives_idle=timeout, keepalives_interval=1,
                keepalives_count=3, tcp_user_timeout=timeout * 1000, autocommit=False)
        connection = self._driver.connect(
            host=arguments['host'], port=arguments['port'] or 3306, user=arguments['user'],
            password=arguments['password'], database=arguments['database'], connect_timeout=timeout,
            read_timeout=timeout * 3, write_timeout=timeout * 3, autocommit=False, charset='utf8mb4',
            client_flag=self._driver.constants.CLIENT.FOUND_ROWS)      # rowcount: rows matched, as PostgreSQL
        with connection.cursor() as cursor:
            cursor.execute('SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED')
        connection.commit()
        return connection

    def transaction(self, work, autocommit=False):
        """``work(cursor)`` in one transaction, committed; its result.  StoreUnreachable when the
        database fails (the transaction is rolled back, the connection dropped).

        A connection that was lost while it was idle (the database ended the session, or
        restarted) fails at the first statement, before anything is done: that one case is tried
        again at once on a new connection.  A failure later in a transaction is not retried - a
        commit whose answer was lost may have happened.

        ``autocommit``: ``work`` is one statement, its own transaction (one round trip).
        """
        for attempt in (1, 2):
            reused = self._raw is not None
            cursor = None
            try:
                if self._raw is None:
                    self._raw = self._open()
                if autocommit:
                    self._raw.autocommit = True
                    try:
                        cursor = _Counting(self._raw.cursor())
                        return work(cursor)
                    finally:
                        if self._raw is not None:
                            self._raw.autocommit = False
                cursor = _Counting(self._raw.cursor())
                result = work(cursor)
                self._raw.commit()
                return result
            except self._driver.Error as exc:
                self.drop()
                if attempt == 1 and reused and cursor is not None and cursor.done == 0:
                    continue
                text = str(exc).strip().splitlines()
                raise StoreUnreachable('the database %s fails: %s' % (
                    safe_url(self.kind, self.arguments), text[0] if text else type(exc).__name__)) from exc
            finally:
                if cursor is not None:
                    try:
                        cursor.close()
                    except self._driver.Error:
                        pass

    def drop(self):
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                raw.close()
            except Exception:     # closing a broken connection says nothing new
                pass


class _Counting:
    """A cursor that counts the statements it has done."""

    def __init__(self, cursor):
        self._cursor = cursor
        self.done = 0

    def execute(self, *args):
        result = self._cursor.execute(*args)
        self.done += 1
        return result

    def __getattr__(self, name):
        return getattr(self._cursor, name)


class DatabaseStore:
    """The queue's persistence in a database server, shared by every server of an environment."""

    shared = True

    def __init__(self, kind, arguments, history_size=1000, name=None, timeout=10):
        self.kind = kind
        self.arguments = arguments
        self.history_size = history_size
        self.dialect = Dialect(kind)
        # Who this server is, in the lease and the change rows: machine and pid, and a token, for a
        # container restarted under the same name and pid (1) is another server.
        self.name = name or '%s:%d:%s' % (socket.gethostname(), os.getpid(), os.urandom(3).hex())
        self.url = safe_url(kind, arguments)
        self._finished = 0           # jobs recorded as finished by this server
        self._trimmed = 0            # ... when the history was last trimmed
        self._lock = threading.Lock()
        self._db = Connection(kind, arguments, 'bots-jobqueue %s' % self.name, timeout)
        self._lease_db = Connection(kind, arguments, 'bots-jobqueue lease %s' % self.name, timeout)
        self._lease_lock = threading.Lock()
        self._follow_db = Connection(kind, arguments, 'bots-jobqueue follow %s' % self.name, timeout)
        self._follow_lock = threading.Lock()
        self._create()

    # ---- connections
    def _run(self, work):
        def counted(cursor):
            result = work(cursor)
            meta = getattr(cursor, 'meta', None)
            if meta is not None and tuple(meta) != cursor.counted:
                cursor.execute('UPDATE jobqueue_meta SET next_job = %s, seq = %s WHERE id = 1', tuple(meta))
            return result
        with self._lock:
            return self._db.transaction(counted)

    def _create(self):
        """The tables, made by the first server (the others wait for it on a database lock)."""
        def create(cursor):
            if self.kind == 'postgresql':
                cursor.execute('SELECT pg_advisory_xact_lock(%s)', (0x626f7473,))
            else:
                cursor.execute("SELECT GET_LOCK('bots_jobqueue_schema', 60)")
            for statement in SCHEMA.format(**self.dialect.types).split(';'):
                if statement.strip().startswith('CREATE INDEX') and self.kind == 'mysql':
                    cursor.execute('SELECT count(*) FROM information_schema.statistics WHERE table_schema = '
                                   'database() AND index_name = %s', (statement.split()[2],))
                    if cursor.fetchone()[0]:
                        continue       # MySQL has no CREATE INDEX IF NOT EXISTS
                if statement.strip():
                    cursor.execute(statement)
            cursor.execute('SELECT count(*) FROM jobqueue_meta')
            if cursor.fetchone()[0] == 0:
                cursor.execute('INSERT INTO jobqueue_meta VALUES (1, 1, 0, 0, %s)', (SCHEMA_VERSION,))
                cursor.execute('INSERT INTO jobqueue_lease VALUES (1, %s, 0, 0, 0)', ('',))
            if self.kind != 'postgresql':
                cursor.execute("SELECT RELEASE_LOCK('bots_jobqueue_schema')")
        self._run(create)

    def close(self):
        for connection in (self._db, self._lease_db, self._follow_db):
            connection.drop()

    def _change(self, cursor, jobnumber, kind):
        """(In a transaction.)  Lock the queue for the rest of the transaction (at the first call);
        note a change of job ``jobnumber`` (None: only the lock).  Returns the job number the next
        new job would get.  The counters are written back once, at the end (``_run``)."""
        meta = getattr(cursor, 'meta', None)
        if meta is None:
            cursor.execute('SELECT next_job, seq FROM jobqueue_meta WHERE id = 1 FOR UPDATE')
            meta = cursor.meta = list(cursor.fetchone())
            cursor.counted = tuple(meta)
        if jobnumber is not None:
            meta[1] += 1
            cursor.execute('INSERT INTO jobqueue_change VALUES (%s, %s, %s, %s)', (meta[1], jobnumber, kind, self.name))
        return meta[0]

    def _new_jobnumber(self, cursor):
        """(In a transaction, the queue locked.)  The number of a new job."""
        cursor.meta[0] += 1
        return cursor.meta[0] - 1

    # ---- start-up
    def load(self):
        """Every stored job, in job number order, and where the change rows stand: the queue read
        afresh (``(jobs, seq)``; the jobs as StoredJobs)."""
        def read(cursor):
            cursor.execute('SELECT seq FROM jobqueue_meta WHERE id = 1 FOR UPDATE')
            seq = cursor.fetchone()[0]
            cursor.execute('SELECT %s FROM jobqueue_job ORDER BY jobnumber' % ', '.join(COLUMNS))
            return [StoredJob(row[0], row[1], json.loads(row[2]), *row[3:]) for row in cursor.fetchall()], seq
        return self._run(read)

    # ---- waiting jobs
    def admit(self, priority, task):
        """Queue ``task`` for the whole environment: ``(added, jobnumber, previous)``.  ``added`` is
        False for a waiting duplicate of the same priority; ``previous`` is the old priority of a
        waiting duplicate whose priority changed."""
        key = task_key(task)
        text = json.dumps(list(task))
        if self.kind == 'postgresql':
            jobnumber = self._admit_in_one(priority, key, text)
            if jobnumber is not None:
                return True, jobnumber, None

        def admit(cursor):
            self._change(cursor, None, None)
            cursor.execute("SELECT jobnumber, priority, task FROM jobqueue_job WHERE task_key = %s AND "
                           "state != 'running'", (key,))
            for jobnumber, stored, stored_task in cursor.fetchall():
                if stored_task != text:
                    continue            # another task with the same digest (MySQL): not a duplicate
                if stored == priority:
                    return False, jobnumber, None
                cursor.execute('UPDATE jobqueue_job SET priority = %s WHERE jobnumber = %s', (priority, jobnumber))
                self._change(cursor, jobnumber, 'priority')
                return True, jobnumber, stored
            jobnumber = self._new_jobnumber(cursor)
            cursor.execute("INSERT INTO jobqueue_job (jobnumber, priority, task, task_key, state, requeued, locked, "
                           "added) VALUES (%s, %s, %s, %s, 'waiting', 0, 0, %s)",
                           (jobnumber, priority, text, key, time.time()))
            self._change(cursor, jobnumber, 'add')
            return True, jobnumber, None
        return self._run(admit)

    def _admit_in_one(self, priority, key, text):
        """``admit`` of a task that does not wait yet, on PostgreSQL: one statement, its own
        transaction.  The unique index of waiting tasks turns a duplicate - even one another server
        is adding at this instant - into no row (None: ``admit`` then looks at it).  The queue's row
        is locked first (the insert reads from its update), so the numbers stay in commit order."""
        statement = """WITH m AS (UPDATE jobqueue_meta SET next_job = next_job + 1, seq = seq + 1 WHERE id = 1
                                   RETURNING next_job - 1 AS jobnumber, seq),
                            i AS (INSERT INTO jobqueue_job (jobnumber, priority, task, task_key, state, requeued,
                                                            locked, added)
                                  SELECT jobnumber, %(priority)s, %(task)s, %(key)s, 'waiting', 0, 0, %(now)s FROM m
                                  ON CONFLICT (task_key) WHERE state != 'running' DO NOTHING RETURNING jobnumber),
                            c AS (INSERT INTO jobqueue_change (seq, jobnumber, kind, origin)
                                  SELECT m.seq, i.jobnumber, 'add', %(me)s FROM m, i)
                       SELECT jobnumber FROM i"""
        values = dict(priority=priority, task=text, key=key, now=time.time(), me=self.name)

        def admit(cursor):
            cursor.execute(statement, values)
            row = cursor.fetchone()
            return row[0] if row else None
        with self._lock:
            return self._db.transaction(admit, autocommit=True)

    def oldest_waiting(self):
        def read(cursor):
            cursor.execute("SELECT min(added) FROM jobqueue_job WHERE state != 'running'")
            return cursor.fetchone()[0]
        return self._run(read)

    def set_priority(self, jobnumber, priority):
        def update(cursor):
            self._change(cursor, jobnumber, 'priority')
            cursor.execute('UPDATE jobqueue_job SET priority = %s WHERE jobnumber = %s', (priority, jobnumber))
        self._run(update)

    def drop(self, jobnumber):
        """Remove a waiting job: its ``(priority, task)``, or None when it does not wait (any more)."""
        def delete(cursor):
            self._change(cursor, jobnumber, 'remove')
            cursor.execute("SELECT priority, task FROM jobqueue_job WHERE jobnumber = %s AND state != 'running'",
                           (jobnumber,))
            row = cursor.fetchone()
            if row is None:
                return None
            cursor.execute('DELETE FROM jobqueue_job WHERE jobnumber = %s', (jobnumber,))
            return row[0], json.loads(row[1])
        return self._run(delete)

    def remove(self, jobnumber):
        """Remove a job (a job of ours queued again whose task waits already); a job running at
        another server is not ours to touch."""
        def delete(cursor):
            self._change(cursor, jobnumber, 'remove')
            cursor.execute("DELETE FROM jobqueue_job WHERE jobnumber = %s AND (state != 'running' OR server = %s)",
                           (jobnumber, self.name))
        self._run(delete)

    def clear(self):
        """Remove every waiting job; ``(count, highest job number removed)``."""
        def delete(cursor):
            next_job = self._change(cursor, None, None)
            cursor.execute("DELETE FROM jobqueue_job WHERE state != 'running' AND jobnumber < %s", (next_job,))
            count = cursor.rowcount
            self._change(cursor, next_job - 1, 'clear')
            return count, next_job - 1
        return self._run(delete)

    def remove_waiting(self):
        self.clear()

    def wait_again(self, jobnumber, not_before=None, requeued=None, locked=None):
        """Put a job back among the waiting ones; False when it is not ours to put back: it runs at
        another server (this one lost the lease meanwhile, and the next leader has it), or is gone."""
        state = 'waiting' if not_before is None else 'delayed'

        def update(cursor):
            self._change(cursor, jobnumber, 'wait')
            cursor.execute("SELECT 1 FROM jobqueue_job a JOIN jobqueue_job b ON a.task_key = b.task_key AND "
                           "a.task = b.task WHERE a.jobnumber = %s AND b.jobnumber != %s AND b.state != 'running'",
                           (jobnumber, jobnumber))
            if cursor.fetchone():
                # The same task was queued meanwhile: one waiting copy is enough.
                cursor.execute("DELETE FROM jobqueue_job WHERE jobnumber = %s AND (state != 'running' OR "
                               "server = %s)", (jobnumber, self.name))
                return False
            cursor.execute('UPDATE jobqueue_job SET state = %s, not_before = %s, requeued = coalesce(%s, requeued), '
                           'locked = coalesce(%s, locked), started = NULL, pid = NULL, pid_start = NULL, '
                           "relay_pid = NULL, output = NULL, server = NULL WHERE jobnumber = %s AND "
                           "(state != 'running' OR server = %s)",
                           (state, not_before, requeued, locked, jobnumber, self.name))
            return cursor.rowcount == 1
        return self._run(update)

    def add_attempt(self, jobnumber, started, ended, exitcode):
        def insert(cursor):
            cursor.execute('INSERT INTO jobqueue_attempt (jobnumber, started, ended, exitcode) VALUES (%s, %s, %s, %s)',
                           (jobnumber, started, ended, exitcode))
            if self.kind == 'postgresql':
                cursor.execute('SELECT lastval()')
                return cursor.fetchone()[0]
            return cursor.lastrowid
        return self._run(insert)

    def set_attempt_output(self, attempt, output):
        self._run(lambda cursor: cursor.execute('UPDATE jobqueue_attempt SET output = %s WHERE id = %s',
                                                (output, attempt)))

    # ---- the queue's own state
    def setting(self, name, default=None):
        def read(cursor):
            cursor.execute('SELECT value FROM jobqueue_setting WHERE name = %s', (name,))
            row = cursor.fetchone()
            return row[0] if row else default
        return self._run(read)

    def set_setting(self, name, value):
        def write(cursor):
            if name == 'paused':
                self._change(cursor, 0, 'pause')
            cursor.execute(self.dialect.upsert('jobqueue_setting', 'name', ('value',)), (name, value))
        self._run(write)

    # ---- schedules
    def last_fired(self, name):
        def read(cursor):
            cursor.execute('SELECT fired FROM jobqueue_schedule WHERE name = %s', (name,))
            row = cursor.fetchone()
            return row[0] if row else None
        return self._run(read)

    def last_job(self, name):
        def read(cursor):
            cursor.execute('SELECT jobnumber FROM jobqueue_schedule WHERE name = %s', (name,))
            row = cursor.fetchone()
            return row[0] if row else None
        return self._run(read)

    def set_fired(self, name, fired, jobnumber):
        self._run(lambda cursor: cursor.execute(self.dialect.upsert('jobqueue_schedule', 'name',
                                                                    ('fired', 'jobnumber')), (name, fired, jobnumber)))

    def set_scheduled(self, jobnumber, name):
        self._run(lambda cursor: cursor.execute(self.dialect.upsert('jobqueue_scheduled', 'jobnumber',
                                                                    ('schedule',)), (jobnumber, name)))

    # ---- running jobs
    def take(self, jobnumber, done=None, runner=None):
        """Mark a waiting job running here (and move the ended job ``done`` to the history, in the
        same transaction); False when it no longer waits (removed at another server)."""
        if self.kind == 'postgresql':
            return self._take_in_one(jobnumber, done, runner)

        def take(cursor):
            self._change(cursor, jobnumber, 'running')
            if done is not None:
                self._finish(cursor, done.job, done.started, done.ended, done.exitcode, done.status, '')
            cursor.execute("UPDATE jobqueue_job SET state = 'running', started = %s, runner = %s, server = %s "
                           "WHERE jobnumber = %s AND state = 'waiting'", (time.time(), runner, self.name, jobnumber))
            return cursor.rowcount == 1
        return self._run(take)

    def _take_in_one(self, jobnumber, done, runner):
        """``take`` on PostgreSQL: one statement, its own transaction - the step between two jobs
        costs one round trip and one commit.  The queue's row is locked by its UPDATE (the change
        numbers stay in commit order); a job that ended is recorded only if its row is still ours."""
        values = dict(job=jobnumber, me=self.name, now=time.time(), runner=runner, n=1 if done is None else 2)
        recorded = ''
        if done is not None:
            values.update(done=done.job.jobnumber, priority=done.job.priority, task=json.dumps(list(done.job.task)),
                          started=done.started, ended=done.ended, exitcode=done.exitcode, status=done.status)
            recorded = (""", d AS (DELETE FROM jobqueue_job WHERE jobnumber = %(done)s AND server = %(me)s
                                  RETURNING jobnumber),
                          h AS (INSERT INTO jobqueue_history (jobnumber, priority, task, started, ended, exitcode,
                                                              status, output, server)
                                SELECT jobnumber, %(priority)s, %(task)s, %(started)s, %(ended)s, %(exitcode)s,
                                       %(status)s, '', %(me)s FROM d
                                ON CONFLICT (jobnumber) DO UPDATE SET priority = EXCLUDED.priority,
                                    task = EXCLUDED.task, started = EXCLUDED.started, ended = EXCLUDED.ended,
                                    exitcode = EXCLUDED.exitcode, status = EXCLUDED.status, output = '',
                                    server = EXCLUDED.server),
                          e AS (INSERT INTO jobqueue_change (seq, jobnumber, kind, origin)
                                SELECT m.seq, %(done)s, 'done', %(me)s FROM m, d)""")
            self._finished += 1
        statement = ("""WITH m AS (UPDATE jobqueue_meta SET seq = seq + %(n)s WHERE id = 1 RETURNING seq),
                          c AS (INSERT INTO jobqueue_change (seq, jobnumber, kind, origin)
                                SELECT seq - %(n)s + 1, %(job)s, 'running', %(me)s FROM m),
                          j AS (UPDATE jobqueue_job SET state = 'running', started = %(now)s, runner = %(runner)s,
                                                        server = %(me)s
                                WHERE jobnumber = %(job)s AND state = 'waiting' RETURNING jobnumber)"""
                     + recorded + ' SELECT count(*) FROM j')

        def take(cursor):
            cursor.execute(statement, values)
            return cursor.fetchone()[0] == 1
        with self._lock:
            return self._db.transaction(take, autocommit=True)

    def set_running(self, jobnumber, done=None, runner=None):
        if not self.take(jobnumber, done, runner):
            raise Gone(jobnumber)

    def finish_ended(self, done):
        self.finish(done.job, done.started, done.ended, done.exitcode, done.status, '')

    def set_process(self, jobnumber, pid, pid_start, relay_pid, output):
        def update(cursor):
            cursor.execute('UPDATE jobqueue_job SET pid = %s, pid_start = %s, relay_pid = %s, output = %s WHERE '
                           'jobnumber = %s AND server = %s', (pid, pid_start, relay_pid, output, jobnumber, self.name))
            if self._trim_due():        # the job has started: time for the trimming
                self._trim(cursor)
        self._run(update)

    def trim_if_due(self):
        """Trim the history and the change rows when 50 jobs have finished since the last time
        (``set_process`` does it too, as a job starts)."""
        if self._trim_due():
            self._run(self._trim)

    def running_elsewhere(self):
        """The jobs stored as running at other servers, as ``status`` shows them."""
        def read(cursor):
            cursor.execute("SELECT jobnumber, priority, task, pid, started, server FROM jobqueue_job WHERE "
                           "state = 'running' AND server != %s ORDER BY jobnumber", (self.name,))
            return cursor.fetchall()
        now = time.time()
        jobs = [{'jobnumber': number, 'priority': priority, 'task': json.loads(task), 'pid': pid, 'started': started,
                 'running_for': max(0.0, now - (started or now)), 'server': server}
                for number, priority, task, pid, started, server in self._run(read)]
        return [{key: value for key, value in job.items() if value is not None} for job in jobs]

    def claim_running(self):
        """(A new leader.)  The jobs stored as running - at servers that led before, whose fences
        ended them before this lease began, or here in an earlier term - now ours: StoredJobs."""
        def claim(cursor):
            self._change(cursor, None, None)
            cursor.execute("SELECT %s FROM jobqueue_job WHERE state = 'running' ORDER BY jobnumber"
                           % ', '.join(COLUMNS))
            rows = [StoredJob(row[0], row[1], json.loads(row[2]), *row[3:]) for row in cursor.fetchall()]
            cursor.execute("UPDATE jobqueue_job SET server = %s WHERE state = 'running'", (self.name,))
            return rows
        return self._run(claim)

    def finish(self, job, started, ended, exitcode, status, output):
        self._run(lambda cursor: self._finish(cursor, job, started, ended, exitcode, status, output))

    def set_output(self, jobnumber, output):
        self._run(lambda cursor: cursor.execute('UPDATE jobqueue_history SET output = %s WHERE jobnumber = %s',
                                                (output, jobnumber)))

    def without_output(self, jobnumbers):
        wanted = set(jobnumbers)
        if not wanted:
            return []

        def read(cursor):
            cursor.execute("SELECT jobnumber FROM jobqueue_history WHERE output = '' AND jobnumber BETWEEN %s AND %s",
                           (min(wanted), max(wanted)))
            return sorted(row[0] for row in cursor.fetchall() if row[0] in wanted)
        return self._run(read)

    def _finish(self, cursor, job, started, ended, exitcode, status, output):
        # Only the server that runs a job records its end: one that lost the lease meanwhile
        # leaves the row to the next leader, which runs the job again.
        cursor.execute('DELETE FROM jobqueue_job WHERE jobnumber = %s AND server = %s', (job.jobnumber, self.name))
        if cursor.rowcount != 1:
            return
        self._change(cursor, job.jobnumber, 'done')       # a copy another server still shows goes
        cursor.execute(self.dialect.upsert('jobqueue_history', 'jobnumber',
                                           ('priority', 'task', 'started', 'ended', 'exitcode', 'status', 'output',
                                            'server')),
                       (job.jobnumber, job.priority, json.dumps(list(job.task)), started, ended, exitcode, status,
                        output, self.name))
        self._finished += 1
        if self._trim_due():
            self._trim(cursor)

    def _trim_due(self):
        return self._finished >= self._trimmed + 50

    def _trim(self, cursor):
        """(In a transaction.)  Keep ``history_size`` finished jobs, and the newest change rows."""
        self._trimmed = self._finished
        cursor.execute('SELECT jobnumber FROM jobqueue_history ORDER BY jobnumber DESC LIMIT 1 OFFSET %s',
                       (self.history_size,))
        row = cursor.fetchone()
        if row:
            cursor.execute('DELETE FROM jobqueue_history WHERE jobnumber <= %s', (row[0],))
            cursor.execute('DELETE FROM jobqueue_attempt WHERE jobnumber <= %s', (row[0],))
            cursor.execute('DELETE FROM jobqueue_scheduled WHERE jobnumber <= %s', (row[0],))
        cursor.execute('SELECT seq FROM jobqueue_meta WHERE id = 1')
        seq = cursor.fetchone()[0]
        if seq > CHANGES_KEPT:
            cursor.execute('DELETE FROM jobqueue_change WHERE seq <= %s', (seq - CHANGES_KEPT,))
            cursor.execute('UPDATE jobqueue_meta SET trimmed = %s WHERE id = 1 AND trimmed < %s',
                           (seq - CHANGES_KEPT, seq - CHANGES_KEPT))

    def history(self, limit=20, with_output=True):
        columns = HISTORY_COLUMNS if with_output else HISTORY_COLUMNS[:-1]

        def read(cursor):
            cursor.execute('SELECT %s FROM jobqueue_history ORDER BY jobnumber DESC LIMIT %%s' % ', '.join(columns),
                           (min(limit, self.history_size),))
            rows = cursor.fetchall()
            return rows, self._attempts(cursor, [row[0] for row in rows])
        rows, attempts = self._run(read)
        return [_history_dict(row, attempts, columns) for row in rows]

    def _attempts(self, cursor, jobnumbers):
        found = {}
        if jobnumbers:
            low, high = min(jobnumbers), max(jobnumbers)
            cursor.execute('SELECT jobnumber, schedule FROM jobqueue_scheduled WHERE jobnumber BETWEEN %s AND %s',
                           (low, high))
            for number, name in cursor.fetchall():
                found[('schedule', number)] = name
            cursor.execute('SELECT jobnumber, started, ended, exitcode, output FROM jobqueue_attempt WHERE jobnumber '
                           'BETWEEN %s AND %s ORDER BY id', (low, high))
            for number, started, ended, exitcode, output in cursor.fetchall():
                found.setdefault(number, []).append({'started': started, 'ended': ended, 'exitcode': exitcode,
                                                     'output': printable(output or '')})
        return found

    def finished(self, jobnumber):
        def read(cursor):
            cursor.execute('SELECT %s FROM jobqueue_history WHERE jobnumber = %%s' % ', '.join(HISTORY_COLUMNS),
                           (jobnumber,))
            row = cursor.fetchone()
            return row, (self._attempts(cursor, [jobnumber]) if row else {})
        row, attempts = self._run(read)
        return _history_dict(row, attempts) if row else None

    # ---- what the other servers changed
    def changes(self, after):
        """The changes after number ``after``: ``(seq, [(jobnumber, kind, origin)], {jobnumber: row})``,
        the rows (StoredJobs) of the jobs named, as they are now.  Raises ChangesLost when the
        rows after ``after`` are trimmed."""
        def read(cursor):
            cursor.execute('SELECT seq, trimmed FROM jobqueue_meta WHERE id = 1')
            seq, trimmed = cursor.fetchone()
            if after < trimmed:
                raise ChangesLost()
            if seq == after:
                return seq, [], {}
            # Only the others' changes: this server's own are in its queue already.
            cursor.execute('SELECT seq, jobnumber, kind, origin FROM jobqueue_change WHERE seq > %s AND seq <= %s '
                           'AND origin != %s ORDER BY seq', (after, seq, self.name))
            changes = [row[1:] for row in cursor.fetchall()]
            numbers = sorted({row[0] for row in changes if row[1] not in ('clear', 'pause')})
            rows = {}
            for start in range(0, len(numbers), 500):
                part = numbers[start:start + 500]
                cursor.execute('SELECT %s FROM jobqueue_job WHERE jobnumber IN (%s)'
                               % (', '.join(COLUMNS), ', '.join(['%s'] * len(part))), part)
                for row in cursor.fetchall():
                    rows[row[0]] = StoredJob(row[0], row[1], json.loads(row[2]), *row[3:])
            return seq, changes, rows
        with self._follow_lock:
            return self._follow_db.transaction(read)

    # ---- the lease (see cluster.py)
    def _lease(self, work):
        with self._lease_lock:
            return self._lease_db.transaction(work)

    def acquire(self, ttl, margin):
        """Take the lease if it is free or expired ``margin`` seconds ago (by the database's clock):
        its term, or None."""
        now = self.dialect.now

        def acquire(cursor):
            cursor.execute('UPDATE jobqueue_lease SET holder = %%s, term = term + 1, expires = %s + %%s, since = %s '
                           'WHERE id = 1 AND expires + %%s < %s' % (now, now, now), (self.name, ttl, margin))
            if cursor.rowcount != 1:
                return None
            cursor.execute('SELECT term FROM jobqueue_lease WHERE id = 1')
            return cursor.fetchone()[0]
        return self._lease(acquire)

    def renew(self, term, ttl):
        """Extend our lease of ``term`` by ``ttl`` seconds from now; False when it is not ours."""
        def renew(cursor):
            cursor.execute('UPDATE jobqueue_lease SET expires = %s + %%s WHERE id = 1 AND holder = %%s AND term = %%s'
                           % self.dialect.now, (ttl, self.name, term))
            return cursor.rowcount == 1
        return self._lease(renew)

    def release(self, term):
        """Give up our lease (a stop): a standby may take it at once."""
        self._lease(lambda cursor: cursor.execute(
            "UPDATE jobqueue_lease SET holder = '', expires = 0 WHERE id = 1 AND holder = %s AND term = %s",
            (self.name, term)))

    def lease(self):
        """``{'holder', 'term', 'expires', 'since', 'now'}`` by the database's clock."""
        def read(cursor):
            cursor.execute('SELECT holder, term, expires, since, %s FROM jobqueue_lease WHERE id = 1'
                           % self.dialect.now)
            return dict(zip(('holder', 'term', 'expires', 'since', 'now'), cursor.fetchone()))
        return self._lease(read)

    def seen(self, address):
        """This server is alive (every renewal or look at the lease): for ``status``."""
        def write(cursor):
            cursor.execute('UPDATE jobqueue_server SET address = %s, seen = %s WHERE name = %s',
                           (address, time.time(), self.name))
            if cursor.rowcount == 0:
                cursor.execute('INSERT INTO jobqueue_server VALUES (%s, %s, %s, %s)',
                               (self.name, address, time.time(), time.time()))
        self._lease(write)

    def servers(self):
        """The servers seen in the last ten minutes: ``[{'name', 'address', 'started', 'seen'}]``."""
        def read(cursor):
            cursor.execute('SELECT name, address, started, seen FROM jobqueue_server WHERE seen > %s ORDER BY name',
                           (time.time() - 600,))
            return [dict(zip(('name', 'address', 'started', 'seen'), row)) for row in cursor.fetchall()]
        return self._lease(read)


def _history_dict(row, attempts, columns=HISTORY_COLUMNS):
    record = dict(zip(columns, row))
    record['task'] = json.loads(record['task'])
    if record.get('output'):
        record['output'] = printable(record['output'])
    if record['jobnumber'] in attempts:
        record['attempts'] = attempts[record['jobnumber']]
    if ('schedule', record['jobnumber']) in attempts:
        record['schedule'] = attempts[('schedule', record['jobnumber'])]
    return record
