"""Which store a server uses: ``[jobqueue] store`` of bots.ini.

* empty or ``sqlite`` (the default): SQLite in botssys, for one machine.  Refused on a network
  file system (NFS, SMB/CIFS, FUSE and the like: see ``/proc/mounts``), where SQLite's locks
  are not safe; the refusal points at the database store.
* ``database``: the database Bots itself uses, the ``DATABASES['default']`` entry of the
  configuration's settings.py (PostgreSQL or MySQL/MariaDB), read from its text - settings.py
  is not imported, it needs Django.
* a URL, ``postgresql://user:password@host:port/dbname`` or ``mysql://...`` (MariaDB too).
"""
import ast
import os
import sys

from . import botsinstall
from .configuration import ConfigError

NETWORK_FILE_SYSTEMS = ('nfs', 'nfs4', 'cifs', 'smb', 'smb3', 'smbfs', 'fuse', '9p', 'ceph', 'glusterfs', 'lustre',
                        'gpfs', 'afs', 'davfs', 'sshfs', 'beegfs', 'ncpfs', 'virtiofs')


def kind_of_store(ini):
    """'sqlite' or 'database' (a URL or settings.py's database)."""
    value = ini.get('jobqueue', 'store', '').strip()
    return 'sqlite' if value.lower() in ('', 'sqlite') else 'database'


def file_system(path, mounts='/proc/mounts'):
    """The type of the file system ``path`` is on (Linux: the mount table ``mounts``), or ''."""
    path = os.path.realpath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    best, kind = '', ''
    try:
        with open(mounts) as handle:
            for line in handle:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace('\\040', ' ')
                if (path == mount or path.startswith(mount.rstrip('/') + '/')) and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        return ''
    return kind


def on_network(path, mounts='/proc/mounts'):
    """The network file system type ``path`` lies on, or '' when it is local (or unknown)."""
    kind = file_system(path, mounts)
    base = kind.split('.')[0]
    return kind if base in NETWORK_FILE_SYSTEMS or base.startswith('fuse') else ''


def check_sqlite_place(botssys, mounts='/proc/mounts'):
    """Refuse (ConfigError, one line) an SQLite store on a network file system."""
    kind = on_network(botssys, mounts)
    if kind:
        raise ConfigError('Error: botssys %s is on a network file system (%s), where SQLite\'s locks are not safe; '
                          'keep the job queue in a database instead: [jobqueue] store = database (Bots\' own '
                          'database) or store = postgresql://... (see README, "More than one machine").'
                          % (botssys, kind))


def database_of(environment):
    """``(kind, connection arguments)`` of the database store; raises ConfigError."""
    from . import dbstore
    value = environment.ini.get('jobqueue', 'store', '').strip()
    try:
        if value.lower() != 'database':
            return dbstore.parse_url(value)
        return dbstore.from_django(settings_database(environment.configdir))
    except ValueError as exc:
        raise ConfigError('Error: [jobqueue] store = %s: %s.' % (_shown(value), exc))


def _shown(value):
    """The store key as a message shows it: no password."""
    if '://' in value and '@' in value:
        scheme, rest = value.split('://', 1)
        return '%s://%s@%s' % (scheme, rest.split('@', 1)[0].split(':', 1)[0], rest.split('@', 1)[1])
    return value


def settings_database(configdir):
    """The ``DATABASES['default']`` entry of settings.py, from its text; ValueError when it
    cannot be read without running it."""
    text = botsinstall.read_settings(configdir)
    if not text:
        raise ValueError('there is no settings.py in %s' % configdir)
    try:
        tree = ast.parse(text)
    except SyntaxError as exc:
        raise ValueError('settings.py cannot be read (%s)' % exc)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(target, ast.Name) and target.id == 'DATABASES'
                                                for target in node.targets):
            entry = _default_entry(node.value)
            if entry is not None:
                return entry
    raise ValueError('settings.py names no DATABASES "default" entry of plain values; give the database as a '
                     'URL: store = postgresql://user:password@host:port/dbname')


def _default_entry(node):
    if not isinstance(node, ast.Dict):
        return None
    for key, value in zip(node.keys, node.values):
        if isinstance(key, ast.Constant) and key.value == 'default' and isinstance(value, ast.Dict):
            entry = {}
            for name, item in zip(value.keys, value.values):
                if isinstance(name, ast.Constant) and name.value in ('ENGINE', 'NAME', 'USER', 'PASSWORD', 'HOST',
                                                                     'PORT'):
                    try:
                        entry[name.value] = ast.literal_eval(item)
                    except ValueError:
                        if name.value != 'NAME' or 'sqlite' not in str(entry.get('ENGINE', '')):
                            return None
            return entry
    return None


def open_store(environment, history, logger):
    """The store this server uses; raises ConfigError (one line) when it cannot be opened."""
    from .store import DamagedStore, Store
    if kind_of_store(environment.ini) == 'sqlite':
        check_sqlite_place(environment.botssys)
        try:
            return Store(os.path.join(environment.botssys, 'jobqueue.db'), history)
        except DamagedStore as exc:
            logger.critical('%s', exc)
            raise ConfigError(str(exc))
    if sys.platform == 'win32':
        raise ConfigError('Error: [jobqueue] store = database needs a POSIX system for its fence (see README, '
                          '"More than one machine"); on Windows keep the default SQLite store.')
    from . import dbstore
    kind, arguments = database_of(environment)
    try:
        store = dbstore.DatabaseStore(kind, arguments, history)
    except ImportError:
        extra = 'postgresql' if kind == 'postgresql' else 'mysql'
        raise ConfigError('Error: [jobqueue] store names a %s database, but its driver is not installed: pip install '
                          '"bots-jobqueue[%s]".' % ('PostgreSQL' if kind == 'postgresql' else 'MySQL/MariaDB', extra))
    except OSError as exc:
        raise ConfigError('Error: the job store cannot be opened: %s.' % exc)
    return store
