"""What the directory monitor watches: the ``[dirmonitorN]`` sections of bots.ini and the routes
of Bots' database that Bots 4 flags for it, each a ``Watch``, read once into ``MonitorSettings``.
"""
import fnmatch
import os
import sys

from . import configuration


class Watch:
    """One watched directory - a ``[dirmonitorN]`` section, or a route of Bots' database - what
    to watch, and which job its files ask for."""

    def __init__(self, environment, section, general, route_record=None):
        ini = environment.ini
        self.section = section
        self.process_existing = True
        if route_record is None:
            path = ini.get(section, 'path', '').strip()
            if not path:
                raise configuration.ConfigError('Error: [%s] has no path' % section)
            self.filemask = ini.get(section, 'filemask', '*').strip() or '*'
            self.recursive = ini.getboolean(section, 'recursive', False)
            self.route = ini.get(section, 'route', '').strip()
            self.polling = ini.getboolean(section, 'polling', general.polling)
            self.priority = ini.getint(section, 'priority', general.priority)
            if not 1 <= self.priority <= 9:
                raise configuration.ConfigError('Error: [%s] priority should be from 1 to 9' % section)
        else:
            # As Bots 4: the channel's path and mask; a '*' in the path watches what it matches.
            path = route_record['path']
            self.filemask = route_record['filemask']
            self.recursive = '*' in path
            self.route = route_record['idroute']
            self.polling, self.priority = general.polling, general.priority
            # A channel that leaves its files in place would queue a run at every start.
            self.process_existing = route_record['remove']
        path = os.path.abspath(path)
        self.pattern = path if any(char in path for char in '*?[') else None
        if self.pattern:
            fixed = []
            for part in path.split(os.sep):
                if any(char in part for char in '*?['):
                    break
                fixed.append(part)
            path, self.recursive = os.sep.join(fixed) or os.sep, True
        self.path = path
        task = [environment.python_executable_path, environment.botsengine_path, '-c' + environment.configdir]
        self.task = task + [self.route] if self.route else task

    def identity(self):
        return (self.path, self.pattern, self.filemask, self.recursive, self.route, self.polling, self.priority)

    def matches(self, path):
        """True for a file of this watch: right name, in the directory (or below, when recursive;
        in a directory that the path's pattern matches, when it has one)."""
        if not fnmatch.fnmatch(os.path.basename(path), self.filemask):
            return False
        parent = os.path.dirname(path)
        if self.pattern:
            return fnmatch.fnmatch(parent, self.pattern)
        if parent == self.path:
            return True
        return self.recursive and parent.startswith(self.path + os.sep)

    def existing_files(self, since=None):
        """True when the directory already holds a matching file (written since ``since``, a
        timestamp, when given)."""
        for root, dirs, files in os.walk(self.path):
            if not self.pattern or fnmatch.fnmatch(root, self.pattern):
                for name in files:
                    if fnmatch.fnmatch(name, self.filemask) and (since is None or _mtime(root, name) >= since):
                        return True
            if not self.recursive:
                return False
        return False

    def files_changed_since(self, moment):
        return self.existing_files(since=moment)


def _mtime(directory, name):
    try:
        return os.stat(os.path.join(directory, name)).st_mtime
    except OSError:
        return 0.0


class MonitorSettings:
    """The ``[dirmonitor]`` section and what the monitor needs of the others."""

    def __init__(self, environment):
        ini = environment.ini
        self.quiet_period = ini.getfloat('dirmonitor', 'quiet_period', 2.0)
        self.priority = ini.getint('dirmonitor', 'priority', 5)
        self.process_existing = ini.getboolean('dirmonitor', 'process_existing', True)
        self.polling = ini.getboolean('dirmonitor', 'polling', False)
        self.polling_interval = ini.getfloat('dirmonitor', 'polling_interval', 1.0)
        self.retry_max = ini.getfloat('dirmonitor', 'retry_max', 60.0)
        self.write_pause_limit = ini.getfloat('dirmonitor', 'write_pause_limit', 600.0)
        self.port = environment.port
        trigger = ini.get('dirmonitor', 'trigger', '') or '.dirmonitor.trigger'
        self.trigger = os.path.join(environment.botssys, trigger)
        self.client_timeout = environment.client_timeout
        self.host, self.secret = environment.client_host, environment.secret     # where the server is
        sections = [name for name in ini.sections() if name.startswith('dirmonitor') and name != 'dirmonitor']
        self.watches = [Watch(environment, name, self) for name in sections]
        self.notes = []          # (level, line) for the log: what was read of Bots' database
        if environment.bots4:
            self._add_routes(environment)

    def _add_routes(self, environment):
        """The routes Bots 4 flags ``dirmonitor``, read through Bots' own code."""
        from .botsroutes import RoutesUnreadable, read_routes
        python = sys.executable if environment.inside_bots else environment.python_executable_path
        try:
            routes = read_routes(python, environment.configdir)
        except RoutesUnreadable as exc:
            self.notes.append((40, "Cannot read the routes of Bots' database (%s); the [dirmonitorN] sections "
                                   "are watched." % exc))
            return
        if routes is None:
            return
        watched = {(watch.path, watch.pattern, watch.filemask): watch for watch in self.watches}
        for record in routes:
            watch = Watch(environment, 'route %s' % record['idroute'], self, record)
            key = (watch.path, watch.pattern, watch.filemask)
            if key in watched:
                self.notes.append((30, 'Route "%s" (Bots\' database): %s (%s) is watched already by [%s]; one '
                                       'watch, for route "%s".' % (record['idroute'], record['path'],
                                                                   record['filemask'], watched[key].section,
                                                                   watched[key].route)))
                continue
            watched[key] = watch
            self.watches.append(watch)
            self.notes.append((25, 'Route "%s" of Bots\' database is watched: %s (%s)%s.'
                                   % (record['idroute'], record['path'], record['filemask'],
                                      '' if record['remove'] else '; its channel keeps its files, so files '
                                      'already there are not processed at start')))
