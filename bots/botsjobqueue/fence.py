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
* reports each job's end (its exit code, and whether it was fenced) on a pipe of the job's
  own that the runner waiting for it reads; the server records it as for a job it had started
  itself;
* outlives a server that died (its jobs are still fenced at the same moment) and ends once it
  has no job left.

Messages are JSON over a Unix socket pair (SOCK_SEQPACKET: one message a packet), descriptors
passed alongside (SCM_RIGHTS).  POSIX only: a shared store with a leader needs it.
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

from .processes import KILL, process_start_time, signal_group, wait_for_pid


class LeaseLost(Exception):
    """The fence refused a start: the lease does not hold long enough any more."""


# ---- the fence process
class FenceProcess:
    """The fence's side (``python -m bots.botsjobqueue.fence FD``)."""

    def __init__(self, sock):
        self.sock = sock
        self.term_at = 0.0          # monotonic: SIGTERM to every job from here on
        self.kill_at = 0.0          # and SIGKILL
        self.children = {}          # pid -> [jobnumber, popen, signals sent]
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.server_gone = False

    def send(self, message):
        with self._send_lock:
            try:
                self.sock.send(json.dumps(message).encode())
            except OSError:
                self.server_gone = True

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
        with self._lock:
            if time.monotonic() >= self.term_at:
                self.send({'refused': jobnumber})
                return
            try:
                popen = subprocess.Popen(message['run'], stdin=subprocess.DEVNULL, stdout=fds[0], stderr=fds[0],
                                         close_fds=True, pass_fds=tuple(fds[2:]), start_new_session=True)
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                self.send({'failed': jobnumber, 'error': str(exc)})
                return
            self.children[popen.pid] = [jobnumber, popen, 0]
        ended = os.dup(fds[1])            # the received descriptors are closed after this message
        threading.Thread(target=self._wait, args=(popen, ended), daemon=True).start()
        self.send({'started': jobnumber, 'pid': popen.pid})

    def _wait(self, popen, ended):
        """Wait for the job; its end goes straight to the runner that waits for it, on its own pipe."""
        code = popen.wait()
        with self._lock:
            _, _, sent = self.children.pop(popen.pid)
        # Fenced: ended by our signal.  A job that finished by itself as the signal came is not.
        fenced = bool(sent) and code != 0
        try:
            os.write(ended, b'%d %d' % (code, fenced))
        except OSError:
            pass                            # the server is gone
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


def main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the server decides when its jobs stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(sys.argv[1]))
    FenceProcess(sock).serve()


# ---- the server's side
class FencedChild:
    """A job started by the fence: its pid, and its exit code once the fence writes it on the job's
    own pipe (read by the runner that waits for it: no thread between)."""

    def __init__(self, pid, ended):
        self.pid = pid
        self.code = None
        self.fenced = False
        self._ended = ended          # the read end of the job's pipe
        self._start_time = process_start_time(pid)

    def wait(self):
        """Block until the job has ended; its exit code (None when the fence itself is gone)."""
        chunks = []
        while True:
            chunk = os.read(self._ended, 64)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(self._ended)
        words = b''.join(chunks).split()
        if len(words) == 2:
            self.code, self.fenced = int(words[0]), words[1] == b'1'
        else:
            # The fence was killed: nothing would end this job in time any more.  It is ended
            # here, and waited for, before another can start; it runs again.
            signal_group(self.pid, KILL)
            wait_for_pid(self.pid, self._start_time)
            self.fenced = True
        return self.code


class Fence:
    """The server's handle on its fence process."""

    def __init__(self, logger):
        self.logger = logger
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._answers = {}          # jobnumber -> [Event, answer]
        self._start()

    def _start(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen([sys.executable, '-m', 'bots.botsjobqueue.fence', str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        theirs.close()
        self.sock = ours
        threading.Thread(target=self._read, args=(ours,), name='fence', daemon=True).start()

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
        self._send({'hold': [term_at, kill_at]})

    def spawn(self, command, output, lock, jobnumber):
        """Start a job through the fence; its FencedChild.  LeaseLost when refused."""
        if self.process.poll() is not None:
            raise LeaseLost()               # no fence: no start, until the next renewal starts one
        waiter = [threading.Event(), None]
        with self._lock:
            self._answers[jobnumber] = waiter
        ended, ended_there = os.pipe()
        try:
            self._send({'run': list(command), 'job': jobnumber},
                       [output, ended_there] + ([lock] if lock is not None else []))
        finally:
            os.close(ended_there)
        if not waiter[0].wait(30):
            os.close(ended)
            raise OSError('the fence does not answer')
        answer = waiter[1]
        if 'started' not in answer:
            os.close(ended)
            if 'refused' in answer:
                raise LeaseLost()
            raise OSError(answer['error'])
        return FencedChild(answer['pid'], ended)

    def _read(self, sock):
        while True:
            try:
                data = sock.recv(1 << 16)
            except OSError:
                data = b''
            if not data:
                break
            message = json.loads(data)
            jobnumber = message.get('started', message.get('refused', message.get('failed')))
            with self._lock:
                waiter = self._answers.pop(jobnumber, None)
            if waiter is not None:
                waiter[1] = message
                waiter[0].set()
        # The fence is gone (it never ends while it has jobs and we live): the jobs' pipes say so.
        with self._lock:
            for waiter in self._answers.values():
                waiter[1] = {'failed': None, 'error': 'the fence ended'}
                waiter[0].set()

    def close(self):
        """The server stops (its jobs are stopped already): the fence ends."""
        try:
            self._send({'quit': True})
        except OSError:
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()


if __name__ == '__main__':
    main()
