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


class Authorizer:
    """Decides whether a task may run.  Built once from the configuration."""

    def __init__(self, python_executable_path, botsengine_path, authorized_tasks, interpreter):
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

    def executable(self, task):
        """The file to execute for ``task`` when the task is allowed; else None."""
        program = resolve_program(task[0])
        if self.allow_all:
            return program or task[0]
        if program in self.programs:
            return program
        if program in self.interpreters and len(task) > 1:
            # The interpreter opens its script relative to the working directory, not the PATH.
            script = task[1]
            if os.path.isfile(script) and _real(script) in self.programs:
                return program
        return None

    def is_engine(self, task):
        """True when ``task`` runs bots-engine, directly or as the script of an interpreter."""
        return any(os.path.basename(arg) in ENGINE_NAMES or resolve_program(arg) in self.engines
                   for arg in task[:2])
