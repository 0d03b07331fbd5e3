"""Schedules: ``[scheduleN]`` sections of bots.ini, fired by the server itself.

Each section is one recurring job.  ``when`` is a cron expression - five
fields, or six with seconds first, or ``@hourly``, ``@daily``, ``@weekly``,
``@monthly``, ``@yearly`` - read by cronsim, which follows Debian's cron,
daylight-saving days included: a time in the hour that is skipped fires once
right after the change, a time in the hour that is repeated fires once.

The scheduler keeps the next firing time of every schedule in a heap of
wall-clock times, wakes up (a timer of its own thread, see ``timers.py``) at
the first one - never more than a second later, so that a clock step is
noticed - and fires a schedule by
calling ``fire`` - the server's ``addjob`` path: authorization, the duplicate
rule, priority.  After a firing, the next time is computed from *now*: a
clock step or a long suspend fires a schedule once, never once per missed
time.  A wall clock stepped back (an NTP correction, a restored virtual
machine) is noticed at the next wake-up: every schedule's next time is worked
out again from the new "now", so none waits for the old time to come round.
The time each schedule last fired is stored, and the time the server first saw
it; at start a schedule whose time passed while the server was down - fired
before or not yet - fires once (``catchup = once``) or is skipped
(``catchup = none``).
"""
import datetime
import heapq
import os
import shlex
import threading
import time

from . import codes
from .configuration import ConfigError
from .store import patiently
from .timers import Timers

ALIASES = {'@yearly': '0 0 1 1 *', '@annually': '0 0 1 1 *', '@monthly': '0 0 1 * *',
           '@weekly': '0 0 * * 0', '@daily': '0 0 * * *', '@midnight': '0 0 * * *', '@hourly': '0 * * * *'}
CATCHUP = ('once', 'none')


def local_zone():
    """The server's own time zone, with its daylight-saving rules where the system names them
    (``TZ``, /etc/localtime); else the current UTC offset (Windows without a named zone)."""
    import zoneinfo
    name = os.environ.get('TZ', '').lstrip(':')
    try:
        if name:
            return zoneinfo.ZoneInfo(name)
        if os.path.exists('/etc/localtime'):
            with open('/etc/localtime', 'rb') as handle:
                return zoneinfo.ZoneInfo.from_file(handle, key='localtime')
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        pass
    return datetime.datetime.now().astimezone().tzinfo


def zone(name, where):
    """The time zone called ``name`` (IANA, e.g. Europe/Amsterdam); '' is the server's own."""
    if not name:
        return local_zone()
    import zoneinfo
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError('Error: %s timezone = "%s" is not a time zone (write e.g. Europe/Amsterdam or UTC)'
                          % (where, name))


def expression(when, where):
    """The cron expression of ``when`` (aliases written out); ConfigError when it is none."""
    from cronsim import CronSim, CronSimError
    text = ' '.join(when.split())
    text = ALIASES.get(text.lower(), text)
    if not text:
        raise ConfigError('Error: %s has no "when" (a cron expression such as "*/5 * * * *")' % where)
    try:
        CronSim(text, datetime.datetime(2000, 1, 1))
    except (CronSimError, ValueError, KeyError, IndexError) as exc:
        raise ConfigError('Error: %s when = "%s" is not a cron expression (%s); five fields "minute hour '
                          'day month weekday", six with seconds first, or @hourly, @daily, @weekly, @monthly'
                          % (where, when, exc or 'not understood'))
    return text


class Schedule:
    """One ``[scheduleN]`` section."""

    def __init__(self, name, when, task, priority, enabled, tz, catchup):
        self.name = name
        self.when = when
        self.expression = expression(when, '[%s]' % name)
        self.task = task
        self.priority = priority
        self.enabled = enabled
        self.tz = tz
        self.catchup = catchup

    def next_after(self, moment):
        """The first firing time after ``moment`` (a POSIX timestamp), as a timestamp."""
        from cronsim import CronSim
        start = datetime.datetime.fromtimestamp(moment, self.tz)
        return next(CronSim(self.expression, start)).timestamp()

    def same_as(self, other):
        return (self.expression, self.task, self.priority, self.enabled, str(self.tz), self.catchup) == \
            (other.expression, other.task, other.priority, other.enabled, str(other.tz), other.catchup)


