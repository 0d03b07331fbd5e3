"""Job queue for the Bots EDI translator: one engine run at a time, none lost.

The three programs are ``jobqueueserver`` (the server: wires the parts,
signals, shutdown), ``job2queue`` (the client program and
``send_job_to_jobqueue()``) and ``dirmonitor`` (file events become engine
jobs).  The ``overlay`` makes them the modules Bots imports under the same
names - ``bots.jobqueueserver``, ``bots.job2queue``, ``bots.dirmonitor`` -
without writing Bots' files (``dirmonitor`` is the program; ``watches`` and
``watching`` below are what it does).  Everything else lives in this
package, under names Bots does not use.  Where a job goes, in order:

- ``job2queue``       the client program and ``send_job_to_jobqueue()``; ``rpcclient`` its calls
- ``rpcserver``       the server's HTTP front: one event loop, a plain state per connection
- ``httphead``        what a request head may say (framing, browser rules), and the answer's head
- ``rpcservice``      the XML-RPC methods (``addjob`` ...): what each call does and answers
- ``admission``       whether a task may be queued (clients' and schedules' alike), and its log line
- ``jobqueue``        the queue of waiting jobs (priority heap + duplicate index)
- ``store``           where waiting, running and finished jobs are kept (SQLite)
- ``dbstore``         the same in PostgreSQL or MySQL/MariaDB, shared by several servers; ``storechoice``
                      which store bots.ini names
- ``cluster``         several servers on one shared store: the lease (one leader), following the queue
- ``fence``           the leader's process that starts its jobs and ends them when its lease runs out
- ``runner``          runners: take the next job, have it started, record the one before
- ``launcher``        start a job, supervise it to its end (``RunningJob``), adopt one after a restart
- ``processes``       is a job alive, wait for it, signal it; the lock file each job holds
- ``outputs``         what a job printed: the output keeper's client and the capture kinds
- ``capture``         the output keeper process itself
- ``ends``            after a job: its log line, its output in the history, a report
- ``jobstates``       where a job is (launcher, queue or store), asked in one place; what a
                      starting (``Starting``) and a running job (``RunningJob``) are
- ``timers``          one timer facility: maxruntime, delayed jobs, the scheduler's wake-ups
- ``schedule``        ``[scheduleN]`` sections fired by the server
- ``codes``           the numbers that cross borders: addjob's answers, the engine's exit codes

Around it:

- ``overlay``         Bots' three module names answered with this package's programs
- ``watches``         what the directory monitor watches (sections, Bots 4's routes)
- ``watching``        file events become one engine job per route; the outbox that sends it
- ``botsroutes``      the routes of Bots' database that Bots 4 flags for the dirmonitor
- ``instance``        only one server and one dirmonitor per botssys
- ``authorize``       which tasks the server agrees to run
- ``report``          error reports by e-mail
- ``statuspage``      the status page, /health and /metrics (``metrics``)
- ``jobqueuetool``    ``bots-jobqueue``, the operator's view; ``demo`` ``bots-jobqueue-demo``
- ``signals``         signals, caught in one place for each program
- ``configuration``   ``-c<directory>`` and bots.ini; ``botsinstall`` where Bots is; ``botslog`` logging
- ``config/``         the bundled configuration (bots.ini, settings.py); ``service/`` systemd units
"""

# This package's own version (MAJOR.MINOR.PATCH, see README "Versions"), not the Bots it serves.
__version__ = '1.1.4'
BOTS_VERSIONS = '3.3.1 and 4.0'      # the Bots releases it is tested with
