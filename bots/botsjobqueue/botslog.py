"""Logging in the Bots way: a daily rotated file in botssys/logging and a console.

Bots adds the level STARTINFO (25), between INFO and WARNING, for the lines
an operator wants to see on the console when a program starts.
"""
import logging
import logging.handlers
import os
import re
import threading
import time

from .botsinstall import BUNDLED_CONFIG, bots_version
from .configuration import ConfigError

STARTINFO = 25
logging.addLevelName(STARTINFO, 'STARTINFO')

# The log format uses none of these; not collecting them makes each record cheaper
# (the logging documentation's own advice for code that logs on every request).
logging._srcfile = None
logging.logThreads = False
logging.logProcesses = False
logging.logMultiprocessing = False

LOG_FORMAT = '%(asctime)s %(levelname)-9s: %(message)s'
DATE_FORMAT = '%Y%m%d %H:%M:%S'
# Bots 4's: the program's logger name in brackets, another date format.
BOTS4_LOG_FORMAT = '%(asctime)s %(levelname)-9s [%(name)s] %(message)s'
BOTS4_DATE_FORMAT = '%Y.%m.%d %H:%M:%S'
BOTS4_LOGGER = {'jobqueue': 'bots.jobqueueserver', 'dirmonitor': 'bots.dirmonitor'}


def zone_converter(zone):
    """A Formatter converter that shows times in ``zone`` (where TZ cannot be set: Windows)."""
    import datetime

    def converter(timestamp):
        return datetime.datetime.fromtimestamp(timestamp, zone).timetuple()
    return converter


def _level(ini, section, option, default):
    name = ini.get(section, option, default).strip().upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ConfigError('[%s] %s: unknown log level %r' % (section, option, name))
    return level


def check(ini, process_name):
    """Read the logging keys of section [process_name] as ``init`` will: ConfigError when wrong."""
    _level(ini, process_name, 'log_file_level', 'INFO')
    _level(ini, process_name, 'log_console_level', 'STARTINFO')
    ini.getint(process_name, 'log_file_number', 30)
    ini.getboolean(process_name, 'log_console', True)


def init(environment, process_name):
    """Set up the logger ``bots.<process_name>`` as bots.ini's section [process_name] says."""
    ini = environment.ini
    name = BOTS4_LOGGER[process_name] if environment.bots4 else 'bots.' + process_name
    logger = logging.getLogger(name)
    logger.handlers[:] = []
    logger.propagate = False
    if environment.bots4:
        formatter = logging.Formatter(BOTS4_LOG_FORMAT, BOTS4_DATE_FORMAT)
    else:
        formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    if environment.time_zone is not None and not hasattr(time, 'tzset'):
        formatter.converter = zone_converter(environment.time_zone)
    file_level = _level(ini, process_name, 'log_file_level', 'INFO')
    levels = [file_level]
    path = environment.logfile(process_name)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handler = logging.handlers.TimedRotatingFileHandler(
            path, when='midnight', backupCount=ini.getint(process_name, 'log_file_number', 30), encoding='utf-8')
    except OSError as exc:
        raise ConfigError('Error: cannot write the log in %s: %s' % (os.path.dirname(path), exc.strerror))
    handler.setFormatter(formatter)
    handler.setLevel(file_level)
    logger.addHandler(handler)
    if ini.getboolean(process_name, 'log_console', True):
        console_level = _level(ini, process_name, 'log_console_level', 'STARTINFO')
        console = logging.StreamHandler()
        console.setFormatter(formatter)
        console.setLevel(console_level)
        logger.addHandler(console)
        levels.append(console_level)
    logger.setLevel(min(levels))
    return logger


def log_installation(environment, logger, program):
    """Say which Bots installation ``program`` serves, or that it runs on its own; which rule
    chose the configuration directory; the time zone of its clock."""
    logger.log(STARTINFO, '%s configuration directory chosen by %s.', program, environment.rule)
    if environment.time_zone is not None:
        logger.log(STARTINFO, '%s keeps the time of %s (TIME_ZONE of %s).', program, environment.time_zone,
                   os.path.join(environment.configdir, 'settings.py'))
    from . import __version__
    program = '%s (bots-jobqueue %s)' % (program, __version__)
    if environment.bots_dir:
        logger.log(STARTINFO, '%s serves Bots %s in "%s" (%s); botssys: "%s".', program,
                   bots_version(environment.bots_dir) or '(version unknown)', environment.bots_dir,
                   'installed inside it' if environment.inside_bots else 'from beside it',
                   environment.botssys)
    else:
        logger.log(STARTINFO, '%s runs standalone (no Bots in this Python); botssys: "%s".', program,
                   environment.botssys)
    if os.path.normcase(environment.configdir) == os.path.normcase(BUNDLED_CONFIG):
        logger.log(STARTINFO, '%s uses the bundled configuration, inside the installed package (there is no '
                   'config/ here).  To change it, copy that directory to config/ where you start the programs, '
                   'and edit the copy.', program)


class RateLimited:
    """Log lines of one kind and client at most once a minute (refusals: a stream of bad requests
    must not fill the disk).  The next line written says how many were left out meanwhile."""

    def __init__(self, logger, interval=60.0, clock=time.monotonic):
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._seen = {}              # (kind, client) -> [when last written, left out since]

    def log(self, level, kind, client, message, *args):
        if not self.logger.isEnabledFor(level):
            return
        now = self._clock()
        with self._lock:
            entry = self._seen.get((kind, client))
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return
            left_out = entry[1] if entry is not None else 0
            if len(self._seen) > 1000:          # many clients: forget the ones quiet for a while
                self._seen = {key: value for key, value in self._seen.items() if now - value[0] < self.interval}
            self._seen[(kind, client)] = [now, 0]
        if left_out:
            message += ' (%d more like it from %s in the last %d seconds not logged)'
            args += (left_out, client, int(self.interval))
        self.logger.log(level, message, *args)


# What XML 1.0 cannot carry, and what a terminal takes for a command: C0 controls but tab and
# new line (carriage return too: it hides what came before it on a terminal), DEL, C1 controls,
# lone surrogates and the two non-characters XML refuses.
_UNPRINTABLE = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]')


def _escape(match):
    code = ord(match.group())
    return '\\x%02x' % code if code < 0x100 else '\\u%04x' % code


def printable(text):
    """``text`` with control characters, NUL, the EDIFACT separators ``\\x1c``-``\\x1f`` and escape
    sequences shown as ``\\x1c``: safe for XML-RPC answers, the log and a terminal."""
    if not isinstance(text, str):
        return text
    return _UNPRINTABLE.sub(_escape, text.replace('\r\n', '\n'))
