"""Installer; the metadata lives in setup.cfg.  One addition: the overlay's ``.pth`` file."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = 'bots_jobqueue_overlay.pth'


class BuildWithOverlay(build_py):
    """Also write the ``.pth`` file that installs the overlay (``bots/botsjobqueue/overlay.py``)
    at the top of the installed tree, where Python reads it at every start."""

    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, PTH), 'w') as handle:
            handle.write('import bots.botsjobqueue.overlay\n')

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={'build_py': BuildWithOverlay})
