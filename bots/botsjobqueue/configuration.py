"""Configuration: the ``-c<directory>`` option and ``bots.ini``, read as Bots reads it.

Where relative paths (the configuration directory, ``[directories] botssys``)
lead depends on where the package is installed:

- *inside Bots* (installed into the Python that holds Bots, so that Bots' own
  modules lie beside ours in the ``bots`` package directory): as Bots resolves
  them.  ``-c<name>`` is the directory ``<name>`` in the Bots package directory
  when there is one, else ``<name>`` in the working directory; a relative
  botssys lies in the Bots package directory.  So ``-cconfig`` is Bots' own
  ``bots/config`` and the log lands in Bots' ``botssys/logging``.
- *beside Bots* (own virtual environment) with ``-c`` naming the ``config``
  directory inside a Bots installation: a relative botssys lies in that Bots
  package directory too, and Bots' programs are looked for in that
  installation's scripts directory;
- *standalone* (own virtual environment, a checkout): from the working
  directory; when there is no ``config`` there, the configuration bundled with
  this package (``bots/botsjobqueue/config``) is used.

Bots 4 keeps its configuration outside its package: without ``-c``, inside
Bots 4, the directory is ``$BOTS_CONFIG_DIR``, else
``~/.bots/env/$BOTSENV/config`` (``BOTSENV`` by default ``default``), as
Bots 4's ``botsinit.generalinit`` chooses it.  A relative botssys of a Bots 4
configuration lies beside that directory (in its Bots environment), and its
logs go where Bots 4 keeps them, in its format.  Beside Bots 4, the Bots
installation is the one of the configured ``python_executable_path``, else
of the ``bots-engine`` on the PATH.

Where Bots is and which Bots it is: ``botsinstall.py``.

Times: where the configuration's ``settings.py`` names Django's
``TIME_ZONE``, the programs keep that zone's clock, as Bots' own programs
do (Django sets it for the whole process): the log, the schedules' default
zone and the times ``bots-jobqueue`` shows.
"""
import configparser
import functools
import os
import sys

from . import BOTS_VERSIONS, __version__, codes
from .botsinstall import (
    BUNDLED_CONFIG, ENGINE_NAMES, bots_dir, bots_generation, bots4_configdir,
    read_settings, is_bots4_settings, settings_time_zone, apply_time_zone, bots4_beside,
    bots_version, scripts_dirs, find_program, served_bots, bots_scripts_dir)


class ConfigError(Exception):
    """A problem the user must fix (configuration, options); its text is one line that starts
    with ``Error:``."""

    def __str__(self):
        text = super().__str__()
        return text if text.startswith('Error') else 'Error: ' + text


def usage_error(message, name):
    """A ConfigError for a wrong command line, with the hint where to look."""
    return ConfigError('Error: %s; see %s --help' % (message, name))


def ini_syntax_error(inifile, exc):
    """A one-line ConfigError for a bots.ini that configparser cannot read: file, line, problem."""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        where, what = exc.lineno, '"%s" comes before any [section]' % exc.line.strip()
    elif isinstance(exc, configparser.ParsingError):
        where, line = exc.errors[0]
        try:
            import ast
            line = ast.literal_eval(line)    # configparser keeps the line as its repr
        except (ValueError, SyntaxError):
            pass
        what = '"%s" is not "key = value" or "[section]"' % line.strip()
        if len(exc.errors) > 1:
            what += ' (and %d more such lines)' % (len(exc.errors) - 1)
    elif isinstance(exc, UnicodeDecodeError):
        where, what = None, 'not UTF-8 text (%s)' % exc.reason
    elif isinstance(exc, OSError):
        where, what = None, exc.strerror or str(exc)
    else:
        where = getattr(exc, 'lineno', None)
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError('Error: cannot read %s%s: %s' % (inifile, ', line %s' % where if where else '', what))


