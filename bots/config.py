"""Configuration: the ``-c<directory>`` option and ``bots.ini``, read as Bots reads it.

Relative paths (the configuration directory, ``[directories] botssys``) are
taken from the working directory, like any other command-line path.  When the
named configuration directory does not exist there, the one bundled inside
the package is tried (so the default ``config`` works out of the box).
"""
import configparser
import os
import sys

from . import __version__

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class ConfigError(Exception):
    """A configuration problem the user must fix; its text is one line."""


class BotsIni:
    """bots.ini with Bots-style reads: every read names its own default."""

    def __init__(self, parser):
        self._parser = parser

    def get(self, section, option, default=''):
        try:
            return self._parser.get(section, option)
        except (configparser.NoSectionError, configparser.NoOptionError):
            return default

    def getint(self, section, option, default):
        value = self.get(section, option, None)
        if value is None or not value.strip():
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError('[%s] %s should be a whole number, not %r' % (section, option, value))

    def getfloat(self, section, option, default):
        value = self.get(section, option, None)
        if value is None or not value.strip():
            return default
        try:
            return float(value)
        except ValueError:
            raise ConfigError('[%s] %s should be a number, not %r' % (section, option, value))

    def getboolean(self, section, option, default):
        value = self.get(section, option, None)
        if value is None or not value.strip():
            return default
        lowered = value.strip().lower()
        if lowered in ('1', 'yes', 'true', 'on'):
            return True
        if lowered in ('0', 'no', 'false', 'off'):
            return False
        raise ConfigError('[%s] %s should be True or False, not %r' % (section, option, value))

    def sections(self):
        return self._parser.sections()


class Environment:
    """One Bots environment: its configuration directory, bots.ini and botssys."""

    def __init__(self, configdir, ini, botssys):
        self.configdir = configdir
        self.ini = ini
        self.botssys = botssys

    @property
    def logdir(self):
        return os.path.join(self.botssys, 'logging')

    def require_jobqueue_enabled(self):
        if not self.ini.getboolean('jobqueue', 'enabled', False):
            raise ConfigError('Error: bots jobqueue cannot start; not enabled in %s'
                              % os.path.join(self.configdir, 'bots.ini'))

    # [settings] shared by server, client and directory monitor
    @property
    def python_executable_path(self):
        return self.ini.get('settings', 'python_executable_path', '') or sys.executable

    @property
    def botsengine_path(self):
        default = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), 'bots-engine.py')
        return self.ini.get('settings', 'botsengine_path', '') or default

    @property
    def port(self):
        return self.ini.getint('jobqueue', 'port', 28082)


def find_configdir(name):
    """The configuration directory named by ``-c`` (default ``config``), as an absolute path."""
    candidates = [os.path.abspath(name)]
    if not os.path.isabs(name):
        candidates.append(os.path.join(PACKAGE_DIR, name))
    for candidate in candidates:
        if os.path.isdir(candidate):
            return candidate
    raise ConfigError('Error: configuration directory "%s" does not exist' % name)


def load(configdir_name='config'):
    """Read ``<configdir>/bots.ini``; raise ConfigError with a one-line text on any problem."""
    configdir = find_configdir(configdir_name)
    inifile = os.path.join(configdir, 'bots.ini')
    if not os.path.isfile(inifile):
        raise ConfigError('Error: no bots.ini in configuration directory "%s"' % configdir)
    parser = configparser.RawConfigParser(strict=False)
    try:
        with open(inifile, encoding='utf-8') as handle:
            parser.read_file(handle)
    except (configparser.Error, UnicodeDecodeError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError('Error: cannot read %s: %s' % (inifile, first_line))
    ini = BotsIni(parser)
    botssys = os.path.abspath(ini.get('directories', 'botssys', 'botssys') or 'botssys')
    return Environment(configdir, ini, botssys)


def split_configdir_option(arg):
    """The directory of a ``-c<directory>`` argument; ConfigError when it is empty."""
    directory = arg[2:]
    if not directory:
        raise ConfigError('Error: configuration directory indicated, but no directory name.')
    return directory


HELP_OPTIONS = ('-h', '--help', '?', '/?')


def configdir_from_args(argv, name, usage):
    """The ``-c`` directory of a program whose only option is ``-c``; usage and exit 0 on help."""
    configdir = 'config'
    for arg in argv:
        if arg in HELP_OPTIONS:
            print(usage % {'name': name, 'version': __version__})
            sys.exit(0)
        elif arg.startswith('-c'):
            configdir = split_configdir_option(arg)
        else:
            raise ConfigError('Error: unknown option "%s"; see %s --help' % (arg, name))
    return configdir
