"""Job queue for the Bots EDI translator: one engine run at a time, none lost.

Where things happen:

- ``jobqueue``        the queue of waiting jobs (priority heap + duplicate index)
- ``store``           where waiting, running and finished jobs are kept (SQLite)
- ``launcher``        runners that start jobs and watch them
- ``rpc``             the XML-RPC front of the server
- ``jobqueueserver``  the server program: wires the parts, signals, shutdown
- ``capture``         keeps the end of a job's output where there is no ``tail``
- ``report``          error reports by e-mail
- ``job2queue``       the client program and ``send_job_to_jobqueue()``
- ``rpcclient``       calls to the server, with a timeout
- ``jobqueuetool``    ``bots-jobqueue``, the operator's view
- ``dirmonitor``      file events become engine jobs
- ``authorize``       which tasks the server agrees to run
- ``config``          ``-c<directory>`` and bots.ini; ``botslog`` logging
"""

__version__ = '3.3.1'
