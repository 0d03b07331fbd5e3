"""Only one server, and only one dirmonitor, per botssys.

Each program holds an exclusive lock on a directory of the environment as long
as it runs: the server on ``botssys/jobqueue`` (its own data: outputs, the
running jobs' lock files), the dirmonitor on ``botssys`` itself.  A lock file
would do the same until an operator deletes it because it looks stale - then
a second program locks a new file of the same name and runs beside the
first.  A directory that holds files cannot be deleted that way, and the lock
goes with the process that held it, however it ends.

POSIX: ``flock`` on the directory.  Windows, where a directory cannot be
locked: a file in it, open and locked (an open file cannot be deleted there).
"""
import os
import sys

from .configuration import ConfigError


class Instance:
    """The lock held for as long as one program runs on a botssys; ``close()`` lets it go."""

    def __init__(self, directory, program):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.program = program
        self._fd = None
        if sys.platform == 'win32':
            self._fd = os.open(os.path.join(directory, '.%s.lock' % program), os.O_RDWR | os.O_CREAT)
        else:
            self._fd = os.open(directory, os.O_RDONLY)

    def take(self):
        """Hold the lock; False when another process holds it."""
        try:
            if sys.platform == 'win32':
                import msvcrt
                msvcrt.locking(self._fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def hold(directory, program, botssys):
    """The lock of ``program`` (``bots-jobqueueserver``, ``bots-dirmonitor``) on ``directory``.
    Raises ConfigError, one line, while another such program runs on ``botssys``."""
    try:
        instance = Instance(directory, program)
    except OSError as exc:
        raise ConfigError('Error: %s cannot use %s: %s' % (program, directory, exc.strerror or exc))
    if not instance.take():
        instance.close()
        raise ConfigError('Error: another %s runs on botssys %s; only one may run there at a time.'
                          % (program, botssys))
    return instance


def runs(directory, program):
    """True while some process holds ``program``'s lock on ``directory``."""
    try:
        instance = Instance(directory, program)
    except OSError:
        return False
    try:
        return not instance.take()
    finally:
        instance.close()