class BotsIni:
    """bots.ini with Bots-style reads: every read names its own default."""

    def __init__(self, parser, path=''):
        self._parser = parser
        self.path = path

    def _wrong(self, section, option, kind, value):
        return ConfigError('Error: [%s] %s should be %s, not %r (in %s)' % (section, option, kind, value, self.path))

    def get(self, section, option, default=''):
        try:
            return self._parser.get(section, option)
        except (configparser.NoSectionError, configparser.NoOptionError):
            return default

    def getint(self, section, option, default):
        return self._number(section, option, default, int, 'a whole number')

    def getfloat(self, section, option, default):
        return self._number(section, option, default, float, 'a number')

    def _number(self, section, option, default, convert, kind):
        value = self.get(section, option, None)
        if value is None or not value.strip():
            return default
        try:
            return convert(value)
        except ValueError:
            raise self._wrong(section, option, kind, value)

    def getboolean(self, section, option, default):
        value = self.get(section, option, None)
        if value is None or not value.strip():
            return default
        lowered = value.strip().lower()
        if lowered in ('1', 'yes', 'true', 'on'):
            return True
        if lowered in ('0', 'no', 'false', 'off'):
            return False
        raise self._wrong(section, option, 'True or False', value)

    def sections(self):
        return self._parser.sections()

    def options(self, section):
        try:
            return self._parser.options(section)
        except configparser.NoSectionError:
            return []


LOG_KEYS = ('log_level', 'log_file_level', 'log_file_number', 'log_console', 'log_console_level')
# The keys each section the job queue reads may hold: its own, and those Bots itself writes there.
KNOWN_KEYS = {
    'jobqueue': ('enabled', 'port', 'host', 'nr_threads', 'lauchfrequency', 'killjobsintimeout', 'authorized_tasks',
                 'client_timeout', 'history', 'kill_grace', 'shutdown_grace', 'locked_retry_delay',
                 'locked_report_after', 'output_limit', 'max_connections', 'request_timeout', 'max_request_size',
                 'max_task_size', 'max_task_args', 'max_queue_bytes', 'status_page', 'store', 'lease_ttl',
                 'lease_margin', 'fence_grace', 'secret', 'secret_file', 'require_secret') + LOG_KEYS,
    'dirmonitor': ('quiet_period', 'priority', 'process_existing', 'polling', 'polling_interval', 'retry_max',
                   'write_pause_limit', 'trigger', 'lauchfrequency') + LOG_KEYS,
    'dirmonitorN': ('path', 'filemask', 'recursive', 'route', 'priority', 'polling'),
    'schedule': ('timezone', 'catchup'),
    'scheduleN': ('when', 'task', 'arguments', 'priority', 'enabled', 'timezone', 'catchup'),
}


def unknown_keys(ini, families):
    """One line for each key the job queue does not know in the sections of ``families``
    ('jobqueue', 'dirmonitor', 'schedule': the section and its numbered kin), with the nearest
    known key: a misspelt key would otherwise be silently without effect."""
    import difflib
    lines = []
    for section in ini.sections():
        for family in families:
            if section == family:
                known = KNOWN_KEYS[family]
            elif section.startswith(family) and family + 'N' in KNOWN_KEYS:
                known = KNOWN_KEYS[family + 'N']
            else:
                continue
            for key in ini.options(section):
                if key not in known:
                    near = difflib.get_close_matches(key, known, 1, 0.6)
                    lines.append('[%s] %s is not a key the job queue knows%s; it has no effect (in %s).'
                                 % (section, key, ' (did you mean %s?)' % near[0] if near else '', ini.path))
    return lines


