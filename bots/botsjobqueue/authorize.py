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
"""
import os
import re
import shutil
import sys
import time

from .configuration import ENGINE_NAMES, find_program


def _real(path):
    return os.path.normcase(os.path.realpath(path))


def resolve_program(name, search_dirs=()):
    """The real path of the program ``name`` as the server would start it, or None.

    A bare name is looked for on the PATH, then in ``search_dirs``."""
    if not name:
        return None
    if os.sep in name or (os.altsep and os.altsep in name):
        return _real(name) if os.path.isfile(name) else None
    found = shutil.which(name) or find_program(name, search_dirs)
    return _real(found) if found else None


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
    """``resolve_program`` with answers kept a few seconds: adds and launches come in bursts
    with the same programs, and resolving a path costs a system call per component."""

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
    """Decides whether a task may run.  Built once from the configuration."""

    def __init__(self, python_executable_path, botsengine_path, authorized_tasks, interpreter, search_dirs=()):
        self.search_dirs = list(search_dirs)
        self._cached = ResolveCache(self.search_dirs)
        self.allow_all = authorized_tasks.strip() == '*'
        self.problems = []         # one line per configured program that cannot be found
        self.interpreters = {p for p in (self._configured(python_executable_path, '[settings] python_executable_path'),
                                         resolve_program(interpreter)) if p}
        self.engines = {p for p in [self._configured(botsengine_path, '[settings] botsengine_path')]
                        + [self._resolve(name) for name in ENGINE_NAMES] if p}
        self.programs = set(self.engines)
        for entry in split_authorized_tasks(authorized_tasks):
            if entry != '*':
                found = self._configured(entry, '[jobqueue] authorized_tasks')
                if found:
                    self.programs.add(found)

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

    def executable(self, task, cached=False):
        """The file to execute for ``task`` when the task is allowed; else None.

        ``cached``: a path resolved up to two seconds ago may answer.  Replacing a program in
        that time needs write access where the allowed programs are, which is as good as
        replacing the engine itself, so the cache opens no new door.
        """
        return self._check(task, self._cached if cached else self._resolve)

    def allows(self, task):
        """True when ``task`` may be queued."""
        return self.executable(task, cached=True) is not None

    def _check(self, task, resolve):
        program = resolve(task[0])
        if self.allow_all:
            return program or task[0]
        if program in self.programs:
            return program
        if program in self.interpreters and len(task) > 1:
            # The interpreter opens its script relative to the working directory, not the PATH,
            # so a bare name here is a file in the working directory: give it a path.
            script = task[1] if os.sep in task[1] else os.path.join('.', task[1])
            if resolve(script) in self.programs:
                return program
        return None

    def is_engine(self, task):
        """True when ``task`` runs bots-engine, directly or as the script of an interpreter."""
        return any(os.path.basename(arg) in ENGINE_NAMES or self._resolve(arg) in self.engines
                   for arg in task[:2])