def read_schedules(environment):
    """The ``[scheduleN]`` sections of bots.ini, by section name.  Raises ConfigError (one line,
    naming the section and the value) for anything wrong."""
    ini = environment.ini
    where = ' (in %s)' % ini.path
    try:
        general_tz = ini.get('schedule', 'timezone', '').strip()
        general_catchup = ini.get('schedule', 'catchup', 'once').strip().lower() or 'once'
        schedules = {}
        for section in ini.sections():
            if not section.startswith('schedule') or section == 'schedule':
                continue
            label = '[%s]' % section
            tz_name = ini.get(section, 'timezone', '').strip() or general_tz
            catchup = ini.get(section, 'catchup', '').strip().lower() or general_catchup
            if catchup not in CATCHUP:
                raise ConfigError('Error: %s catchup = "%s" should be once or none' % (label, catchup))
            priority = ini.getint(section, 'priority', 5)
            if not 1 <= priority <= 9:
                raise ConfigError('Error: %s priority = %s should be from 1 (most urgent) to 9' % (label, priority))
            task = words(ini.get(section, 'task', ''), label, 'task')
            arguments = words(ini.get(section, 'arguments', ''), label, 'arguments')
            if task and arguments:
                raise ConfigError('Error: %s has both task and arguments; arguments go with the engine, a task '
                                  'is given in full' % label)
            if not task:
                task = [environment.python_executable_path, environment.botsengine_path,
                        '-c' + environment.configdir] + arguments
            schedules[section] = Schedule(section, ini.get(section, 'when', ''), task, priority,
                                          ini.getboolean(section, 'enabled', True), zone(tz_name, label), catchup)
        return schedules
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if ini.path in text else text + where)


def words(value, label, key):
    """A command line split as a POSIX shell does (quotes keep a route name with spaces whole)."""
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise ConfigError('Error: %s %s = %s: %s' % (label, key, value, exc))


