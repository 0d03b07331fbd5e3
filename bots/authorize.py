"""Which tasks the server agrees to run.

Any local user can reach a localhost port, so the queue runs only:

- the configured engine (``[settings] botsengine_path``), directly or by the
  configured Python (``python_executable_path``) or the server's own;
- ``bots-engine`` / ``bots-engine.py`` as found on the server's own PATH;
- the programs in ``[jobqueue] authorized_tasks`` (full paths, or names found
  on the server's PATH), directly or as the script of an allowed Python;
- anything at all when ``authorized_tasks = *`` (Bots 3 behaviour; unsafe).

Programs are compared as files (real paths), never by name alone, so a file
called ``bots-engine.py`` in some other directory is not the engine.
"""
import os
import shutil
import time

ENGINE_NAMES = ('bots-engine', 'bots-engine.py')


def _real(path):
    return os.path.normcase(os.path.realpath(path))


def resolve_program(name):
    """The real path of the program ``name`` as the server would start it, or None."""
    if not name:
        return None
    if os.sep in name or (os.altsep and os.altsep in name):
        return _real(name) if os.path.isfile(name) else None
    found = shutil.which(name)
    return _real(found) if found else None


class ResolveCache:
    """``resolve_program`` with answers kept a few seconds: adds and launches come in bursts
    with the same programs, and resolving a path costs a system call per component."""

    def __init__(self, seconds=2.0, size=4096):
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
        program = resolve_program(name)
        self._answers[name] = (now + self.seconds, program)
        return program


class Authorizer:
    """Decides whether a task may run.  Built once from the configuration."""

    def __init__(self, python_executable_path, botsengine_path, authorized_tasks, interpreter):
        self._cached = ResolveCache()
        self.allow_all = authorized_tasks.strip() == '*'
        self.interpreters = {p for p in (resolve_program(python_executable_path),
                                         resolve_program(interpreter)) if p}
        self.engines = {p for p in [resolve_program(botsengine_path)]
                        + [resolve_program(name) for name in ENGINE_NAMES] if p}
        self.programs = set(self.engines)
        for entry in authorized_tasks.replace('\n', ',').split(','):
            entry = entry.strip()
            if entry and entry != '*':
                found = resolve_program(entry)
                if found:
                    self.programs.add(found)

    def executable(self, task, cached=False):
        """The file to execute for ``task`` when the task is allowed; else None.

        ``cached``: a path resolved up to two seconds ago may answer.  Replacing a program in
        that time needs write access where the allowed programs are, which is as good as
        replacing the engine itself, so the cache opens no new door.
        """
        return self._check(task, self._cached if cached else resolve_program)

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
        return any(os.path.basename(arg) in ENGINE_NAMES or resolve_program(arg) in self.engines
                   for arg in task[:2])