class Environment:
    """One Bots environment: its configuration directory, bots.ini and botssys."""

    def __init__(self, configdir, ini, botssys, bots_dir=None, inside_bots=False, bots4=False, rule='',
                 time_zone=None):
        self.configdir = configdir
        self.ini = ini
        self.botssys = botssys
        self.bots_dir = bots_dir            # package directory of the Bots this configuration is of
        self.inside_bots = inside_bots      # installed into that Bots' own Python
        self.bots4 = bots4                  # a configuration of Bots 4: its log places and format
        self.rule = rule                    # which rule chose the configuration directory, for the log
        self.time_zone = time_zone          # settings.py's TIME_ZONE (a ZoneInfo), or None

    @property
    def logdir(self):
        return os.path.join(self.botssys, 'logging')

    def logfile(self, program):
        """Where ``program`` (jobqueue, dirmonitor) logs: ``botssys/logging/<program>.log``, or for
        Bots 4 in the folder of its own that Bots 4's monitor lists."""
        if self.bots4:
            return os.path.join(self.logdir, program, program + '.log')
        return os.path.join(self.logdir, program + '.log')

    def require_jobqueue_enabled(self):
        if not self.ini.getboolean('jobqueue', 'enabled', False):
            raise ConfigError('Error: bots jobqueue cannot start; not enabled in %s'
                              % os.path.join(self.configdir, 'bots.ini'))

    # [settings] shared by server, client and directory monitor; each looked for once
    @functools.cached_property
    def bots_scripts(self):
        """The scripts directory of the Bots installation served, or None."""
        return bots_scripts_dir(self.bots_dir) if self.bots_dir else None

    @functools.cached_property
    def python_executable_path(self):
        """The configured Python; by default the running one, or - beside Bots - Bots' own."""
        configured = self.ini.get('settings', 'python_executable_path', '')
        if configured:
            return configured
        if self.bots_dir and not self.inside_bots and self.bots_scripts:
            found = find_program('python', [self.bots_scripts]) or find_program('python3', [self.bots_scripts])
            if found:
                return found
        return sys.executable

    @functools.cached_property
    def engine_dirs(self):
        """Where Bots' own programs are: the scripts directory of the configured Python, and of
        the Bots installation served."""
        dirs = scripts_dirs(self.python_executable_path)
        if self.bots_scripts and self.bots_scripts not in dirs:
            dirs.append(self.bots_scripts)
        return dirs

    @functools.cached_property
    def botsengine_path(self):
        """The configured engine; by default ``bots-engine`` or ``bots-engine.py``, whichever is
        installed beside the configured Python, beside this program or on the PATH.  A bare
        configured name is looked for in the same places."""
        import shutil
        configured = self.ini.get('settings', 'botsengine_path', '')
        here = os.path.dirname(os.path.abspath(sys.argv[0]))
        if configured:
            if os.sep in configured or (os.altsep and os.altsep in configured):
                return configured
            # A bare name is looked for where the default is: the job sent is [python, engine],
            # and Python opens its script by path, not on the PATH.
            return find_program(configured, self.engine_dirs + [here]) or shutil.which(configured) or configured
        for name in ENGINE_NAMES:
            found = find_program(name, self.engine_dirs + [here])
            if found:
                return found
        for name in ENGINE_NAMES:
            found = shutil.which(name)
            if found:
                return found
        return os.path.join(here, 'bots-engine.py')

    @property
    def port(self):
        return self.ini.getint('jobqueue', 'port', codes.DEFAULT_PORT)

    @property
    def client_host(self):
        """Where our clients find the server: ``[jobqueue] host``; this machine when the server
        listens on every address (or no host is given)."""
        host = self.ini.get('jobqueue', 'host', '').strip()
        return '127.0.0.1' if host in ('', '0.0.0.0', '::', '*') else host

    @functools.cached_property
    def secret(self):
        """The shared secret of ``[jobqueue] secret``, or of the file ``secret_file`` names (its
        first line); '' when none is set.  Raises ConfigError for a file that cannot be read."""
        secret = self.ini.get('jobqueue', 'secret', '').strip()
        path = self.ini.get('jobqueue', 'secret_file', '').strip()
        if path and not secret:
            path = os.path.join(self.configdir, os.path.expanduser(path))
            try:
                with open(path, encoding='utf-8') as handle:
                    secret = handle.readline().strip()
            except OSError as exc:
                raise ConfigError('Error: [jobqueue] secret_file = %s cannot be read (%s).'
                                  % (path, exc.strerror or exc))
            if not secret:
                raise ConfigError('Error: [jobqueue] secret_file = %s is empty.' % path)
        return secret

    @property
    def client_timeout(self):
        """Seconds a client (bots-job2queue, bots-jobqueue, the dirmonitor) waits for an answer."""
        return self.ini.getfloat('jobqueue', 'client_timeout', 10.0)


def find_configdir(name, inside_bots=None):
    """The configuration directory named by ``-c`` (default ``config``), as an absolute path."""
    if os.path.isabs(name):
        candidates = [name]
    elif inside_bots:
        candidates = [os.path.join(inside_bots, name), os.path.abspath(name)]
    else:
        candidates = [os.path.abspath(name)]
        if os.path.normpath(name) == 'config':
            candidates.append(BUNDLED_CONFIG)
    for candidate in candidates:
        if os.path.isdir(candidate):
            return candidate
    raise ConfigError('Error: configuration directory "%s" does not exist' % name)


