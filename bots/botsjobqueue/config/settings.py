# Mail settings for error reports of the Bots job queue (with
# [settings] sendreportiferror = True in bots.ini).  The names are Django's,
# as in Bots' own settings.py.  Only plain values are read.

# Who receives error reports: a tuple of (name, address) pairs.  As in Bots,
# the reports go to the MANAGERS; to the ADMINS only when there are no MANAGERS.
MANAGERS = (
    # ('Bots operator', 'edi-operator@example.com'),
)
# Sender address of the reports.
SERVER_EMAIL = 'bots@localhost'
EMAIL_HOST = 'localhost'
EMAIL_PORT = 25
EMAIL_HOST_USER = ''
EMAIL_HOST_PASSWORD = ''
EMAIL_USE_TLS = False
EMAIL_USE_SSL = False
EMAIL_SUBJECT_PREFIX = ''
