"""Where Bots is, and which Bots: the installation this package serves, read from its files.

Nothing of Bots is imported (it needs Django and its own configuration):
its files are read.  ``bots_dir`` tells whether this package is installed
inside Bots; ``bots_generation`` and ``bots_version`` which Bots it is;
``bots4_configdir`` and ``bots4_beside`` where Bots 4 keeps its
configuration and its Python; the settings.py helpers read Django's
``TIME_ZONE`` and tell a Bots 4 configuration.
"""
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
BUNDLED_CONFIG = os.path.join(PACKAGE_DIR, 'config')
BOTS_PACKAGE_DIR = os.path.dirname(PACKAGE_DIR)
ENGINE_NAMES = ('bots-engine', 'bots-engine.py')


def bots_dir():
    """Bots' package directory when this package is installed inside Bots; None when standalone."""
    if os.path.isfile(os.path.join(BOTS_PACKAGE_DIR, 'botsinit.py')):
        return BOTS_PACKAGE_DIR
    return None


def bots_generation(directory):
    """4 for Bots 4 (its configuration lives outside its package), 3 for Bots 3."""
    try:
        with open(os.path.join(directory, 'botsinit.py'), encoding='utf-8', errors='replace') as handle:
            return 4 if 'BOTS_CONFIG_DIR' in handle.read() else 3
    except OSError:
        return 3


def bots4_configdir():
    """``(directory, rule)``: the configuration directory Bots 4 reads without ``-c``."""
    if os.environ.get('BOTS_CONFIG_DIR'):
        return os.path.abspath(os.path.normpath(os.environ['BOTS_CONFIG_DIR'])), '$BOTS_CONFIG_DIR'
    env = os.environ.get('BOTSENV') or 'default'
    rule = '$BOTSENV (~/.bots/env/%s/config)' % env if os.environ.get('BOTSENV') else \
        'the default Bots 4 environment (~/.bots/env/default/config; no $BOTS_CONFIG_DIR or $BOTSENV)'
    return os.path.join(os.path.expanduser('~'), '.bots', 'env', env, 'config'), rule


def read_settings(configdir):
    """The text of ``<configdir>/settings.py`` (read, not imported: it needs Django), or ''."""
    try:
        with open(os.path.join(configdir, 'settings.py'), encoding='utf-8', errors='replace') as handle:
            return handle.read()
    except OSError:
        return ''


def is_bots4_settings(settings):
    """True for the settings.py of a Bots 4 configuration (it works out its Bots environment
    from where it lies)."""
    return 'BOTS_CONFIG_DIR' in settings or 'BOTSENV_PATH' in settings


def settings_time_zone(settings):
    """Django's ``TIME_ZONE`` in the text of a settings.py, or ''."""
    import re
    match = re.search(r'^TIME_ZONE\s*=\s*[\'"]([^\'"]+)[\'"]', settings, re.MULTILINE)
    return match.group(1) if match else ''


def apply_time_zone(name):
    """Keep the clock of time zone ``name`` in this process, as Django does for Bots (POSIX: TZ);
    returns the zone, or None when ``name`` is no zone.  Jobs inherit it, as Bots' engine would
    take it from its settings anyway."""
    import time
    import zoneinfo
    try:
        zone = zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return None
    if hasattr(time, 'tzset'):
        os.environ['TZ'] = name
        time.tzset()
    return zone


def bots_package_of(python):
    """The Bots package directory in the environment of the Python ``python``, or None."""
    import glob
    prefix = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    for pattern in ('lib/python*/site-packages/bots', 'Lib/site-packages/bots', 'lib/site-packages/bots'):
        for found in glob.glob(os.path.join(prefix, pattern)):
            if os.path.isfile(os.path.join(found, 'botsinit.py')):
                return found
    return None


def script_python(path):
    """The interpreter a console script starts (its ``#!`` line), or None."""
    try:
        with open(path, 'rb') as handle:
            first = handle.readline(1000)
    except OSError:
        return None
    if first.startswith(b'#!'):
        words = first[2:].decode('utf-8', 'replace').split()
        return words[0] if words and os.path.isabs(words[0]) else None
    return None


def bots4_beside(ini):
    """Beside Bots 4: the Bots package of the configured ``python_executable_path``, else of the
    ``bots-engine`` on the PATH; None when neither leads to one."""
    import shutil
    configured = ini.get('settings', 'python_executable_path', '')
    if configured:
        return bots_package_of(configured)
    engine = shutil.which('bots-engine')
    if engine:
        python = script_python(engine) or os.path.join(os.path.dirname(engine), 'python')
        return bots_package_of(python)
    return None


def bots_version(directory):
    """The version of the Bots in ``directory`` (``__about__.py`` of bots-ediint, or Bots 3's
    ``botsglobal.py``), read without importing Bots; '' when it cannot be told."""
    import re
    import glob
    for info in sorted(glob.glob(os.path.join(os.path.dirname(directory), 'bots_ediint-*.dist-info'))):
        return os.path.basename(info)[len('bots_ediint-'):-len('.dist-info')]    # as pip installed it
    for filename, pattern in (('__about__.py', r'__version_info__\s*=\s*\(([\d,\s]+)\)'),
                              ('botsglobal.py', r'^version\s*=\s*[\'"]([^\'"]+)')):
        try:
            with open(os.path.join(directory, filename), encoding='utf-8', errors='replace') as handle:
                match = re.search(pattern, handle.read(), re.MULTILINE)
        except OSError:
            continue
        if match:
            return '.'.join(part.strip() for part in match.group(1).split(',') if part.strip())
    return ''


def scripts_dirs(python):
    """Where the console scripts of the Python ``python`` are installed: beside it (POSIX, and a
    Windows virtual environment), or in ``Scripts`` beside it (a Windows installation)."""
    here = os.path.dirname(os.path.abspath(python))
    return [here, os.path.join(here, 'Scripts')] if os.name == 'nt' else [here]


def find_program(name, directories):
    """The path of the program ``name`` in one of ``directories`` (with Windows' .exe and
    friends), or None."""
    import shutil
    for directory in directories:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
        if os.name == 'nt':
            found = shutil.which(name, path=directory)
            if found:
                return found
    return None


def served_bots(configdir, inside_bots):
    """The Bots installation whose configuration this is: the one we are installed in, or the one
    whose package directory holds the configuration directory (a job queue beside Bots, started
    with ``-c`` pointing at Bots' ``config``); None when the configuration is not Bots'."""
    if inside_bots:
        return inside_bots
    parent = os.path.dirname(configdir)
    return parent if os.path.isfile(os.path.join(parent, 'botsinit.py')) else None


def bots_scripts_dir(package_dir):
    """The scripts directory (``<prefix>/bin``, ``<prefix>\\Scripts``) of the Python environment
    that a Bots package directory is installed in, known by its bots-engine; None if not found."""
    up = package_dir
    for _ in range(4):
        up = os.path.dirname(up)
        for name in ('bin', 'Scripts'):
            directory = os.path.join(up, name)
            if any(find_program(engine, [directory]) for engine in ENGINE_NAMES):
                return directory
    return None