def load(configdir_name=None, clock=True):
    """Read ``<configdir>/bots.ini`` of an environment whose job queue is enabled; raise
    ConfigError with a one-line text on any problem.  ``configdir_name``: the ``-c`` directory,
    None when none was given.  ``clock``: take the time zone of settings.py (a client that only
    queues a job shows no time, and starts faster without it)."""
    inside_bots = bots_dir()
    inside_bots4 = bool(inside_bots) and bots_generation(inside_bots) == 4
    if configdir_name is None and inside_bots4:
        configdir, rule = bots4_configdir()
        if not os.path.isdir(configdir):
            raise ConfigError('Error: configuration directory "%s" (chosen by %s, as Bots 4 does) does not exist; '
                              'Bots 4 makes it at the first run of one of its programs (bots-webserver, say)'
                              % (configdir, rule))
    else:
        configdir = find_configdir(configdir_name or 'config', inside_bots)
        rule = '-c' if configdir_name is not None else 'the default, config'
    inifile = os.path.join(configdir, 'bots.ini')
    if not os.path.isfile(inifile):
        raise ConfigError('Error: no bots.ini in configuration directory "%s"' % configdir)
    parser = configparser.RawConfigParser(strict=False)
    try:
        with open(inifile, encoding='utf-8') as handle:
            parser.read_file(handle)
    except (configparser.Error, UnicodeDecodeError, OSError) as exc:
        raise ini_syntax_error(inifile, exc)
    ini = BotsIni(parser, inifile)
    settings = read_settings(configdir)
    bots4 = inside_bots4 or is_bots4_settings(settings)
    botssys = ini.get('directories', 'botssys', 'botssys') or 'botssys'
    if bots4:
        served = inside_bots or bots4_beside(ini)
        # As Bots 4: a relative botssys lies in the Bots environment, beside the configuration.
        botssys = os.path.join(os.path.dirname(configdir), botssys)
    else:
        served = served_bots(configdir, inside_bots)
        botssys = os.path.join(served, botssys) if served else os.path.abspath(botssys)
    zone_name = settings_time_zone(settings) if clock else ''
    time_zone = apply_time_zone(zone_name) if zone_name else None
    environment = Environment(configdir, ini, os.path.normpath(botssys), served, bool(inside_bots), bots4, rule,
                              time_zone)
    environment.require_jobqueue_enabled()
    return environment


def split_configdir_option(arg):
    """The directory of a ``-c<directory>`` argument; ConfigError when it is empty."""
    directory = arg[2:]
    if not directory:
        raise ConfigError('Error: configuration directory indicated, but no directory name; write it joined '
                          'to -c, as -c/path/to/config, not -c /path/to/config')
    return directory


def say_if_bundled(environment, name):
    """A client that fell back to the bundled configuration (no config/ here) says so, in one
    line on standard error: which file, which port."""
    if os.path.normcase(environment.configdir) == os.path.normcase(BUNDLED_CONFIG):
        print('%s: no config/ here; using the bundled configuration %s (port %s).'
              % (name, os.path.join(environment.configdir, 'bots.ini'), environment.port), file=sys.stderr)


HELP_OPTIONS = ('-h', '--help', '?', '/?')


def stdout_gone():
    """Standard output was closed by its reader (``| head``): nothing more to say, no traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(0)


def print_usage(usage, name):
    """Print the usage text and exit 0."""
    try:
        inside = bots_dir()
        served = 'installed in Bots %s here' % (bots_version(inside) or '(version unknown)') if inside else \
            'for Bots %s' % BOTS_VERSIONS
        print(usage % {'name': name, 'version': 'bots-jobqueue %s, %s' % (__version__, served)}, end='')
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_gone()
    sys.exit(0)


def configdir_from_args(argv, name, usage):
    """The ``-c`` directory of a program whose only option is ``-c`` (None when not given);
    usage and exit 0 on help."""
    configdir = None
    for arg in argv:
        if arg in HELP_OPTIONS:
            print_usage(usage, name)
        elif arg.startswith('-c'):
            configdir = split_configdir_option(arg)
        else:
            raise usage_error('unknown option "%s"' % arg, name)
    return configdir