class Scheduler:
    """Fires the schedules on time, from a timer thread of its own.

    ``fire(schedule)`` queues one job and returns ``(code, jobnumber)``; ``store`` keeps when
    each schedule last fired (``last_fired``, ``set_fired``)."""

    MAX_SLEEP = 1.0
    STEP_BACK = 1.0            # seconds the wall clock may seem to go back before it counts as a step

    def __init__(self, schedules, store, fire, logger, clock=time.time, may_fire=None):
        self.store = store
        self.fire = fire
        self.logger = logger
        self.clock = clock
        self._lock = threading.Lock()
        self._timers = Timers('scheduler', logger)
        self._generation = 0       # of the wake-up that counts (a reload asks for one of its own)
        self._started = False
        self._stopping = False
        self.schedules = {}
        self._next = {}            # name -> next firing time
        self._heap = []            # (time, name), may hold stale entries
        self._overrun = set()      # schedules whose overrun was logged since their last added job
        self.metrics = None        # observes the lateness of each firing, when the server has metrics
        self.may_fire = may_fire   # a shared store's standby fires nothing: a function saying whether we lead
        self._seen = clock()       # the wall clock at the last look, to notice a step back
        self.replace(schedules, starting=True)

    # ---- configuration
    def replace(self, schedules, starting=False):
        """Take these schedules (at start, or at a reload): times are worked out again; what each
        schedule fired last stays in the store."""
        now = self.clock()
        due = []
        with self._lock:
            old, previous = self.schedules, self._next
            self.schedules = dict(schedules)
            self._next = {}
            self._heap = []
            for name, schedule in self.schedules.items():
                if not schedule.enabled:
                    continue
                if not starting and name in old and old[name].same_as(schedule) and name in previous:
                    when = previous[name]           # unchanged by the reload: its time stays
                else:
                    when = self._first_time(schedule, now, due if starting else None)
                self._next[name] = when
                heapq.heappush(self._heap, (when, name))
            if self._started:
                self._wake_up(0)
        for schedule in due:
            self._fire(schedule, None)

    def _first_time(self, schedule, now, due):
        """The first firing time from now on; a missed one (the server was down) is put in ``due``
        with catchup = once."""
        last = self.store.last_fired(schedule.name)
        if last is None:
            # Never fired: its first time counts from when the server first saw it.
            key = 'schedule-seen:' + schedule.name
            seen = self.store.setting(key)
            if seen is None:
                patiently(self.store.set_setting, key, repr(now), patience=30)
            else:
                last = float(seen)
        if last is not None and due is not None:
            missed = schedule.next_after(last)
            if missed <= now:
                if schedule.catchup == 'once':
                    self.logger.info('Schedule [%s]: its run of %s was missed while the server was down; '
                                     'it runs now (catchup = once).', schedule.name, _when(missed))
                    due.append(schedule)
                else:
                    self.logger.info('Schedule [%s]: its run of %s was missed while the server was down; '
                                     'skipped (catchup = none).', schedule.name, _when(missed))
        return schedule.next_after(now)

    def catch_up(self):
        """Work out every time again as at a start, firing what was missed (a new leader)."""
        self.replace(dict(self.schedules), starting=True)

    # ---- the wake-ups
    def start(self):
        with self._lock:
            self._started = True
            self._wake_up(0)

    def stop(self):
        """Fire nothing more; a firing under way ends first (for up to 5 seconds)."""
        with self._lock:
            self._stopping = True
        self._timers.close(wait=5)

    def _wake_up(self, seconds):
        """(With or without the lock.)  The next look in ``seconds``; an earlier one is dropped."""
        self._generation += 1
        self._timers.add(seconds, self._tick, self._generation)

    def _tick(self, generation):
        """Fire what is due, one at a time, then sleep until the next time (at most MAX_SLEEP)."""
        while True:
            with self._lock:
                if self._stopping or generation != self._generation:
                    return                     # stopped, or a reload asked for a look of its own
                now = self.clock()
                if now < self._seen - self.STEP_BACK:
                    self._clock_stepped_back(now)
                self._seen = now
                top = self._live_top()
                if top is None or top[0] > now:
                    self._wake_up(self.MAX_SLEEP if top is None else min(self.MAX_SLEEP, top[0] - now))
                    return
                when, name = heapq.heappop(self._heap)
                schedule = self.schedules[name]
                # From now, not from the missed time: a clock step fires once, not a burst.
                self._next[name] = schedule.next_after(max(now, when))
                heapq.heappush(self._heap, (self._next[name], name))
            self._fire(schedule, when)

    def _clock_stepped_back(self, now):
        """(With the lock held.)  Each schedule's next time from the new ``now``, not the old one."""
        self.logger.warning('The clock went back %d seconds; each schedule runs at its next time from now.',
                            self._seen - now)
        self._heap = []
        for name in self._next:
            self._next[name] = self.schedules[name].next_after(now)
            heapq.heappush(self._heap, (self._next[name], name))

    def _live_top(self):
        heap = self._heap
        while heap and self._next.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _fire(self, schedule, when):
        if self.may_fire is not None and not self.may_fire():
            return                     # the leader fires it (cluster.py)
        if when is not None and self.metrics is not None:
            self.metrics.lateness.observe(max(0.0, self.clock() - when))
        try:
            code, jobnumber = patiently(self.fire, schedule, patience=30)
        except Exception as exc:        # a store or a bug: logged, and the next time comes all the same
            self.logger.error('Schedule [%s] could not queue its job: %s', schedule.name, exc)
            return
        try:
            patiently(self.store.set_fired, schedule.name, when if when is not None else self.clock(), jobnumber,
                      patience=30)
        except Exception as exc:
            self.logger.error('Schedule [%s]: when it fired could not be stored: %s', schedule.name, exc)
        if code == codes.DUPLICATE:
            if schedule.name not in self._overrun:
                self._overrun.add(schedule.name)
                self.logger.warning('Schedule [%s]: its previous run (job %s) still waits; not queued again '
                                    '(said once until it runs).', schedule.name, jobnumber)
        else:
            self._overrun.discard(schedule.name)

    # ---- what operators see
    def next_times(self):
        with self._lock:
            return dict(self._next)

    def first(self):
        """``(time, name)`` of the next firing of all, or None when no schedule is enabled."""
        with self._lock:
            return min(((when, name) for name, when in self._next.items()), default=None)


def _when(timestamp):
    return datetime.datetime.fromtimestamp(timestamp).strftime('%Y-%m-%d %H:%M:%S')
