"""A real PostgreSQL and a real MariaDB for the tests: Debian's servers, each a cluster of its own
in a temporary directory, on a free loopback port, started once per test run and stopped at its end.

PostgreSQL refuses to run as root: there the cluster runs as the system user ``postgres`` (the
Debian package makes it), elsewhere as whoever runs the tests.  MariaDB runs as the current user
(``--user`` for root).  Each is reached over TCP on 127.0.0.1, as Bots' own settings.py would.
"""
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

PG_BINARIES = sorted(glob.glob('/usr/lib/postgresql/*/bin'))


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _wait_for_port(port, process, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError('%s ended at its start with %s' % (what, process.returncode))
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError('%s does not listen on port %d' % (what, port))


class PostgreSQL:
    """A PostgreSQL cluster; ``url`` is the store URL of its database ``bots``."""

    kind = 'postgresql'

    def __init__(self, directory):
        if not PG_BINARIES:
            raise RuntimeError('PostgreSQL is not installed (apt-get install postgresql)')
        self.bin = PG_BINARIES[-1]
        if os.geteuid() == 0:
            # The cluster's user must reach its directory: pytest's own are its owner's alone.
            directory = tempfile.mkdtemp(prefix='bots-jobqueue-postgresql-')
        self.directory = directory
        self.data = os.path.join(directory, 'data')
        self.port = free_port()
        self.user = 'bots'
        self.password = 'botsbots'
        self._as = []
        if os.geteuid() == 0:
            self._as = ['runuser', '-u', 'postgres', '--']
            os.chmod(directory, 0o755)
            shutil.chown(directory, 'postgres')
        self.process = None

    def _run(self, *command, **kwargs):
        return subprocess.run(self._as + list(command), check=True, capture_output=True, text=True, **kwargs)

    def start(self):
        pwfile = os.path.join(self.directory, 'pw')
        with open(pwfile, 'w') as handle:
            handle.write(self.password)
        if self._as:
            shutil.chown(pwfile, 'postgres')
        self._run(os.path.join(self.bin, 'initdb'), '-D', self.data, '-U', self.user, '--pwfile', pwfile,
                  '-A', 'scram-sha-256', '-E', 'UTF8')
        with open(os.path.join(self.data, 'postgresql.conf'), 'a') as handle:
            handle.write("listen_addresses = '127.0.0.1'\nport = %d\nunix_socket_directories = '%s'\n"
                         "fsync = on\nmax_connections = 200\n" % (self.port, self.directory))
        self._run_server()
        self.sql('CREATE DATABASE bots', database='postgres')
        return self

    def _run_server(self):
        self.process = subprocess.Popen(self._as + [os.path.join(self.bin, 'postgres'), '-D', self.data],
                                        stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.directory,
                                                                                            'server.log'), 'a'))
        _wait_for_port(self.port, self.process, 'PostgreSQL')
        # It listens before it takes sessions ("the database system is starting up").
        deadline = time.monotonic() + 60
        while True:
            try:
                self.connect(database='postgres').close()
                return
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.1)

    def restart(self, down=0.0):
        """Stop the database server (fast shutdown: sessions are ended), wait ``down`` seconds, start it again."""
        self.stop()
        time.sleep(down)
        self._run_server()

    @property
    def url(self):
        return 'postgresql://%s:%s@127.0.0.1:%d/bots' % (self.user, self.password, self.port)

    def connect(self, database='bots'):
        import psycopg
        return psycopg.connect(host='127.0.0.1', port=self.port, user=self.user, password=self.password,
                               dbname=database, autocommit=True)

    def sql(self, statement, params=(), database='bots'):
        """Run one statement; its rows (or [])."""
        with self.connect(database) as connection:
            cursor = connection.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def terminate(self, application_name_like):
        """End the database sessions whose application name matches (as an operator would)."""
        return self.sql('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s '
                        'AND pid != pg_backend_pid()', (application_name_like,))

    def stop(self):
        """Fast shutdown (SIGINT to the postmaster itself: runuser, its parent as root, passes no
        SIGINT on), and wait until it is gone."""
        try:
            with open(os.path.join(self.data, 'postmaster.pid')) as handle:
                postmaster = int(handle.readline())
        except (OSError, ValueError):
            postmaster = None
        if postmaster:
            try:
                os.kill(postmaster, signal.SIGINT)
            except ProcessLookupError:
                postmaster = None
        deadline = time.monotonic() + 30
        while postmaster and time.monotonic() < deadline:
            try:
                os.kill(postmaster, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            if postmaster:
                os.kill(postmaster, signal.SIGKILL)
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def remove(self):
        self.stop()
        if self._as:
            shutil.rmtree(self.directory, ignore_errors=True)


class MariaDB:
    """A MariaDB server; ``url`` is the store URL of its database ``bots``."""

    kind = 'mysql'

    def __init__(self, directory):
        self.directory = directory
        self.data = os.path.join(directory, 'data')
        self.port = free_port()
        self.user = 'bots'
        self.password = 'botsbots'
        self.process = None
        self.socket = os.path.join(directory, 'mysqld.sock')

    def start(self):
        install = shutil.which('mariadb-install-db') or shutil.which('mysql_install_db')
        server = shutil.which('mariadbd') or shutil.which('mysqld') or '/usr/sbin/mariadbd'
        if install is None or not os.path.exists(server):
            raise RuntimeError('MariaDB is not installed (apt-get install mariadb-server)')
        user = pwd.getpwuid(os.geteuid()).pw_name
        subprocess.run([install, '--no-defaults', '--datadir=' + self.data, '--user=' + user,
                        '--auth-root-authentication-method=normal', '--skip-test-db'],
                       check=True, capture_output=True, text=True)
        self.process = subprocess.Popen(
            [server, '--no-defaults', '--datadir=' + self.data, '--user=' + user, '--port=%d' % self.port,
             '--bind-address=127.0.0.1', '--socket=' + self.socket, '--skip-name-resolve',
             '--pid-file=' + os.path.join(self.directory, 'mysqld.pid'), '--innodb-flush-log-at-trx-commit=1',
             '--log-error=' + os.path.join(self.directory, 'server.log'), '--max-connections=300'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self.process, 'MariaDB')
        import pymysql
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = pymysql.connect(unix_socket=self.socket, user='root', autocommit=True)
                break
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with connection.cursor() as cursor:
            cursor.execute('CREATE DATABASE bots CHARACTER SET utf8mb4')
            cursor.execute("CREATE USER 'bots'@'%%' IDENTIFIED BY '%s'" % self.password)
            cursor.execute("GRANT ALL ON *.* TO 'bots'@'%'")
        connection.close()
        return self

    @property
    def url(self):
        return 'mysql://%s:%s@127.0.0.1:%d/bots' % (self.user, self.password, self.port)

    def connect(self):
        import pymysql
        return pymysql.connect(host='127.0.0.1', port=self.port, user=self.user, password=self.password,
                               database='bots', autocommit=True)

    def sql(self, statement, params=None):
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement, params)
                return list(cursor.fetchall()) if cursor.description else []
        finally:
            connection.close()

    def terminate(self, application_name_like):
        """KILL the sessions of the job queue's servers (MariaDB has no application names: the
        store names its sessions in a user variable we cannot see, so every session of user
        ``bots`` other than this one goes)."""
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute('SELECT id FROM information_schema.processlist WHERE user = %s '
                               'AND id != connection_id()', (self.user,))
                for (session,) in cursor.fetchall():
                    try:
                        cursor.execute('KILL %d' % session)
                    except Exception:      # gone meanwhile
                        pass
        finally:
            connection.close()

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
