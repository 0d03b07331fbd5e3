"""The fence: a small process beside a server of a shared store, that starts its jobs and ends them
when the server's lease runs out - whatever has become of the server.

A leader that is frozen (SIGSTOP, a stalled virtual machine's process), or cut off from the
database, cannot end its own job in time: its code does not run, or does not know.  So the
leader does not start jobs itself.  It hands each start to its fence (``run``, with the job's
output pipe and lock file), and after each renewal of the lease tells the fence until when the
lease holds (``hold``, on the machine's monotonic clock, which both processes read and which
goes on while the server is stopped).  The fence

* starts a job only before that moment, so a server frozen between its last look at the lease
  and the start cannot start a job late;
* at that moment sends SIGTERM to the process group of each job it started, and SIGKILL
  ``fence_grace`` seconds later - before the lease can expire in the database (see
  ``cluster.py`` for the margins);
* answers each start, and later reports the job's end (its exit code, and whether it was
  fenced), on a pipe of the job's own that the runner starting it reads - no thread of the
  server's in between; the server records the end as for a job it had started itself;
* outlives a server that died (its jobs are still fenced at the same moment) and ends once it
  has no job left.

The other way round, a fence stopped while its server runs: the server's handle (``Fence``)
sends the same signals at the same moments from timers of its own, and ends a fence that does
not answer a start, or does not report a job that is gone (``FencedChild.HUNG_AFTER``).

The server's messages are JSON over a Unix socket pair (SOCK_SEQPACKET: one message a
packet), descriptors passed alongside (SCM_RIGHTS).  The fence's answers are lines on the job's
pipe: ``S <pid>`` (started), ``R`` (refused: the lease does not hold) or ``F <error>``, and
once the job has ended ``E <exit code> <1 when fenced>``.  POSIX only: a shared store with a
leader needs it.
"""
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from .processes import KILL, is_alive, process_start_time, signal_group, wait_for_pid
from .timers import Timers


class LeaseLost(Exception):
    """The fence refused a start: the lease does not hold long enough any more (or there is no
    fence that answers: the start waits for the next renewal, which starts a new one)."""

    def __init__(self, why='the lease of this server no longer holds'):
        super().__init__(why)


# ---- the fence process
class FenceProcess:
    """The fence's side (``python -m bots.botsjobqueue.fence FD``)."""

    def __init__(self, sock):
        self.sock = sock
        self.term_at = 0.0          # monotonic: SIGTERM to every job from here on
        self.kill_at = 0.0          # and SIGKILL
        self.children = {}          # pid -> [jobnumber, popen, signals sent]
        self._lock = threading.Lock()
        self.server_gone = False

    def serve(self):
        while True:
            with self._lock:
                if self.server_gone and not self.children:
                    return
                self._fence(time.monotonic())
                due = [moment for moment in (self.term_at, self.kill_at) if moment > time.monotonic()]
                busy = bool(self.children)
            timeout = (min(due) - time.monotonic()) if (due and busy) else (0.05 if busy else 1.0)
            if self.server_gone:
                time.sleep(max(0.01, min(timeout, 0.05)))
                continue
            readable, _, _ = select.select([self.sock], [], [], max(0.0, min(timeout, 1.0)))
            if readable:
                self._receive()

    def _receive(self):
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 4)
        except OSError:
            data, fds = b'', []
        if not data:
            self.server_gone = True
            return
        message = json.loads(data)
        try:
            if 'hold' in message:
                with self._lock:
                    self.term_at, self.kill_at = message['hold']
            elif 'run' in message:
                self._run(message, fds)
            elif 'quit' in message:
                self.server_gone = True
        finally:
            for fd in fds:
                os.close(fd)

    def _run(self, message, fds):
        jobnumber = message['job']
        ended = fds[1]                    # the job's pipe to the runner that starts it
        with self._lock:
            if time.monotonic() >= self.term_at:
                _say(ended, b'R')
                return
            try:
                popen = subprocess.Popen(message['run'], stdin=subprocess.DEVNULL, stdout=fds[0], stderr=fds[0],
                                         close_fds=True, pass_fds=tuple(fds[2:]), start_new_session=True)
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                _say(ended, b'F ' + ' '.join(str(exc).split()).encode('utf-8', 'replace'))
                return
            self.children[popen.pid] = [jobnumber, popen, 0]
        ended = os.dup(ended)             # the received descriptors are closed after this message
        _say(ended, b'S %d' % popen.pid)        # first: the runner waits for it
        threading.Thread(target=self._wait, args=(popen, ended), daemon=True).start()

    def _wait(self, popen, ended):
        """Wait for the job; its end goes straight to the runner that waits for it, on its own pipe."""
        code = popen.wait()
        with self._lock:
            _, _, sent = self.children.pop(popen.pid)
        # Fenced: ended by our signal.  A job that finished by itself as the signal came is not.
        fenced = bool(sent) and code != 0
        _say(ended, b'E %d %d' % (code, fenced))
        os.close(ended)

    def _fence(self, now):
        """(With the lock held.)  End every job once the lease is past its time."""
        for pid, child in self.children.items():
            if now >= self.kill_at and child[2] < 2:
                signal_group(pid, KILL)
                child[2] = 2
            elif now >= self.term_at and child[2] < 1:
                signal_group(pid, signal.SIGTERM)
                child[2] = 1


