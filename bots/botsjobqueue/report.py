"""Error reports by e-mail, as Bots sends them (``[settings] sendreportiferror``).

The mail settings are the Django names in the configuration directory's
``settings.py``.  That file is read, not imported: only plain literal
assignments count, so it needs neither Django nor Bots to be installed.
Mails go out from a thread of their own; one that cannot be sent is logged
and never holds up the queue.
"""
import ast
import os
import queue
import smtplib
import ssl
import threading
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

MAIL_NAMES = {
    'MANAGERS': (), 'ADMINS': (), 'SERVER_EMAIL': 'root@localhost', 'EMAIL_HOST': 'localhost', 'EMAIL_PORT': 25,
    'EMAIL_HOST_USER': '', 'EMAIL_HOST_PASSWORD': '', 'EMAIL_USE_TLS': False, 'EMAIL_USE_SSL': False,
    'EMAIL_SUBJECT_PREFIX': '', 'EMAIL_TIMEOUT': 30,
}


def read_mail_settings(configdir):
    """The mail settings of ``<configdir>/settings.py``, with Django's defaults for missing ones."""
    settings = dict(MAIL_NAMES)
    path = os.path.join(configdir, 'settings.py')
    try:
        with open(path, encoding='utf-8') as handle:
            tree = ast.parse(handle.read(), path)
    except (OSError, SyntaxError, ValueError):
        return settings
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in MAIL_NAMES:
                    try:
                        settings[target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        pass
    return settings


def recipients(settings):
    """Who gets the reports: the MANAGERS (as Bots' reports go, by Django's ``mail_managers``);
    the ADMINS only where there are no MANAGERS."""
    for name in ('MANAGERS', 'ADMINS'):
        entries = settings[name] if isinstance(settings[name], (tuple, list)) else ()
        addresses = [entry[1] for entry in entries if isinstance(entry, (tuple, list)) and len(entry) > 1]
        if addresses:
            return addresses
    return []


class Reporter:
    """Sends error reports to the MANAGERS, when the configuration asks for it."""

    def __init__(self, enabled, mail_settings, logger):
        self.enabled = enabled
        self.settings = mail_settings
        self.logger = logger
        self._outbox = queue.SimpleQueue()
        self._thread = None

    def report(self, subject, body):
        """Queue an error report; returns at once."""
        if not self.enabled:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_loop, name='mailer', daemon=True)
            self._thread.start()
        self._outbox.put((subject, body))

    def flush(self, timeout=10):
        """Wait (a while) for queued reports to go out; used at shutdown."""
        if self._thread is not None:
            self._outbox.put(None)
            self._thread.join(timeout)

    def _send_loop(self):
        while True:
            item = self._outbox.get()
            if item is None:
                return
            try:
                self.send(*item)
            except (OSError, smtplib.SMTPException, ValueError) as exc:
                self.logger.error('Cannot send error report "%s": %s', item[0], exc)

    def send(self, subject, body):
        """Send one report now (raises when the mail server refuses)."""
        settings = self.settings
        to = recipients(settings)
        if not to:
            raise ValueError('no MANAGERS (nor ADMINS) in settings.py to send it to')
        message = EmailMessage()
        message['Subject'] = settings['EMAIL_SUBJECT_PREFIX'] + subject
        message['From'] = settings['SERVER_EMAIL']
        message['To'] = ', '.join(to)
        message['Date'] = formatdate(localtime=True)
        message['Message-ID'] = make_msgid()
        message.set_content(body)
        smtp_class = smtplib.SMTP_SSL if settings['EMAIL_USE_SSL'] else smtplib.SMTP
        with smtp_class(settings['EMAIL_HOST'], int(settings['EMAIL_PORT']),
                        timeout=settings['EMAIL_TIMEOUT']) as smtp:
            if settings['EMAIL_USE_TLS'] and not settings['EMAIL_USE_SSL']:
                smtp.starttls(context=ssl.create_default_context())
            if settings['EMAIL_HOST_USER']:
                smtp.login(settings['EMAIL_HOST_USER'], settings['EMAIL_HOST_PASSWORD'])
            smtp.send_message(message)
        self.logger.info('Sent error report "%s" to %s', subject, ', '.join(to))
