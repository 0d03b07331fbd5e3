"""Which tasks the server agrees to run.

Any local user can reach a localhost port, so the queue runs only:

- the configured engine (``[settings] botsengine_path``), directly or by the
  configured Python (``python_executable_path``) or the server's own;
- ``bots-engine`` / ``bots-engine.py`` as found on the server's own PATH or in
  Bots' scripts directory (beside the configured Python);
- the programs in ``[jobqueue] authorized_tasks`` (full paths, or names found
  as above; separated by commas, semicolons or whitespace, as in Bots 4),
  directly or as the script of an allowed Python;
- anything at all when ``authorized_tasks = *`` (Bots 3 behaviour; unsafe).

A bare program name is looked for on the PATH, then in Bots' scripts
directory: the monitor's Run menu queues the bare name ``bots-engine``, and
the server that runs beside Bots need not have Bots on its PATH.  The same
search decides what is authorized and what is started.  Programs are
compared as files (real paths), never by name alone, so a file called
``bots-engine.py`` in some other directory is not the engine.

What is started is what the configuration names, not what the task names:
the configured path of the allowed interpreter (a link to it elsewhere could
bring its own ``pyvenv.cfg``) and of the allowed script or program (a link
could be pointed elsewhere between check and start), checked again at the
start.  An interpreter option (``-c``, ``-m``, ...) is never taken for a
script.
"""
import os
import re
import shutil
import sys
import time

from .botsinstall import ENGINE_NAMES, find_program


def _real(path):
    return os.path.normcase(os.path.realpath(path))


def resolve_program(name, search_dirs=()):
    """``(path, real_path)`` of the program ``name`` as the server would find it, or None.

    ``path`` is where it was found (absolute, links not followed), ``real_path`` the file
    itself.  A bare name is looked for on the PATH, then in ``search_dirs``."""
    if not name:
        return None
    if os.sep in name or (os.altsep and os.altsep in name):
        found = name if os.path.isfile(name) else None
    else:
        found = shutil.which(name) or find_program(name, search_dirs)
    if not found:
        return None
    found = os.path.abspath(found)
    return found, _real(found)


def split_authorized_tasks(value):
    """The entries of ``authorized_tasks``: separated by commas, semicolons, new lines or
    whitespace (Bots 4); a path with spaces that exists as a whole stays one entry."""
    entries = []
    for part in re.split(r'[,;\n]', value):
        part = part.strip()
        if not part:
            continue
        if os.path.isfile(part) or not re.search(r'\s', part):
            entries.append(part)
        else:
            entries.extend(part.split())
    return entries


class ResolveCache:
    """``resolve_program`` with answers kept a few seconds, for the check when a job is queued:
    adds come in bursts with the same programs, and resolving a path costs a system call per
    component.  A launch never uses it (see ``Authorizer.command``)."""

    def __init__(self, search_dirs, seconds=2.0, size=4096):
        self.search_dirs = search_dirs
        self.seconds = seconds
        self.size = size
        self._answers = {}

    def __call__(self, name):
        now = time.monotonic()
        answer = self._answers.get(name)
        if answer is not None and answer[0] > now:
            return answer[1]
        if len(self._answers) >= self.size:
            self._answers.clear()
        program = resolve_program(name, self.search_dirs)
        self._answers[name] = (now + self.seconds, program)
        return program


class Authorizer:
    """Decides whether a task may run, and what exactly is started for it.

    Built once from the configuration.  Programs are compared by their real files; what is
    started is never the path the task names but the path the configuration names for that
    file (``command``): a link the task points at can be changed after the check, and an
    interpreter started through a link of someone else's reads that one's ``pyvenv.cfg``.
    """

    def __init__(self, python_executable_path, botsengine_path, authorized_tasks, interpreter, search_dirs=()):
        self.search_dirs = list(search_dirs)
        self._cached = ResolveCache(self.search_dirs)
        self.allow_all = authorized_tasks.strip() == '*'
        self.problems = []         # one line per configured program that cannot be found
        self.interpreters = {}     # real file -> the configured path that is started for it
        for found in (self._configured(python_executable_path, '[settings] python_executable_path'),
                      resolve_program(interpreter)):
            if found:
                self.interpreters.setdefault(found[1], found[0])
        self.interpreter_paths = set(self.interpreters.values())
        self.programs = {}         # real file -> the configured path that is started for it
        for found in [self._configured(botsengine_path, '[settings] botsengine_path')] + \
                [self._resolve(name) for name in ENGINE_NAMES]:
            if found:
                self.programs.setdefault(found[1], found[0])
        self.engines = set(self.programs)
        if not any(self._resolve(name) for name in ENGINE_NAMES):
            self.problems.append('No bots-engine or bots-engine.py on the PATH or in %s: a task that names the '
                                 'engine by its bare name is refused (answer 3).' % os.pathsep.join(self.search_dirs))
        for entry in split_authorized_tasks(authorized_tasks):
            if entry != '*':
                found = self._configured(entry, '[jobqueue] authorized_tasks')
                if found:
                    self.programs.setdefault(found[1], found[0])

    @classmethod
    def for_environment(cls, environment):
        """The Authorizer of the server of ``environment`` (the directory monitor asks it too)."""
        return cls(environment.python_executable_path, environment.botsengine_path,
                   environment.ini.get('jobqueue', 'authorized_tasks', ''), sys.executable,
                   environment.engine_dirs)

    def _resolve(self, name):
        return resolve_program(name, self.search_dirs)

    def _configured(self, name, key):
        found = self._resolve(name)
        if found is None:
            self.problems.append('%s: no program "%s"%s; jobs that run it are refused (answer 3).'
                                 % (key, name, '' if os.sep in name else ' on the PATH or in %s'
                                    % os.pathsep.join(self.search_dirs)))
        return found

    def command(self, task):
        """The command line to start for ``task``, checked now; None when it is not allowed.

        The program (and an interpreter's script) is the configured path of the allowed file,
        resolved at this moment; the other arguments are the task's."""
        return self._check(task, self._resolve)

    def allows(self, task):
        """True when ``task`` may be queued (the check is made again when it starts)."""
        return self._check(task, self._cached) is not None

    def _check(self, task, resolve):
        found = resolve(task[0])
        if found is None and task[0] in ENGINE_NAMES:
            # bots-engine and bots-engine.py are one program: Bots' pages write the one, pip
            # installs the other.  The bare name runs whichever the server found.
            found = next(filter(None, map(resolve, ENGINE_NAMES)), None)
        if self.allow_all:
            return [found[0] if found else task[0]] + list(task[1:])
        if found is None:
            return None
        if found[1] in self.programs:
            return [self.programs[found[1]]] + list(task[1:])
        if found[1] in self.interpreters and len(task) > 1:
            script = task[1]
            if script.startswith('-'):
                return None          # an option (-c, -m, ...), never a script
            # The interpreter opens its script relative to the working directory, not the PATH,
            # so a bare name here is a file in the working directory: give it a path.
            script = resolve(script if os.sep in script else os.path.join('.', script))
            if script is not None and script[1] in self.programs:
                interpreter = found[0] if found[0] in self.interpreter_paths else self.interpreters[found[1]]
                return [interpreter, self.programs[script[1]]] + list(task[2:])
        return None

    def is_engine(self, task):
        """True when ``task`` runs bots-engine, directly or as the script of an interpreter."""
        for arg in task[:2]:
            if os.path.basename(arg) in ENGINE_NAMES:
                return True
            found = self._resolve(arg)
            if found and found[1] in self.engines:
                return True
        return False