def _say(pipe, line):
    """One line of the fence's on a job's pipe (whole: far below PIPE_BUF); a server gone is no error."""
    try:
        os.write(pipe, line + b'\n')
    except OSError:
        pass


def _not_for_the_fence(signum, frame):
    """SIGINT and SIGTERM: the server decides when its jobs stop, not a signal to the fence."""


def main():
    # Caught, not ignored (SIG_IGN): an ignored signal stays ignored in the jobs the fence starts,
    # and their SIGTERM (maxruntime, shutdown, the lease's end) would come to nothing.
    signal.signal(signal.SIGINT, _not_for_the_fence)
    signal.signal(signal.SIGTERM, _not_for_the_fence)
    sock = socket.socket(fileno=int(sys.argv[1]))
    FenceProcess(sock).serve()


# ---- the server's side
class FencedChild:
    """A job started by the fence: its pid, and its exit code once the fence writes it on the job's
    own pipe (read by the runner that waits for it: no thread between)."""

    HUNG_AFTER = 5.0            # seconds a job is gone without the fence's word: the fence is stopped

    def __init__(self, pid, ended, rest, fence, jobnumber):
        self.pid = pid
        self.jobnumber = jobnumber
        self.code = None
        self.fenced = False
        self.unknown = None          # why the exit code cannot be known
        self.signalled = False       # the server's own deadline reached it (``Fence._deadline``)
        self._ended = ended          # the read end of the job's pipe
        self._rest = rest            # what was read of it after the start's answer
        self._start_time = process_start_time(pid)
        self._fence = fence

    def ended_within(self, seconds):
        """True when the job has ended (or its fence is gone) within ``seconds``."""
        return bool(self._rest) or bool(select.select([self._ended], [], [], seconds)[0])

    def wait(self):
        """Block until the job has ended; its exit code (None when the fence is gone or stopped)."""
        try:
            words = self._read_end()
        finally:
            os.close(self._ended)
            self._fence.forget(self)
        if words is None:
            # The fence is stopped (SIGSTOP, a debugger) and its job is gone: the fence cannot
            # say how it ended.  Ended by the server's deadline, it runs again; else it has ended.
            self.fenced = self.signalled
            self.unknown = 'its fence was stopped and could not tell'
        elif len(words) == 3 and words[0] == b'E':
            self.code = int(words[1])
            # (As the fence counts it: a job that ended by itself as the signal came is not fenced.)
            self.fenced = words[2] == b'1' or (self.signalled and self.code != 0)
        else:
            # The fence was killed: nothing would end this job in time any more.  It is ended
            # here, and waited for, before another can start; it runs again.
            signal_group(self.pid, KILL)
            wait_for_pid(self.pid, self._start_time)
            self.fenced = True
        return self.code

    def _read_end(self):
        """The words of the fence's last line on the pipe; None when the job has been gone
        ``HUNG_AFTER`` seconds without one (the fence is then ended: see ``Fence.hung``)."""
        chunks = [self._rest]
        gone_since = None
        while True:
            if not select.select([self._ended], [], [], self.HUNG_AFTER / 2)[0]:
                if is_alive(self.pid, self._start_time):        # a zombie is gone
                    gone_since = None
                elif gone_since is None:
                    gone_since = time.monotonic()
                elif time.monotonic() - gone_since >= self.HUNG_AFTER:
                    self._fence.hung('job %s (pid %d) ended and the fence did not say so' % (
                        self.jobnumber, self.pid))
                    return None
                continue
            chunk = os.read(self._ended, 64)
            if not chunk:
                return b''.join(chunks).split()
            chunks.append(chunk)


