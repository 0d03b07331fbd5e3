"""Routes of Bots' database that Bots 4 marks for the directory monitor.

Bots 4 gives a route the flag ``dirmonitor``: an active flagged route whose
``fromchannel`` is a ``file`` channel is watched at that channel's path and
filename mask, and a file there runs the engine for that route.  The routes
are read through Bots' own code - its ``botsinit.generalinit`` and its Django
models, in a Python that has Bots (Bots' own, or this one inside Bots) - so
every database Bots supports is read as Bots reads it.  The reading runs in a
process of its own: Django and Bots stay out of the monitor's memory, and a
database that cannot be read costs one logged line.
"""
import json
import subprocess

# Run by Bots' Python with the configuration directory; prints the routes as JSON.
READ_ROUTES = '''
import json, sys
from bots import botsinit, botslib
botsinit.generalinit(sys.argv[1])
from bots import models
names = {field.name for field in models.routes._meta.get_fields()}
found = []
if 'dirmonitor' in names:
    for route in models.routes.objects.filter(active=True, dirmonitor=True).select_related('fromchannel'):
        channel = route.fromchannel
        if channel is None or channel.type != 'file':
            continue
        found.append({'idroute': route.idroute, 'seq': route.seq, 'path': botslib.join(channel.path),
                      'filemask': channel.filename or '*', 'remove': bool(channel.remove)})
print('ROUTES ' + json.dumps({'flag': 'dirmonitor' in names, 'routes': found}))
'''


class RoutesUnreadable(Exception):
    """Bots' database could not be read; the text says why, in one line."""


def read_routes(python, configdir, timeout=120):
    """The active routes flagged ``dirmonitor`` with a file fromchannel: a list of dicts with
    ``idroute``, ``seq``, ``path``, ``filemask`` and ``remove``; None when Bots' routes have
    no such flag (Bots 3).  Raises RoutesUnreadable."""
    try:
        result = subprocess.run([python, '-c', READ_ROUTES, configdir], capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RoutesUnreadable('cannot run %s: %s' % (python, exc))
    for line in result.stdout.splitlines():
        if line.startswith('ROUTES '):
            answer = json.loads(line[7:])
            return answer['routes'] if answer['flag'] else None
    lines = [line for line in (result.stderr or result.stdout).strip().splitlines() if line.strip()]
    raise RoutesUnreadable(lines[-1] if lines else 'exit code %s' % result.returncode)
