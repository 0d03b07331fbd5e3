"""The numbers that cross the job queue's borders, named once.

``addjob``'s answers are also ``bots-job2queue``'s exit codes (Bots' own
numbers); the engine's exit codes are those of ``bots-engine`` that the
queue acts on.
"""

DEFAULT_PORT = 28082   # Bots' port of the job queue server, when bots.ini names none

# What addjob answers, and what bots-job2queue exits with.
ADDED = 0            # added, or the priority of a waiting duplicate changed
UNREACHABLE = 1      # the client could not reach the server (or it refused the request)
NO_TASK = 2
NOT_AUTHORIZED = 3
DUPLICATE = 4        # the same task already waits with the same priority: not added

# How bots-engine ends.
ENGINE_OK = 0
ENGINE_SYSTEM_ERROR = 1       # reported by mail
ENGINE_PROCESS_ERRORS = 2     # a run with errors in its files: logged as a warning
ENGINE_DATABASE_LOCKED = 3    # another engine run holds its database: queued again later