class Fence:
    """The server's handle on its fence process.

    It keeps the fence's deadlines a second time: should the fence be stopped (SIGSTOP, a
    debugger) when the lease runs out, the server's own timers end the jobs at the same moments,
    and a fence that no longer answers is ended, with its jobs, and a new one started (it starts
    jobs from the next renewal on).  Only a server stopped together with its fence - the machine
    frozen as a whole - is beyond both (see ``cluster.py``, what is assumed).
    """

    ANSWER_WAIT = 10                # seconds for a start's answer, before the fence is taken for stopped

    def __init__(self, logger):
        self.logger = logger
        self._send_lock = threading.Lock()
        self._children = set()          # the FencedChild of each job running
        self._timers = Timers('fence', logger)
        self._deadlines = []            # our own SIGTERM and SIGKILL, set at each hold
        self._start()

    def _start(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen([sys.executable, '-m', 'bots.botsjobqueue.fence', str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        theirs.close()
        self.sock = ours

    def _send(self, message, fds=()):
        with self._send_lock:
            socket.send_fds(self.sock, [json.dumps(message).encode()], list(fds))

    def hold(self, term_at, kill_at):
        """The lease holds: jobs may run until ``term_at`` (monotonic), SIGKILL at ``kill_at``.
        A fence that was killed is started again first."""
        with self._send_lock:
            if self.process.poll() is not None:
                self.logger.error('The fence process ended (exit code %s); its jobs were ended and run again. '
                                  'A new fence starts.', self.process.returncode)
                self.sock.close()
                self._start()
            now = time.monotonic()
            for timer in self._deadlines:
                timer.cancel()
            self._deadlines = [self._timers.add(term_at - now, self._deadline, signal.SIGTERM),
                               self._timers.add(kill_at - now, self._deadline, KILL)]
        self._send({'hold': [term_at, kill_at]})

    def _deadline(self, signum):
        """(A timer.)  The lease's time is up: what the fence does, done here as well."""
        with self._send_lock:
            children = list(self._children)
        for child in children:
            child.signalled = True
            signal_group(child.pid, signum)

    def forget(self, child):
        with self._send_lock:
            self._children.discard(child)

    def spawn(self, command, output, lock, jobnumber):
        """Start a job through the fence; its FencedChild.  LeaseLost when refused."""
        if self.process.poll() is not None:
            raise LeaseLost()               # no fence: no start, until the next renewal starts one
        ended, ended_there = os.pipe()
        try:
            try:
                self._send({'run': list(command), 'job': jobnumber},
                           [output, ended_there] + ([lock] if lock is not None else []))
            finally:
                os.close(ended_there)
            answer, rest = self._answer(ended)
        except BaseException:
            os.close(ended)
            raise
        if answer is None:
            os.close(ended)
            self.hung('it did not answer the start of job %s within %d seconds' % (jobnumber, self.ANSWER_WAIT))
            raise LeaseLost('the fence did not answer')
        if answer.startswith(b'S '):
            child = FencedChild(int(answer[2:]), ended, rest, self, jobnumber)
            with self._send_lock:
                self._children.add(child)
            return child
        os.close(ended)
        if answer == b'R':
            raise LeaseLost()
        raise OSError(answer[2:].decode('utf-8', 'replace') if answer.startswith(b'F ') else 'the fence ended')

    def _answer(self, ended):
        """The fence's first line on a job's pipe, and what came after it (the job may have ended
        already); ``b''`` when the fence ended first, None when it does not answer in time."""
        data = b''
        deadline = time.monotonic() + self.ANSWER_WAIT
        while b'\n' not in data:
            if not select.select([ended], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None, b''
            chunk = os.read(ended, 64)
            if not chunk:
                break
            data += chunk
        line, _, rest = data.partition(b'\n')
        return line, rest

    def hung(self, why):
        """The fence does not act (stopped: ``why``): end it and every job it started - their
        runners then see it gone, and queue them again - and start a new one."""
        with self._send_lock:
            if self.process.poll() is not None:
                return
            self.logger.error('The fence process (pid %d) does not act: %s.  It is ended, with the jobs it '
                              'started (they run again), and a new fence starts.', self.process.pid, why)
            for pid in _children_of(self.process.pid):
                signal_group(pid, KILL)
            self.process.kill()
            self.process.wait()
            self.sock.close()
            self._start()          # it starts jobs from the next renewal on

    def close(self):
        """The server stops (its jobs are stopped already): the fence ends."""
        self._timers.close()
        try:
            self._send({'quit': True})
        except OSError:
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _children_of(pid):
    """The pids of the children of process ``pid`` (Linux: /proc/<pid>/task/*/children)."""
    found = []
    try:
        tasks = os.listdir('/proc/%d/task' % pid)
    except OSError:
        return found
    for task in tasks:
        try:
            with open('/proc/%d/task/%s/children' % (pid, task)) as handle:
                found.extend(int(word) for word in handle.read().split())
        except (OSError, ValueError):
            pass
    return found


if __name__ == '__main__':
    main()
