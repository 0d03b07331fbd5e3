"""Job queue for the Bots EDI translator: one engine run at a time, none lost.

The three programs are ``jobqueueserver`` (the server: wires the parts,
signals, shutdown), ``job2queue`` (the client program and
``send_job_to_jobqueue()``) and ``dirmonitor`` (file events become engine
jobs).  The ``overlay`` makes them the modules Bots imports under the same
names - ``bots.jobqueueserver``, ``bots.job2queue``, ``bots.dirmonitor`` -
without writing Bots' files.  Everything else lives in this package, under
names Bots does not use:

- ``overlay``         Bots' three module names answered with this package's programs
- ``botsroutes``      the routes of Bots' database that Bots 4 flags for the dirmonitor
- ``instance``        only one server and one dirmonitor per botssys
- ``jobqueue``        the queue of waiting jobs (priority heap + duplicate index)
- ``store``           where waiting, running and finished jobs are kept (SQLite)
- ``launcher``        runners that start jobs and watch them; lock files; the output keeper
- ``rpc``             the XML-RPC front of the server
- ``capture``         the output keeper process: keeps the end of each job's output
- ``report``          error reports by e-mail
- ``rpcclient``       calls to the server, with a timeout
- ``jobqueuetool``    ``bots-jobqueue``, the operator's view
- ``authorize``       which tasks the server agrees to run
- ``signals``         signals, caught in one place for each program
- ``configuration``   ``-c<directory>``, bots.ini and where Bots is; ``botslog`` logging
- ``config/``         the bundled configuration (bots.ini, settings.py)
"""

# This package's own version (MAJOR.MINOR.PATCH, see README "Versions"), not the Bots it serves.
__version__ = '1.0.0'
BOTS_VERSIONS = '3.3.1 and 4.0'      # the Bots releases it is tested with
