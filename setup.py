"""Installer; the metadata lives in setup.cfg.  One addition: the overlay's ``.pth`` file."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = 'bots_jobqueue_overlay.pth'
OVERLAY = '_bots_jobqueue_overlay.py'


class BuildWithOverlay(build_py):
    """Also put the overlay (``bots/botsjobqueue/overlay.py``) at the top of the installed tree,
    as a module of its own, and the ``.pth`` file that Python reads at every start to import it:
    importing it must not import ``bots`` that early (a Bots run from its own directory would
    then not find its package)."""

    def run(self):
        super().run()
        self.copy_file(os.path.join('bots', 'botsjobqueue', 'overlay.py'), os.path.join(self.build_lib, OVERLAY))
        with open(os.path.join(self.build_lib, PTH), 'w') as handle:
            handle.write('import _bots_jobqueue_overlay\n')

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, name) for name in (PTH, OVERLAY)]


setup(cmdclass={'build_py': BuildWithOverlay})
