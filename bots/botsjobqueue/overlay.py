"""The overlay: while this package is installed, Bots' three job-queue modules are ours.

``bots.jobqueueserver``, ``bots.job2queue`` and ``bots.dirmonitor`` are the
names Bots' other modules and its scripts import (the monitor's Run menu calls
``bots.job2queue.send_job_to_jobqueue``).  This package keeps its programs
under its own names (``bots.botsjobqueue.jobqueueserver`` ...) and puts a
finder first on ``sys.meta_path`` - from a ``.pth`` file, at every start of
the Python it is installed in - that answers those three names with its own
modules.  Bots' own files are never written: uninstalling this package takes
the ``.pth`` file away, and Bots imports its own modules again, byte for byte
as it installed them.

Installed, this file is the top-level module ``_bots_jobqueue_overlay`` (see
setup.py): it imports nothing of ``bots`` until one of the three names is
asked for.
"""
import sys

try:                      # already loaded at every start: importing it costs nothing
    from _frozen_importlib import ModuleSpec
except ImportError:       # another Python
    from importlib.machinery import ModuleSpec

PROGRAMS = {'bots.jobqueueserver': 'bots.botsjobqueue.jobqueueserver',
            'bots.job2queue': 'bots.botsjobqueue.job2queue',
            'bots.dirmonitor': 'bots.botsjobqueue.dirmonitor'}


class _Ours:
    """Loads one of Bots' names as the module of ours it stands for (one module, two names)."""

    def __init__(self, name):
        self.name = name

    def create_module(self, spec):
        import importlib
        return importlib.import_module(self.name)

    def exec_module(self, module):
        pass                              # imported whole by create_module


class OverlayFinder:
    """A meta path finder for the three names only; every other import goes its usual way."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        ours = PROGRAMS.get(name)
        return ModuleSpec(name, _Ours(ours)) if ours else None


def install():
    if not any(isinstance(finder, OverlayFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, OverlayFinder())


install()
