"""Error reports by e-mail, received by a real SMTP server on loopback."""
import os
import threading

import pytest
from aiosmtpd.controller import Controller

from conftest import free_port, wait_until


class Inbox:
    def __init__(self):
        self.messages = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        from email import message_from_bytes
        with self.lock:
            self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return '250 OK'

    def subjects(self):
        with self.lock:
            return [message['Subject'] for _, message in self.messages]


@pytest.fixture
def smtp():
    inbox = Inbox()
    controller = Controller(inbox, hostname='127.0.0.1', port=free_port())
    controller.start()
    yield controller, inbox
    controller.stop()


def write_settings(environment, port):
    with open(os.path.join(environment.configdir, 'settings.py'), 'w') as handle:
        handle.write('import os\nPROJECT_PATH = os.path.dirname(__file__)\n'
                     'MANAGERS = (("Operator", "edi@example.com"),)\n'
                     'SERVER_EMAIL = "bots@example.com"\nEMAIL_HOST = "127.0.0.1"\nEMAIL_PORT = %d\n' % port)


def test_reports_are_mailed(environment, smtp, tmp_path):
    controller, inbox = smtp
    write_settings(environment, controller.port)
    environment.write_ini(settings='sendreportiferror = True\nmaxruntime = 0.01',
                          jobqueue='authorized_tasks = *\nkilljobsintimeout = True')
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('system-error', '--exit=1'), 5)
    proxy.addjob([str(tmp_path / 'no-such-program')], 5)
    proxy.addjob(environment.engine('too-slow', '--sleep=30'), 5)
    wait_until(lambda: len(inbox.subjects()) >= 3, timeout=60, message='three reports')
    subjects = inbox.subjects()
    assert '[Bots Job Queue] - Job ended with errors' in subjects
    assert '[Bots Job Queue] - Error starting job' in subjects
    assert '[Bots Job Queue] - Job exceeded maximum runtime' in subjects
    recipients, message = inbox.messages[0]
    assert recipients == ['edi@example.com'] and message['From'] == 'bots@example.com'


def test_no_reports_unless_asked(environment, smtp):
    controller, inbox = smtp
    write_settings(environment, controller.port)
    environment.start_server()
    environment.proxy().addjob(environment.engine('system-error', '--exit=1'), 5)
    wait_until(lambda: 'Finished job 1' in environment.log(), message='the job to end')
    environment.stop_server()
    assert inbox.subjects() == []


def test_unreachable_mail_server_is_logged_and_the_queue_goes_on(environment):
    write_settings(environment, free_port())          # nothing listens there
    environment.write_ini(settings='sendreportiferror = True')
    environment.start_server()
    proxy = environment.proxy()
    proxy.addjob(environment.engine('system-error', '--exit=1'), 5)
    proxy.addjob(environment.engine('next'), 5)
    wait_until(lambda: len(environment.runs()) == 2, message='both jobs')
    wait_until(lambda: 'Cannot send error report' in environment.log(), message='the mail error in the log')


def test_locked_engine_is_reported_when_it_keeps_happening(environment, smtp):
    controller, inbox = smtp
    write_settings(environment, controller.port)
    environment.write_ini(settings='sendreportiferror = True',
                          jobqueue='locked_retry_delay = 0.1\nlocked_report_after = 2')
    environment.start_server()
    environment.proxy().addjob(environment.engine('locked', '--exit=3'), 5)
    wait_until(lambda: len(environment.runs()) >= 2, message='two locked runs')
    wait_until(lambda: inbox.subjects(), message='the report')
    assert inbox.subjects() == ['[Bots Job Queue] - Engine database stays locked']
    assert environment.proxy().clearjobq() == 0


@pytest.mark.parametrize('names, expected', [
    ({'MANAGERS': 'managers@example.com', 'ADMINS': 'admins@example.com'}, ['managers@example.com']),
    ({'ADMINS': 'admins@example.com'}, ['admins@example.com']),
])
def test_reports_go_to_the_managers_as_in_bots(environment, smtp, names, expected):
    controller, inbox = smtp
    with open(os.path.join(environment.configdir, 'settings.py'), 'w') as handle:
        for name, address in names.items():
            handle.write('%s = (("someone", "%s"),)\n' % (name, address))
        handle.write('EMAIL_HOST = "127.0.0.1"\nEMAIL_PORT = "%d"\n' % controller.port)
    environment.write_ini(settings='sendreportiferror = True')
    environment.start_server()
    environment.proxy().addjob(environment.engine('system-error', '--exit=1'), 5)
    wait_until(lambda: inbox.subjects(), message='the report')
    assert inbox.messages[0][0] == expected
