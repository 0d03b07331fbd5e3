"""The queue core on its own, with a real (in-memory) store: order, duplicates, 100,000 jobs."""
import random
import threading

from bots.botsjobqueue.jobqueue import ADDED, DUPLICATE, JobQueue
from bots.botsjobqueue.store import Store


def make_queue():
    return JobQueue(Store(':memory:'))


def drain(queue):
    jobs = []
    while len(queue):
        jobs.append(queue.take())
    return jobs


def test_order_is_priority_then_job_number_at_100000_jobs():
    queue = make_queue()
    rng = random.Random(7)
    expected = []
    for number in range(100000):
        priority = rng.randint(1, 9)
        code, jobnumber, _ = queue.add(['engine', 'route%d' % number], priority)
        assert code == ADDED
        expected.append((priority, jobnumber))
    # Change the priority of a few thousand waiting jobs; they keep their numbers.
    for number in rng.sample(range(100000), 3000):
        new_priority = rng.randint(1, 9)
        code, jobnumber, _ = queue.add(['engine', 'route%d' % number], new_priority)
        assert code in (ADDED, DUPLICATE)
        expected[number] = (new_priority, jobnumber)
    assert [job.jobnumber for job in queue.first(5)] == [n for _, n in sorted(expected)[:5]]
    taken = drain(queue)
    assert [(job.priority, job.jobnumber) for job in taken] == sorted(expected)


def test_duplicates_and_removal():
    queue = make_queue()
    assert queue.add(['a'], 5) == (ADDED, 1, None)
    assert queue.add(['a'], 5) == (DUPLICATE, 1, None)
    assert queue.add(['a'], 2) == (ADDED, 1, 5)
    assert queue.add(['b'], 5) == (ADDED, 2, None)
    assert [job.jobnumber for job in queue.waiting()] == [1, 2]
    assert queue.remove(1).task == ('a',)
    assert queue.remove(1) is None
    assert queue.add(['a'], 2) == (ADDED, 3, None)       # no longer waiting: a new job
    assert queue.clear() == 2
    assert len(queue) == 0


def test_take_blocks_until_a_job_arrives_and_close_wakes_it():
    queue = make_queue()
    got = []
    thread = threading.Thread(target=lambda: got.append(queue.take()))
    thread.start()
    queue.add(['late'], 5)
    thread.join(5)
    assert got[0].task == ('late',)
    thread = threading.Thread(target=lambda: got.append(queue.take()))
    thread.start()
    queue.close()
    thread.join(5)
    assert got[1] is None


def test_stored_order_survives_a_reload(tmp_path):
    path = str(tmp_path / 'q.db')
    queue = JobQueue(Store(path))
    for number in range(50):
        queue.add(['job%d' % number], 9 - number % 9)
    queue.add(['job3'], 1)
    before = [(job.priority, job.jobnumber, job.task) for job in queue.waiting()]
    reloaded = JobQueue(Store(path))
    from bots.botsjobqueue.jobqueue import Job, canonical_task
    reloaded.restore((Job(item.jobnumber, item.priority, canonical_task(item.task)), None)
                     for item in Store(path).load())
    assert [(job.priority, job.jobnumber, job.task) for job in reloaded.waiting()] == before


def test_capture_keeps_the_start_and_the_end_of_a_stream():
    """capture.py as one job's relay (Windows): half the limit from the start, half from the end."""
    import subprocess
    import sys
    import bots.botsjobqueue.capture
    data = b''.join(b'line %d\n' % number for number in range(200000))
    result = subprocess.run([sys.executable, bots.botsjobqueue.capture.__file__, '1000'], input=data, capture_output=True,
                            timeout=60)
    assert result.returncode == 0
    assert result.stdout == data[:500] + b'\n[... %d bytes of output left out ...]\n' % (len(data) - 1000) + data[-500:]
    short = subprocess.run([sys.executable, bots.botsjobqueue.capture.__file__, '1000'], input=b'short\n',
                           capture_output=True, timeout=60)
    assert short.stdout == b'short\n'
