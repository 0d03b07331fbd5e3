"""What ``GET /metrics`` tells Prometheus, and what ``GET /health`` tells a probe.

Counters and histograms are kept by prometheus-client in a registry of the
server's own (not the library's global one); the numbers that are a state -
waiting, running, the age of the oldest waiting job, paused - are read when a
scrape comes, by a collector.
"""
import json
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, float('inf'))
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, float('inf'))


class Metrics:
    """The server's metrics.  ``state`` is a function returning the current ``health()`` dict."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.state = None
        self.added = Counter('botsjobqueue_jobs_added', 'Jobs put on the queue (addjob and schedules).',
                             registry=self.registry)
        self.answered = Counter('botsjobqueue_jobs_not_added', 'Jobs not put on the queue, by reason.',
                                ['reason'], registry=self.registry)
        self.finished = Counter('botsjobqueue_jobs_finished', 'Jobs that ended, by exit code and status.',
                                ['exitcode', 'status'], registry=self.registry)
        self.duration = Histogram('botsjobqueue_job_duration_seconds', 'How long finished jobs ran.',
                                  buckets=DURATION_BUCKETS, registry=self.registry)
        self.lateness = Histogram('botsjobqueue_schedule_lateness_seconds',
                                  'From a schedule\'s time to its job being queued.', buckets=LATENESS_BUCKETS,
                                  registry=self.registry)
        self.registry.register(StateCollector(self))

    def job_finished(self, exitcode, status, seconds):
        self.finished.labels('unknown' if exitcode is None else str(exitcode), status or 'unknown').inc()
        if seconds is not None:
            self.duration.observe(max(0.0, seconds))

    def exposition(self):
        """``(content type, body)`` of the Prometheus text format."""
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)


class StateCollector(Collector):
    """The gauges, read from the server's state at each scrape."""

    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        state = self.metrics.state() if self.metrics.state else {}
        for name, key, text in (('botsjobqueue_waiting_jobs', 'waiting', 'Jobs waiting to run.'),
                                ('botsjobqueue_running_jobs', 'running', 'Jobs running now.'),
                                ('botsjobqueue_oldest_waiting_seconds', 'oldest_waiting_age',
                                 'Age of the job that has waited longest (0 when none waits).'),
                                ('botsjobqueue_paused', 'paused', '1 while the queue is paused.')):
            yield GaugeMetricFamily(name, text, value=float(state.get(key) or 0))
        if 'role' in state:
            yield GaugeMetricFamily('botsjobqueue_leader', '1 while this server leads (a shared store), 0 while it '
                                    'stands by.', value=float(state['role'] == 'leader'))


def health_answer(state, leader_only=False):
    """``(HTTP status, body)`` of ``GET /health``: 200 while the server accepts jobs and its
    runners live (paused included), else 503.  ``leader_only`` (``/health?leader``, a readiness
    probe that routes to the leader of a shared store): 503 on a standby too."""
    healthy = state['accepting'] and state['runners_alive']
    if leader_only and state.get('role', 'leader') != 'leader':
        return 503, json.dumps(dict(state, healthy=healthy, time=time.time()), sort_keys=True).encode('utf-8')
    return (200 if healthy else 503), json.dumps(dict(state, healthy=healthy, time=time.time()),
                                                 sort_keys=True).encode('utf-8')
